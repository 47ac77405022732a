"""Running a region of an ONNX model alone (core/ir/onnx_regions.py names the regions).

One ONNX Runtime run returns top-level values only, so a region is run alone: its graph
as a model whose inputs are what it reads from outside, fetched from the run that
contains it — the values it captures from enclosing graphs, and its formal inputs: a
Loop body's on its first iteration (iteration 0, the loop's condition and initial
values), a Scan body's on its first slice of each scanned input, a function body's on its
first call (its attribute references bound to that call's attributes). Both branches of
an If are run, whichever the inputs take. Regions inside regions run after the one that
holds them; a region that cannot run leaves its values out and says why
(`Regions.errors`), so its sites keep what static shapes say.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from attn_opt.core.errors import first_line
from attn_opt.core.ir.onnx_regions import Region, bind, free_values

RUNS = {"If", "Loop", "Scan"}  # control flow whose subgraphs run alone; others are found, not probed


@dataclass
class _Plan:
    """How to run a region alone: the outer values it needs, and its formal inputs from them."""

    region: Region
    outer: list[str]
    formal: Callable[[dict], dict]  # outer arrays -> formal input arrays
    consts: list[ir.Value]  # outer initializers it reads (copied in as initializers)
    call: ir.Node | None = None  # a function's call whose attributes bind its body's references


def _plan(regions, r: Region, call: int = 0) -> _Plan | str:
    """How to run `r` alone, or why it cannot be."""
    if r.function is not None:
        calls = regions.calls[r.function.identifier()]
        if call >= len(calls):
            return "the function is never called, so its values were not probed"
        node = calls[call]
        pairs = [(f.name, a.name) for f, a in zip(r.body.inputs, node.inputs) if a is not None and a.name]
        return _Plan(r, [a for _, a in pairs], lambda got: {f: got[a] for f, a in pairs}, [], node)
    owner = r.owner.op_type if r.owner is not None and r.owner.domain in ("", "ai.onnx") else None
    if owner not in RUNS:
        return f"a {r.owner.op_type} subgraph is not run alone (only If, Loop and Scan subgraphs are)"
    free = free_values(r.body)
    consts = [v for v in free if v.const_value is not None and v.is_initializer()]
    outer = [v.name for v in free if v not in consts]
    formal = lambda got: {}  # noqa: E731
    if owner == "Loop":
        formal = _loop_inputs(r)
    elif owner == "Scan":
        formal = _scan_inputs(r)
    if owner in ("Loop", "Scan"):
        outer += [v.name for v in r.owner.inputs if v is not None and v.name]
    return _Plan(r, list(dict.fromkeys(outer)), formal, consts)


def _run(regions, plan: _Plan, got: dict, names: set[str]) -> dict:
    from attn_opt.core.ir.onnx_model import OnnxModel

    feeds = plan.formal(got)
    feeds.update({n: got[n] for n in plan.outer if n in got and regions.region_of(n) != plan.region.path})
    proto = _standalone(regions, plan, feeds)
    have = {i.name for i in proto.graph.input}
    wanted = [n for n in names if n not in have]
    # ORT's graph optimizations off: on an If branch run alone they can break a broadcast that
    # the model runs (the no-cache branch of Optimum's merged T5 decoder: "4 by 16" in EncDecAttention)
    out = OnnxModel.from_proto(proto, regions.folder).run(feeds, wanted, optimize=False) if wanted else {}
    out.update({n: feeds[n] for n in names if n in have})
    return {n: out[n] for n in names if n in out}


def _standalone(regions, plan: _Plan, feeds: dict) -> onnx.ModelProto:
    r = plan.region
    if r.function is not None:
        fp = ir.serde.serialize_function(r.function)
        nodes, inits, outputs = list(fp.node), [], [onnx.ValueInfoProto(name=o) for o in fp.output]
        opsets = {o.domain: o.version for o in fp.opset_import}
    else:
        gp = ir.serde.serialize_graph(r.graph)
        nodes, inits, outputs = list(gp.node), list(gp.initializer), list(gp.output)
        opsets = {}
        inits += [ir.serde.serialize_tensor(v.const_value) for v in plan.consts]
        for t, v in zip(inits[len(gp.initializer):], plan.consts):
            t.name = v.name
    fn = r.enclosing_function()
    if fn is not None:  # attribute references bind to the call's attributes
        call = plan.call or (regions.calls[fn.identifier()] or [None])[0]
        bind(nodes, _call_attrs(call, fn))
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), None)
              for k, a in feeds.items()]
    graph = helper.make_graph(nodes, f"region {r.path}", inputs, outputs, inits)
    imports = {d: v for d, v in regions.model.opset_imports.items()} | opsets
    return helper.make_model(graph, ir_version=regions.model.ir_version or 8,
                             opset_imports=[helper.make_opsetid(d, v) for d, v in imports.items()],
                             functions=[ir.serde.serialize_function(f) for f in regions.model.functions.values()])


def probe(regions, feeds: dict, names, top: Callable[[list[str]], dict], call: dict | None = None) -> dict:
    """The values called `names`, wherever they are, on `feeds`: `top(names)` runs the
    model for the top-level ones (what it returns, the model's outputs too, is kept);
    each region holding a wanted value runs alone on what the run containing it gave.
    `call`: function region path -> which call to read it on (default the first).
    A region that cannot run leaves its values out; `errors` says why."""
    want: dict[str, set] = defaultdict(set)
    for n in names:
        want[regions.region_of(n)].add(n)
    plans, todo = {}, [p for p in want if p]
    while todo:
        path = todo.pop()
        if path in plans:
            continue
        plans[path] = _plan(regions, regions.by_path[path], (call or {}).get(path, 0))
        if isinstance(plans[path], str):
            continue
        for n in plans[path].outer:
            p = regions.region_of(n)
            want[p].add(n)
            if p and p not in plans:
                todo.append(p)
    rest = [n for n in want.get("", ()) if n not in feeds]
    got = dict(top(sorted(rest)))
    got.update({n: feeds[n] for n in want.get("", ()) if n in feeds})
    done, pending = {""}, dict(plans)
    while pending:
        ready = [p for p, plan in pending.items() if isinstance(plan, str)
                 or {regions.region_of(n) for n in plan.outer} <= done]
        for p in ready or list(pending):  # nothing ready: a cycle, which ONNX forbids
            plan = pending.pop(p)
            try:
                if isinstance(plan, str):
                    raise RuntimeError(plan)
                got.update(_run(regions, plan, got, want[p]))
                regions.errors.pop(p, None)
            except Exception as e:  # the region's sites keep what static shapes say, and why
                regions.errors[p] = first_line(e)[:300]
            done.add(p)
    return got


def probe_calls(regions, feeds: dict, names: list[str], top: Callable[[list[str]], dict]) -> list[dict]:
    """The values `names` of one function's body (all in it, not in a graph inside it) on
    each call after its first, in order; {} for a call that could not run alone."""
    r = regions.by_path[regions.region_of(names[0])]
    plans = [_plan(regions, r, j) for j in range(1, len(regions.calls[r.function.identifier()]))]
    got = probe(regions, feeds, [n for p in plans for n in p.outer], top)
    out = []
    for p in plans:
        try:
            out.append(_run(regions, p, got, set(names)))
        except Exception:  # said by the caller: the calls could not be compared
            out.append({})
    return out


def _loop_inputs(r: Region):
    """A Loop body's formal inputs on iteration 0: the count, the loop's condition, its initial values."""
    body, loop = r.body, r.owner

    def formal(got):
        out = {body.inputs[0].name: np.zeros([1] * _rank(body.inputs[0], 0), np.int64)}
        cond = loop.inputs[1] if len(loop.inputs) > 1 else None
        c = got[cond.name] if cond is not None and cond.name else np.ones([1] * _rank(body.inputs[1], 0), np.bool_)
        out[body.inputs[1].name] = c
        for f, v in zip(body.inputs[2:], loop.inputs[2:]):
            out[f.name] = got[v.name]
        return out

    return formal


def _scan_inputs(r: Region):
    """A Scan body's formal inputs on its first slice (the last, for a reversed scan input)."""
    body, scan = r.body, r.owner
    m = scan.attributes["num_scan_inputs"].as_int()
    n = len(body.inputs) - m
    axes = _ints(scan, "scan_input_axes", [0] * m)
    dirs = _ints(scan, "scan_input_directions", [0] * m)

    def formal(got):
        out = {f.name: got[v.name] for f, v in zip(body.inputs[:n], scan.inputs[:n])}
        for j, (f, v) in enumerate(zip(body.inputs[n:], scan.inputs[n:])):
            a = got[v.name]
            out[f.name] = np.take(a, -1 if dirs[j] else 0, axis=axes[j])
        return out

    return formal


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    a = node.attributes.get(name)
    return list(a.as_ints()) if a is not None else default


def _rank(v: ir.Value, default: int) -> int:
    return len(v.shape) if v.shape is not None else default


def _call_attrs(call: ir.Node | None, fn: ir.Function) -> dict[str, onnx.AttributeProto]:
    """A call's attribute values by name, the function's defaults where the call has none."""
    out = {}
    for name, attr in fn.attributes.items():
        if attr.value is not None:
            out[name] = ir.serde.serialize_attribute(attr)
    if call is not None:
        for name, attr in call.attributes.items():
            out[name] = ir.serde.serialize_attribute(attr)
    return out
