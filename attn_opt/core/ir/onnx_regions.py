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
FLOP counts find values by name. Top-level names never change. Values inside a region
are probed by running it alone (onnx_region_probe.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import onnx
import onnx_ir as ir

from attn_opt.core.graph import Region as RegionInfo

SHORT = {"then_branch": "then", "else_branch": "else", "body": "body"}
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
    """(label, kind, graph) of each subgraph attribute of `node` (an If's then branch first):
    then/else/body, or the attribute's name (numbered in a list of graphs)."""
    for name, attr in sorted(node.attributes.items(), key=lambda kv: kv[0] != "then_branch"):
        if attr.type == ir.AttributeType.GRAPH:
            yield SHORT.get(name, name), SHORT.get(name, name), attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            for i, g in enumerate(attr.as_graphs()):
                yield f"{name}{i}", name, g


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
            for label, kind, g in _graphs(node):
                prefix = f"{r.path}/" if r.path else ""
                visit(Region(f"{prefix}{node.name}/{label}", g, kind, r, node))

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
    nodes.update(n.name for n in top if n.name)
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
            for label, _, g in _graphs(n):
                settle(g, f"{path}/{n.name}/{label}" if path else f"{n.name}/{label}")

    for n in top:
        for label, _, g in _graphs(n):
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
        for _, _, g in _graphs(n):
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

    def probe(self, feeds: dict, names, top: Callable[[list[str]], dict], call: dict | None = None) -> dict:
        """The values called `names`, wherever they are, on `feeds` (onnx_region_probe.py)."""
        from attn_opt.core.ir.onnx_region_probe import probe

        return probe(self, feeds, names, top, call)

    def probe_calls(self, feeds: dict, names: list[str], top: Callable[[list[str]], dict]) -> list[dict]:
        """One function body's values on each call after its first (onnx_region_probe.py)."""
        from attn_opt.core.ir.onnx_region_probe import probe_calls

        return probe_calls(self, feeds, names, top)

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



def bind(nodes: list[onnx.NodeProto], values: dict[str, onnx.AttributeProto]) -> None:
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
                bind(list(a.g.node), values)
            keep.append(a)
        del n.attribute[:]
        n.attribute.extend(keep)
