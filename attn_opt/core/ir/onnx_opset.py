"""Opset conversion of a whole model: its graph, the subgraphs in it, and its local functions.

`onnx.version_converter` converts the graph and its If/Loop/Scan subgraphs but drops
`model.functions` (onnx 1.23: the converted model has none, and converting to 23 with
functions present can fail outright), and it drops node metadata (the exporters' module
scopes, which give layers). Here the functions are converted one by one, each body
wrapped as a model of its own, and every node's metadata comes back by name.
"""

from __future__ import annotations

import onnx
from onnx import helper

from attn_opt.core.errors import UserError, first_line


def lowest_opset(model) -> int:
    """The lowest default-domain opset of an onnx_ir model's graph and its functions."""
    have = [model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))]
    have += [f.opset_imports[d] for f in model.functions.values() for d in ("", "ai.onnx") if d in f.opset_imports]
    return min(have)


def _nodes(graph: onnx.GraphProto):
    """Every node of a graph and of the graphs inside it."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _nodes(g)


def _all_nodes(proto: onnx.ModelProto):
    yield from _nodes(proto.graph)
    for f in proto.functions:
        yield from _nodes(helper.make_graph(f.node, f.name, [], []))


def convert(proto: onnx.ModelProto, need: int) -> onnx.ModelProto:
    """The model at opset `need`: graph, subgraphs and local functions; node metadata kept."""
    meta = {n.name: list(n.metadata_props) for n in _all_nodes(proto) if n.name and n.metadata_props}
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    del work.functions[:]
    new = onnx.version_converter.convert_version(work, need)
    for f in proto.functions:
        new.functions.append(_function(f, need, proto))
    for n in _all_nodes(new):
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])
    return new


def _function(f: onnx.FunctionProto, need: int, proto: onnx.ModelProto) -> onnx.FunctionProto:
    """One local function's body converted: wrapped as a model (inputs untyped), converted,
    unwrapped. The converter drops attribute references (ref_attr_name), so they are taken
    off each node before and put back on the node of the same name after."""
    have = next((o.version for o in f.opset_import if o.domain in ("", "ai.onnx")), None)
    if have is None or have >= need:
        return f
    nodes, refs = [], {}
    for i, n in enumerate(f.node):
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = m.name or f"attn_opt_node_{i}"
        if any(a.ref_attr_name for a in m.attribute):
            refs[m.name] = [a for a in m.attribute if a.ref_attr_name]
            keep = [a for a in m.attribute if not a.ref_attr_name]
            del m.attribute[:]
            m.attribute.extend(keep)
        nodes.append(m)
    graph = helper.make_graph(nodes, f.name, [onnx.ValueInfoProto(name=i) for i in f.input],
                              [onnx.ValueInfoProto(name=o) for o in f.output])
    opsets = list(f.opset_import) + [o for o in proto.opset_import
                                     if o.domain not in {x.domain for x in f.opset_import}]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=proto.ir_version)
    try:
        body = onnx.version_converter.convert_version(model, need).graph
        by_name = {n.name: n for n in body.node}
        for name, attrs in refs.items():
            if name not in by_name:
                raise RuntimeError(f"the converter replaced node {name}, which reads the function's attributes")
            n = by_name[name]
            kept = [a for a in n.attribute if a.name not in {r.name for r in attrs}]
            del n.attribute[:]
            n.attribute.extend(kept + attrs)
    except Exception as e:
        raise UserError(f"cannot convert local function {f.domain}.{f.name} from opset {have} to {need} "
                        f"({first_line(e)})") from None
    out = onnx.FunctionProto()
    out.CopyFrom(f)
    del out.node[:]
    out.node.extend(body.node)
    for n in out.node:
        if n.name.startswith("attn_opt_node_"):
            n.name = ""
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = need
    return out
