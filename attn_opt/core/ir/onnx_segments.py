"""Running a model one segment at a time, and checking rewritten sites that way.

For models larger than memory (`--check=sites`): the node list is cut into segments that
each read about one layer's weights; each segment is its own small ONNX Runtime session
fed with the values the earlier segments left alive, so memory holds one segment's
weights and the activations that cross the cut. A rewritten site is then checked alone:
its new nodes run on the activations the model before the pass computed, and their
output is compared with that model's site output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attn_opt.core import fidelity
from attn_opt.core.graph import SITE_TAG
from attn_opt.core.ir.onnx_model import OnnxModel
from attn_opt.core.ir.onnx_region_shapes import graphs_of


def reads(n: onnx.NodeProto) -> list[str]:
    """What a node reads: its inputs, and what its subgraphs read from enclosing graphs."""
    out = list(n.input)
    for _, g in graphs_of(n):
        inside = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for m in g.node for o in m.output}
        out += [x for m in g.node for x in reads(m) if x not in inside]
        out += [o.name for o in g.output if o.name not in inside]
    return out


def _sub_model(proto: onnx.ModelProto, nodes: list, inputs: dict[str, np.ndarray], outputs: list[str]):
    """The nodes as a model reading `inputs` (declared by dtype and rank only: every input
    set's shapes run through one session)."""
    inits = {t.name: t for t in proto.graph.initializer}
    used = {x for n in nodes for x in reads(n) if x in inits}
    graph = helper.make_graph(
        nodes, "segment",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
         for k, a in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs], [inits[k] for k in sorted(used)])
    return helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                             functions=list(proto.functions))


def _run_sub(model: OnnxModel, proto, nodes, envs: list, outputs: list[str]) -> list:
    """The nodes run by one session on each environment (name -> array); per environment
    its `outputs`, or the error (the first environment's is raised)."""
    from attn_opt.core.ir.onnx_runs import COUNTS, counted

    produced = {o for n in nodes for o in n.output}
    inits = _sizes(proto)
    names = [x for x in dict.fromkeys(x for n in nodes for x in reads(n)) if x and x not in produced and x not in inits]
    ins = [{x: env[x] for x in names if x in env} for env in envs]
    sess = model.session(proto=_sub_model(proto, nodes, ins[0], outputs))  # its weights: `model`'s files
    counted(sum(inits[x] for x in {x for n in nodes for x in reads(n)} if x in inits))
    got = []
    for i, feed in enumerate(ins):
        try:
            got.append(dict(zip(outputs, sess.run(outputs, feed))))
            COUNTS["runs"] += 1
        except Exception as e:
            if not i:
                raise
            got.append(e)
    del sess
    return got


def _sizes(proto: onnx.ModelProto) -> dict[str, int]:
    """Bytes of each initializer."""
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in proto.graph.initializer}


def segments(proto: onnx.ModelProto, budget: int, nodes: list | None = None) -> list[list[int]]:
    """Indices into `nodes` (default: the graph's) cut where the weights a segment reads
    pass `budget` bytes."""
    sizes = _sizes(proto)
    out, cur, used = [], [], 0
    for i, n in enumerate(proto.graph.node if nodes is None else nodes):
        w = sum(sizes.get(x, 0) for x in set(reads(n)))
        if cur and used + w > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += w
    return out + ([cur] if cur else [])


