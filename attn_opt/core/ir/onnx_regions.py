"""The graphs inside an ONNX model: local functions' bodies and control-flow subgraphs.

The top-level node list does not show attention in a local function (a node of a custom
domain that `model.functions` defines), in an `If` branch or in a `Loop` or `Scan` body,
nested to any depth. Each such graph is a *region*, named by a path:

    ""                          the model's graph
    function:Attn               the body of local function Attn (function:<domain>.<name>,
                                plus :<overload>, where two functions share a name)
    pad_if/then, pad_if/else    the branches of the If node named pad_if
    loop/body, scan/body        the body of the Loop node loop, of the Scan node scan
    function:Attn/pad_if/then   nested: the region the node is in, then the node

A site's id is its region's path and its index there (`pad_if/then/a0`); top-level sites
keep `a0`, `a1`, ... Unnamed nodes that own or live in a region are named once (`If_3`),
and a name a region repeats (sibling branches and function bodies may) becomes
`<path>/<name>`, so every value and node name is unique model-wide: probes, records and
FLOP counts find values by name. Top-level names never change.

One ONNX Runtime run returns top-level values only, so a region is run alone (`probe`):
its graph as a model whose inputs are what it reads from outside, fetched from the run
that contains it — the values it captures from enclosing graphs, and its formal inputs:
a Loop body's on its first iteration (iteration 0, the loop's condition and initial
values), a Scan body's on its first slice, a function body's on its first call. Both
branches of an If are run, whichever the inputs take.
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
from attn_opt.core.graph import Region as RegionInfo

SHORT = {"then_branch": "then", "else_branch": "else", "body": "body"}
RUNS = {"If", "Loop", "Scan"}  # control flow whose subgraphs run alone; others are found, not probed
HOW = {"If": "by running the branch alone on the values it reads (whichever branch the inputs take)",
       "Loop": "on its first iteration (iteration 0, the loop's condition and initial values)",
       "Scan": "on its first slice of each scanned input", "function": "on its first call"}


@dataclass(eq=False)
class Region:
    path: str
    body: object  # the ir.Graph, or the ir.Function whose body it is
    kind: str  # "graph" (the model's), "function", "then", "else", "body", or the attribute's name
    parent: "Region | None"  # the region its owner node is in (None: the model, a function)
    owner: ir.Node | None = None  # the node whose attribute holds it
    function: ir.Function | None = None  # set on a function's region

    @property
    def graph(self) -> ir.Graph:
        return self.body.graph if isinstance(self.body, ir.Function) else self.body

    def enclosing_function(self) -> ir.Function | None:
        r = self
        while r is not None and r.function is None:
            r = r.parent
        return r.function if r is not None else None


def _graphs(node: ir.Node):
    """(label, graph) of each subgraph attribute of `node` (an If's then branch first)."""
    for name, attr in sorted(node.attributes.items(), key=lambda kv: kv[0] != "then_branch"):
        if attr.type == ir.AttributeType.GRAPH:
            yield SHORT.get(name, name), attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            for i, g in enumerate(attr.as_graphs()):
                yield f"{name}{i}", g


def function_labels(model: ir.Model) -> dict:
    """Each function's region path: function:<name>, qualified where names repeat."""
    names = defaultdict(int)
    for fn in model.functions.values():
        names[fn.name] += 1
    return {key: f"function:{fn.name}" if names[fn.name] == 1 else
            f"function:{fn.domain}.{fn.name}" + (f":{fn.overload}" if fn.overload else "")
            for key, fn in model.functions.items()}


def walk(model: ir.Model) -> list[Region]:
    """Every region, each before the ones inside it: the model's graph and what it holds,
    then each function's body and what it holds."""
    out = []

    def visit(r: Region):
        out.append(r)
        for node in r.body:
            for label, g in _graphs(node):
                prefix = f"{r.path}/" if r.path else ""
                visit(Region(f"{prefix}{node.name}/{label}", g, label.rstrip("0123456789") if label[-1:].isdigit()
                             else label, r, node))

    visit(Region("", model.graph, "graph", None))
    labels = function_labels(model)
    for key, fn in model.functions.items():
        visit(Region(labels[key], fn, "function", None, function=fn))
    return out


def _defined(body) -> list[ir.Value]:
    """Values a graph (not the graphs inside it) defines: inputs, initializers, node outputs."""
    vals = list(body.inputs)
    if not isinstance(body, ir.Function):
        vals += list(body.initializers.values())
    return vals + [o for n in body for o in n.outputs]


def settle_names(model: ir.Model) -> None:
    """Name the unnamed nodes that own or live in a region, and rename what a region repeats
    (see the module's docstring). Idempotent: a second call changes nothing."""
    values, nodes = set(), set()
    top = model.graph
    values.update(v.name for v in _defined(top) if v.name)
    for i, n in enumerate(top):
        if not n.name and any(True for _ in _graphs(n)):
            n.name = _fresh(f"{n.op_type}_{i}", nodes)
        if n.name:
            nodes.add(n.name)

    def settle(body, path: str):
        for i, n in enumerate(body):
            if not n.name or n.name in nodes:
                n.name = _fresh(f"{path}/{n.name or f'{n.op_type}_{i}'}", nodes)
            nodes.add(n.name)
        for v in _defined(body):
            if v.name and v.name in values:
                v.name = _fresh(f"{path}/{v.name}", values)
            if v.name:
                values.add(v.name)
        for n in body:
            for label, g in _graphs(n):
                settle(g, f"{path}/{n.name}/{label}" if path else f"{n.name}/{label}")

    for n in top:
        for label, g in _graphs(n):
            settle(g, f"{n.name}/{label}")
    labels = function_labels(model)
    for key, fn in model.functions.items():
        settle(fn, labels[key])


def _fresh(name: str, taken: set) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def free_values(body) -> list[ir.Value]:
    """The values a region's nodes (and the graphs inside them) read from enclosing graphs."""
    inside, free = set(), {}
    graphs = [body]
    for n in ir.traversal.RecursiveGraphIterator(body):
        for _, g in _graphs(n):
            graphs.append(g)
    for g in graphs:
        inside.update(id(v) for v in _defined(g))
    for n in ir.traversal.RecursiveGraphIterator(body):
        for v in n.inputs:
            if v is not None and id(v) not in inside:
                free.setdefault(id(v), v)
    for v in body.outputs:  # a branch may return an outer value as it is
        if id(v) not in inside:
            free.setdefault(id(v), v)
    return list(free.values())


@dataclass
class _Plan:
    """How to run a region alone: the outer values it needs, and its formal inputs from them."""

    region: Region
    outer: list[str]
    formal: Callable[[dict], dict]  # outer arrays -> formal input arrays
    consts: list[ir.Value]  # outer initializers it reads (copied in as initializers)
    call: ir.Node | None = None  # a function's call whose attributes bind its body's references


class Regions:
    """The regions of one model (names settled), where each value and node is, and `probe`."""

    def __init__(self, model: ir.Model, folder: str | None = None):
        settle_names(model)
        self.model, self.folder = model, folder
        self.all = walk(model)
        self.by_path = {r.path: r for r in self.all}
        self.of_value: dict[str, Region] = {}
        self.of_node: dict[int, Region] = {}
        self.calls: dict = defaultdict(list)  # function key -> call nodes, in walk order
        self.errors: dict[str, str] = {}
        for r in self.all:
            for v in _defined(r.body):
                if v.name:
                    self.of_value.setdefault(v.name, r)
            for n in r.body:
                self.of_node[id(n)] = r
                key = (n.domain, n.op_type, n.overload)
                if key in model.functions:
                    self.calls[key].append(n)

    def region_of(self, name: str) -> str:
        r = self.of_value.get(name)
        return r.path if r is not None else ""

    def info(self) -> dict[str, RegionInfo]:
        """The neutral description of every region but the model's graph (core/graph.py)."""
        out = {}
        for r in self.all[1:]:
            fn = r.enclosing_function()
            if r.function is not None:
                calls = len(self.calls[fn.identifier()])
                what, how = f"the body of local function {fn.name}", HOW["function"]
            else:
                calls, op = 1, r.owner.op_type
                what = (f"the {r.kind} branch of If {r.owner.name}" if op == "If" else
                        f"the body of {op} {r.owner.name}" if r.kind == "body" else
                        f"subgraph {r.kind} of {op} {r.owner.name}")
                how = HOW.get(op, f"not run alone: only If, Loop and Scan subgraphs are, not {op}'s")
            out[r.path] = RegionInfo(r.path, r.kind, what, how, calls, fn is not None, self.errors.get(r.path))
        return out

    def function_shapes(self) -> dict[str, tuple]:
        """Static sizes of the values in each function body at its first call (shape inference
        does not enter function bodies; patterns read ranks and scalars)."""
        from attn_opt.core.ir.onnx_region_shapes import _infer_call

        out = {}
        host = helper.make_model(helper.make_graph([], "host", [], []), ir_version=self.model.ir_version or 8,
                                 opset_imports=[helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()],
                                 functions=[ir.serde.serialize_function(f) for f in self.model.functions.values()])
        for key, fn in self.model.functions.items():
            calls = self.calls[key]
            if not calls or any(v is None or v.type is None for v in calls[0].inputs):
                continue
            types = [ir.serde.serialize_value(v).type for v in calls[0].inputs]
            body = _infer_call(host, ir.serde.serialize_function(fn), ir.serde.serialize_node(calls[0]), types)
            for vi in (list(body.input) + list(body.value_info) if body is not None else ()):
                t = vi.type.tensor_type
                if t.HasField("shape"):
                    out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                         for d in t.shape.dim)
        return out

    # ---- running a region alone -------------------------------------------------------------
    def _plan(self, r: Region, call: int = 0) -> _Plan | str:
        """How to run `r` alone, or why it cannot be."""
        if r.function is not None:
            calls = self.calls[r.function.identifier()]
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

    def _run(self, plan: _Plan, got: dict, names: set[str]) -> dict:
        from attn_opt.core.ir.onnx_model import OnnxModel

        feeds = plan.formal(got)
        feeds.update({n: got[n] for n in plan.outer if n in got and self.region_of(n) != plan.region.path})
        proto = self._standalone(plan, feeds)
        have = {i.name for i in proto.graph.input}
        wanted = [n for n in names if n not in have]
        out = OnnxModel.from_proto(proto, self.folder).run(feeds, wanted) if wanted else {}
        out.update({n: feeds[n] for n in names if n in have})
        return {n: out[n] for n in names if n in out}

    def _standalone(self, plan: _Plan, feeds: dict) -> onnx.ModelProto:
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
            call = plan.call or (self.calls[fn.identifier()] or [None])[0]
            _bind(nodes, _call_attrs(call, fn))
        inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), None)
                  for k, a in feeds.items()]
        graph = helper.make_graph(nodes, f"region {r.path}", inputs, outputs, inits)
        imports = {d: v for d, v in self.model.opset_imports.items()} | opsets
        return helper.make_model(graph, ir_version=self.model.ir_version or 8,
                                 opset_imports=[helper.make_opsetid(d, v) for d, v in imports.items()],
                                 functions=[ir.serde.serialize_function(f) for f in self.model.functions.values()])

    def probe(self, feeds: dict, names, top: Callable[[list[str]], dict], call: dict | None = None) -> dict:
        """The values called `names`, wherever they are, on `feeds`: `top(names)` runs the
        model for the top-level ones (what it returns, the model's outputs too, is kept);
        each region holding a wanted value runs alone on what the run containing it gave.
        `call`: function region path -> which call to read it on (default the first).
        A region that cannot run leaves its values out; `errors` says why."""
        want: dict[str, set] = defaultdict(set)
        for n in names:
            want[self.region_of(n)].add(n)
        plans, todo = {}, [p for p in want if p]
        while todo:
            path = todo.pop()
            if path in plans:
                continue
            plans[path] = self._plan(self.by_path[path], (call or {}).get(path, 0))
            if isinstance(plans[path], str):
                continue
            for n in plans[path].outer:
                p = self.region_of(n)
                want[p].add(n)
                if p and p not in plans:
                    todo.append(p)
        rest = [n for n in want.get("", ()) if n not in feeds]
        got = dict(top(sorted(rest)))
        got.update({n: feeds[n] for n in want.get("", ()) if n in feeds})
        done, pending = {""}, dict(plans)
        while pending:
            ready = [p for p, plan in pending.items() if isinstance(plan, str)
                     or {self.region_of(n) for n in plan.outer} <= done]
            for p in ready or list(pending):  # nothing ready: a cycle, which ONNX forbids
                plan = pending.pop(p)
                try:
                    if isinstance(plan, str):
                        raise RuntimeError(plan)
                    got.update(self._run(plan, got, want[p]))
                    self.errors.pop(p, None)
                except Exception as e:  # the region's sites keep what static shapes say, and why
                    self.errors[p] = first_line(e)[:300]
                done.add(p)
        return got

    def probe_calls(self, feeds: dict, names: list[str], top: Callable[[list[str]], dict]) -> list[dict]:
        """The values `names` of one function's body (all in it, not in a graph inside it) on
        each call after its first, in order; {} for a call that could not run alone."""
        r = self.by_path[self.region_of(names[0])]
        plans = [self._plan(r, j) for j in range(1, len(self.calls[r.function.identifier()]))]
        got = self.probe(feeds, [n for p in plans for n in p.outer], top)
        out = []
        for p in plans:
            try:
                out.append(self._run(p, got, set(names)))
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


def _bind(nodes: list[onnx.NodeProto], values: dict[str, onnx.AttributeProto]) -> None:
    """Replace each attribute reference (ref_attr_name) with the call's value, in place."""
    for n in nodes:
        keep = []
        for a in n.attribute:
            if a.ref_attr_name:
                if a.ref_attr_name not in values:
                    continue  # an optional attribute the call leaves out
                b = onnx.AttributeProto()
                b.CopyFrom(values[a.ref_attr_name])
                b.name = a.name
                a = b
            if a.type == onnx.AttributeProto.GRAPH:
                _bind(list(a.g.node), values)
            keep.append(a)
        del n.attribute[:]
        n.attribute.extend(keep)
