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
from onnx import helper

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
    inits = {t.name: t for t in proto.graph.initializer}
    used = {x for n in nodes for x in reads(n) if x in inits}
    graph = helper.make_graph(
        nodes, "segment",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
         for k, a in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs], [inits[k] for k in sorted(used)])
    return helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                             functions=list(proto.functions))


def _run_sub(model: OnnxModel, proto, nodes, env: dict, outputs: list[str]) -> dict[str, np.ndarray]:
    produced = {o for n in nodes for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    ins = {x: env[x] for n in nodes for x in reads(n) if x and x not in produced and x not in inits}
    sub = OnnxModel.from_proto(_sub_model(proto, nodes, ins, outputs), model.folder)
    return sub.run(ins, outputs)


def segments(proto: onnx.ModelProto, budget: int) -> list[list[int]]:
    """Node indices cut where the weights a segment reads pass `budget` bytes."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in proto.graph.initializer}
    out, cur, used = [], [], 0
    for i, n in enumerate(proto.graph.node):
        w = sum(sizes.get(x, 0) for x in set(reads(n)))
        if cur and used + w > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += w
    return out + ([cur] if cur else [])


def run_segmented(model: OnnxModel, feeds: dict, wanted: set[str], budget: int) -> dict:
    """The `wanted` values of one run on `feeds`, computed segment by segment."""
    proto = model.graph_proto()
    nodes = list(proto.graph.node)
    last = {}
    for i, n in enumerate(nodes):
        for x in reads(n):
            last[x] = i
    for o in proto.graph.output:
        last[o.name] = len(nodes)
    env = dict(feeds)
    segs = segments(proto, budget)
    stop = max((i for i, n in enumerate(nodes) if any(o in wanted for o in n.output)), default=-1)
    for seg in segs:
        if seg[0] > stop:  # nothing wanted comes later: the rest of the model is not run
            break
        end = seg[-1]
        seg_nodes = [nodes[i] for i in seg]
        outs = [o for n in seg_nodes for o in n.output if o and (last.get(o, -1) > end or o in wanted)]
        if outs:
            env.update(_run_sub(model, proto, seg_nodes, env, outs))
        env = {x: a for x, a in env.items() if x in wanted or last.get(x, -1) > end}
    return {k: env[k] for k in wanted if k in env}


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
    budget = max(before.weight_bytes() // max(1, len(tagged)), 64 << 20)
    env = run_segmented(before, feeds, wanted, budget)
    result = {}
    for sid, (nodes, inputs, pairs) in plans.items():
        if not pairs or any(x not in env for x in inputs):
            continue
        got = _run_sub(after, proto, nodes, env, list(pairs))
        per = {new: fidelity.compare(env[old], got[new]) for new, old in pairs.items() if old in env}
        if per:
            result[sid] = fidelity.worst(per)
    return result