def cone(nodes: list, wanted: set[str]) -> list:
    """The nodes the `wanted` values are computed from, in graph order: a run for a mask or
    a shape deep in the model computes that value's ancestors, not every layer before it."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    keep: set[int] = set()
    todo = [producer[w] for w in wanted if w in producer]
    while todo:
        i = todo.pop()
        if i not in keep:
            keep.add(i)
            todo += [producer[x] for x in reads(nodes[i]) if x in producer and producer[x] not in keep]
    return [nodes[i] for i in sorted(keep)]


def static_shape_nodes(nodes: list, sizes: dict) -> list:
    """`nodes` with each Shape node whose input static inference sized (`sizes`: name ->
    dims, for the feeds' shapes) replaced by a Constant of that shape: a value that reads
    only the shape of, say, Q no longer makes a run compute Q's projections."""
    out = []
    for n in nodes:
        dims = sizes.get(n.input[0]) if n.op_type == "Shape" and n.domain in ("", "ai.onnx") and n.input else None
        if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
            out.append(n)
            continue
        a, r = {x.name: x.i for x in n.attribute}, len(dims)
        start, end = (min(max(x + r if x < 0 else x, 0), r) for x in (a.get("start", 0), a.get("end", r)))
        value = numpy_helper.from_array(np.array(dims[start:end], np.int64))
        out.append(helper.make_node("Constant", [], [n.output[0]], name=n.name, value=value))
    return out


def run_segmented(model: OnnxModel, feeds: dict, wanted: set[str], budget: int, sizes: dict | None = None) -> dict:
    """The `wanted` values of one run on `feeds`, computed segment by segment (`sizes`:
    the values' static shapes on these feeds, read instead of computed where a Shape
    node asks for one)."""
    proto = model.graph_proto()
    if sizes:
        nodes = static_shape_nodes(list(proto.graph.node), sizes)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return run_segmented_sets(model, proto, [(feeds, wanted)], budget)[0]


def run_segmented_sets(model: OnnxModel, proto, sets: list, budget: int) -> list:
    """Per (feeds, wanted names) set, the wanted values of one run on it, computed segment by
    segment: each segment is one session that every set runs through, so the weights are
    initialised once per segment whatever the number of sets. A set that fails (a variant
    the model does not run on) gives its error and is not run further; the first set's
    error is raised."""
    envs = [dict(f) for f, _ in sets]
    wanted = [w for _, w in sets]
    every = set().union(*wanted)
    nodes = cone(list(proto.graph.node), every)  # only what the wanted values are computed from
    last = {}
    for i, n in enumerate(nodes):
        for x in reads(n):
            last[x] = i
    errors: dict[int, Exception] = {}
    for seg in segments(proto, budget, nodes):
        end = seg[-1]
        seg_nodes = [nodes[i] for i in seg]
        live = [i for i in range(len(sets)) if i not in errors]
        outs = [o for n in seg_nodes for o in n.output if o and (last.get(o, -1) > end or o in every)]
        if outs and live:
            for i, got in zip(live, _run_sub(model, proto, seg_nodes, [envs[i] for i in live], outs)):
                if isinstance(got, Exception):
                    errors[i] = got
                else:
                    envs[i].update(got)
        envs = [{x: a for x, a in env.items() if x in wanted[i] or last.get(x, -1) > end}
                for i, env in enumerate(envs)]
    return [errors[i] if i in errors else {k: envs[i][k] for k in wanted[i] if k in envs[i]}
            for i in range(len(sets))]


def check_sites(before: OnnxModel, after: OnnxModel, site_ids, feeds) -> dict:
    """Per rewritten site: its new nodes on the old model's activations vs the old output."""
    proto = after.graph_proto()
    ids = set(site_ids)
    tagged: dict[str, list] = {}
    for n in proto.graph.node:
        tag = next((p.value for p in n.metadata_props if p.key == SITE_TAG), None)
        if tag in ids:
            tagged.setdefault(tag, []).append(n)
    plans, wanted = {}, set()
    before_nodes = {n.name: n for n in before.graph_proto().graph.node if n.name}
    inits = {t.name for t in proto.graph.initializer}
    for sid, nodes in tagged.items():
        names = {n.name for n in nodes}
        produced = {o for n in nodes for o in n.output}
        inputs = {x for n in nodes for x in n.input if x and x not in produced and x not in inits}
        pairs = []  # (new output in `after`, old value in `before`) read by the same consumer slot
        for c in proto.graph.node:
            if c.name in names or c.name not in before_nodes:
                continue
            for j, x in enumerate(c.input):
                if x in produced and j < len(before_nodes[c.name].input):
                    pairs.append((x, before_nodes[c.name].input[j]))
        outs = {o.name for o in proto.graph.output}
        pairs += [(x, x) for x in produced if x in outs]  # a site output that is a graph output keeps its name
        plans[sid] = (nodes, inputs, dict(pairs))
        wanted |= inputs | set(dict(pairs).values())
    from attn_opt.core.ir.onnx_runs import segment_budget

    budget = segment_budget(before.weight_bytes(), parts=len(tagged))  # about a layer's weights
    env = run_segmented(before, feeds, wanted, budget)
    result = {}
    for sid, (nodes, inputs, pairs) in plans.items():
        if not pairs or any(x not in env for x in inputs):
            continue
        got = _run_sub(after, proto, nodes, [env], list(pairs))[0]
        per = {new: fidelity.compare(env[old], got[new]) for new, old in pairs.items() if old in env}
        if per:
            result[sid] = fidelity.worst(per)
    return result
