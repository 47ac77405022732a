"""Concrete shapes inside an ONNX model's regions, for FLOP counting (core/ir/onnx_flops.py).

Static shape inference already sizes the values of If/Loop/Scan subgraphs (their
`value_info`), but not a local function's body, whose sizes depend on the call. Each call
is inferred on its own: the body wrapped as a model whose inputs have the call's input
types, attribute references bound to the call's attributes. Its values are keyed
`<call node>::<value>` (nested calls: `<outer call>::<inner call>::<value>`), so two calls
of one function at different lengths are counted at their own sizes; where inference
leaves a gap, the body's values as probed on its first call fill it (unscoped names).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

SEP = "::"


def graphs_of(node: onnx.NodeProto):
    """(attribute name, subgraph) of each graph attribute of `node`."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}{i}", g


def all_graphs(graph: onnx.GraphProto):
    """`graph` and every subgraph in it, depth first."""
    yield graph
    for n in graph.node:
        for _, g in graphs_of(n):
            yield from all_graphs(g)


def functions_of(proto: onnx.ModelProto) -> dict:
    return {(f.domain, f.name): f for f in proto.functions}


def collect(graph: onnx.GraphProto, out: dict, types: dict, prefix: str = "") -> None:
    """Static sizes and types of a graph's (and its subgraphs') values, keyed with `prefix`."""
    for g in all_graphs(graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                types.setdefault(prefix + vi.name, vi.type)
            if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                out[prefix + vi.name] = tuple(d.dim_value for d in t.shape.dim)
        for init in g.initializer:
            out[prefix + init.name] = tuple(init.dims)
            types.setdefault(prefix + init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        out[prefix + n.output[0]] = tuple(a.t.dims)


def calls(proto: onnx.ModelProto, out: dict, types: dict) -> None:
    """Sizes of every function body at each of its calls (anywhere), keyed by call."""
    fns = functions_of(proto)

    def visit(graph, prefix: str, depth: int):
        for g in all_graphs(graph):
            for n in g.node:
                f = fns.get((n.domain, n.op_type))
                if f is None or n.domain in ("", "ai.onnx") or depth > 8:
                    continue
                scope = f"{prefix}{n.name}{SEP}"
                body = _infer_call(proto, f, n, [types.get(prefix + i) for i in n.input])
                if body is None:
                    continue
                collect(body, out, types, scope)
                visit(body, scope, depth + 1)

    visit(proto.graph, "", 0)


def _infer_call(proto: onnx.ModelProto, f: onnx.FunctionProto, call: onnx.NodeProto,
                in_types) -> onnx.GraphProto | None:
    """The function's body with inferred value_info for this call's input types, or None."""
    from attn_opt.core.ir.onnx_regions import bind

    if any(t is None for t in in_types[:len(f.input)]):
        return None
    nodes = [onnx.NodeProto() for _ in f.node]
    for a, b in zip(nodes, f.node):
        a.CopyFrom(b)
    attrs = {a.name: a for a in f.attribute_proto} | {a.name: a for a in call.attribute}
    bind(nodes, attrs)
    inputs = [helper.make_value_info(name, t) for name, t in zip(f.input, in_types)]
    graph = helper.make_graph(nodes, f.name, inputs, [onnx.ValueInfoProto(name=o) for o in f.output])
    own = {o.domain for o in f.opset_import}
    opsets = list(f.opset_import) + [o for o in proto.opset_import if o.domain not in own]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=proto.ir_version,
                              functions=list(proto.functions))
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # the first call's probed sizes fill in
        return None


def function_shapes(regions) -> dict[str, tuple]:
    """Static sizes of the values in each function body at its first call (`regions`: an
    onnx_regions.Regions), for the view: patterns read ranks and scalars."""
    out = {}
    host = helper.make_model(helper.make_graph([], "host", [], []), ir_version=regions.model.ir_version or 8,
                             opset_imports=[helper.make_opsetid(d, v) for d, v in regions.model.opset_imports.items()],
                             functions=[ir.serde.serialize_function(f) for f in regions.model.functions.values()])
    for key, fn in regions.model.functions.items():
        calls = regions.calls[key]
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
