"""ONNX adapter: load a model safely, view it through `core.graph`, run it in ORT."""

from __future__ import annotations

import ast
import functools
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from attn_opt.core.errors import UserError
from attn_opt.core.graph import FORM_KEY, GraphView, Node, Value, link
from attn_opt.core.inputs import InputSpec, make_inputs
from attn_opt.core.ir.onnx_model import OnnxModel
from attn_opt.core.errors import first_line as _first_line

MS_DOMAIN = "com.microsoft"


def load(model) -> OnnxModel:
    """A path, ModelProto or OnnxModel as an OnnxModel (weights left where they are)."""
    if isinstance(model, OnnxModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return OnnxModel.from_proto(model)
    om = OnnxModel.load(model)
    try:
        onnx.checker.check_model(om.checkable_proto())
    except Exception as e:
        raise UserError(f"{model} is not a valid ONNX model ({_first_line(e)})") from None
    return om


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Static shape inference with data propagation; the model unchanged if it fails.
    Data propagation only refines dims: where it gives a value another rank than plain
    inference does, plain inference's type is kept (onnx 1.23 gives a 1-D shape tensor in
    the no-cache branch of Optimum's merged decoder rank 4, and ORT refuses the model)."""
    try:
        out = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        return proto
    try:
        plain = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        return out
    _keep_ranks(out.graph, plain.graph)
    return out


def _rank(vi) -> int | None:
    t = vi.type.tensor_type
    return len(t.shape.dim) if vi.type.HasField("tensor_type") and t.HasField("shape") else None


def _keep_ranks(g: onnx.GraphProto, plain: onnx.GraphProto) -> None:
    """`g`'s value types where `plain` (the same graph, other inference) has another rank,
    in every subgraph too (walked side by side: a name may repeat across branches)."""
    ref = {v.name: v for v in plain.value_info}
    for v in g.value_info:
        r = ref.get(v.name)
        if r is not None and _rank(r) is not None and _rank(v) != _rank(r):
            v.CopyFrom(r)
    for n, m in zip(g.node, plain.node):
        for a, b in zip(n.attribute, m.attribute):
            if a.type == onnx.AttributeProto.GRAPH:
                _keep_ranks(a.g, b.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for x, y in zip(a.graphs, b.graphs):
                    _keep_ranks(x, y)


def with_shapes(om: OnnxModel) -> OnnxModel:
    """The model re-read from its weightless proto after shape inference, so its values
    carry inferred shapes; the weights are shared, not copied."""
    return shaped(om)[0]


def shaped(om: OnnxModel) -> tuple[OnnxModel, onnx.ModelProto]:
    """`with_shapes(om)` and the inferred proto it was read from (what `graph_proto()` of
    it would give, without serialising it again)."""
    proto = infer_shapes(om.graph_proto())
    model = ir.serde.deserialize_model(proto)
    if om.folder:
        ir.external_data.set_base_dir(model.graph, om.folder)
    return OnnxModel(model, om.folder, om.source, om.external_input, om._keep), proto


def _dims(shape) -> tuple | None:
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if getattr(d, "value", None) else None)
    return tuple(out)


def _dtype(v: ir.Value) -> str | None:
    try:
        return np.dtype(v.dtype.numpy()).name if v.dtype is not None else None
    except Exception:
        return None


def _scope(node: ir.Node) -> str | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:  # the dynamo exporter: ['', 'model', ..., 'model.encoder.layer.0.attention.self', 'softmax']
        return _module_scope(scopes)
    name = node.name or ""
    if name.startswith("/"):  # the TorchScript exporter: /model/encoder/layer.0/attention/self/Softmax
        return ".".join(p for p in name.strip("/").split("/")[:-1])
    return None


@functools.lru_cache(maxsize=4096)
def _module_scope(scopes: str) -> str | None:
    """The module of a dynamo name-scope list (parsed once per distinct list: the nodes of
    one module share it)."""
    try:
        names = ast.literal_eval(scopes)
        return names[-2] if len(names) >= 2 else None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _op(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _attr_value(a):
    v = a.value
    if a.type == ir.AttributeType.TENSOR:  # (not isinstance of the protocol: that check costs more than the rest)
        return v.numpy()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return list(v)
    return v


def view(om: OnnxModel) -> GraphView:
    """The neutral view of a model (values carry the shapes `with_shapes` inferred): its
    graph's nodes, each region's (core/ir/onnx_regions.py: local functions' bodies, If
    branches, Loop and Scan bodies) placed before the node that owns it, function bodies
    last. A value a region captures from an enclosing graph is the same view value there,
    so patterns follow it across the boundary."""
    from attn_opt.core.ir.onnx_region_shapes import function_shapes
    from attn_opt.core.ir.onnx_regions import Regions

    regions = Regions(om.ir, om.folder)
    inferred = function_shapes(regions) if om.ir.functions else {}
    values: dict[int, Value] = {}

    def val(v: ir.Value | None) -> Value | None:
        if v is None:
            return None
        key = id(v)
        if key not in values:
            const = None
            if v.const_value is not None:
                const = v.const_value.numpy()
            shape = _dims(v.shape) if v.shape is not None else inferred.get(v.name)  # a function body's: its first call's
            values[key] = Value(name=v.name or f"v{len(values)}", shape=shape,
                                dtype=_dtype(v),
                                const=const, is_input=v.is_graph_input(), is_output=v.is_graph_output(),
                                native=v)
        return values[key]

    inside = {}  # id(owner node) -> the regions its attributes hold
    for r in regions.all[1:]:
        if r.owner is not None:
            inside.setdefault(id(r.owner), []).append(r)
    nodes = []

    def add(r):
        for n in r.body:
            for sub in inside.get(id(n), ()):
                add(sub)
            nodes.append(_node(n, val, len(nodes), r.path))

    for r in regions.all:
        if r.parent is None:  # the model's graph and each function body; the others through their owners
            add(r)
    link(nodes)
    g = om.ir.graph
    gv = GraphView(nodes=nodes, inputs=[val(v) for v in g.inputs], outputs=[val(v) for v in g.outputs], ir="onnx")
    gv.regions, gv.region_index = regions.info(), regions
    for r in regions.all[1:]:  # a region's layer: the scope of the node that holds it
        calls = regions.calls[r.function.identifier()] if r.function is not None else []
        holder = r.owner if r.owner is not None else (calls[0] if len(calls) == 1 else None)
        parent = gv.regions.get(r.parent.path) if r.parent is not None else None
        gv.regions[r.path].scope = (_scope(holder) if holder is not None else None) or (parent and parent.scope)
    gv.probe_fn = lambda vals, feeds: probe(gv, feeds, [v.name for v in vals],
                                            lambda ns: om.probe(feeds, ns) if ns else {})
    gv.call_probe_fn = lambda vals, feeds: regions.probe_calls(feeds, [v.name for v in vals],
                                                               lambda ns: om.probe(feeds, ns) if ns else {})
    gv.sample_inputs_fn = lambda: make_inputs(input_specs(gv), pad=True)
    return gv


def _node(n: ir.Node, val, index: int, region: str) -> Node:
    node = Node(name=n.name or f"{n.op_type}_{index}", op=_op(n), inputs=[val(i) for i in n.inputs],
                outputs=[val(o) for o in n.outputs], attrs={k: _attr_value(a) for k, a in n.attributes.items()
                                                            if a.type not in _GRAPH_ATTRS},
                scope=_scope(n), native=n, meta=dict(n.metadata_props), region=region)
    if FORM_KEY in node.meta:  # attention attn-opt rewrote: its record makes it one site again
        node.op = "attn_opt.Attention"
    if node.op == "Constant" and "value" in node.attrs:
        node.outputs[0].const = np.asarray(node.attrs["value"])
    elif node.op in ("Identity",) and node.inputs[0] is not None and node.inputs[0].const is not None:
        node.outputs[0].const = node.inputs[0].const  # TorchScript wraps weights in Identity
    return node


_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def probe(gv: GraphView, feeds, names: list[str], top) -> dict[str, np.ndarray]:
    """Values of one run on `feeds`, wherever they are: `top(names)` runs the model for the
    top-level ones (what it returns is kept: the model's outputs too), each region holding
    a wanted value runs alone (onnx_regions.Regions.probe); a region that cannot run is
    said in `gv.regions[path].error`."""
    regions = gv.region_index
    if regions is None or len(regions.all) == 1:
        return top(list(names))
    got = regions.probe(feeds, names, top)
    for path, info in gv.regions.items():
        info.error = regions.errors.get(path)
    return got


def _embedding_rows(v: Value, depth: int = 4) -> int | None:
    """Rows of the embedding table an integer input indexes, following Cast/Reshape/..."""
    frontier = [v]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            for u in x.users:
                if u.op == "Gather" and u.input(1) is x and u.input(0) is not None and u.input(0).const is not None:
                    return int(u.input(0).const.shape[0])
                if u.op in ("Cast", "Reshape", "Unsqueeze", "Flatten", "Squeeze", "Identity"):
                    nxt.extend(u.outputs)
        frontier = nxt
    return None


def input_specs(gv: GraphView) -> list[InputSpec]:
    specs = []
    for v in gv.inputs:
        if v.const is not None:
            continue
        if v.shape is None or v.dtype is None:
            raise UserError(f"input {v.name!r} has no static type or rank; pass --inputs FILE.npz")
        high = _embedding_rows(v) if np.dtype(v.dtype).kind in "iu" else None
        specs.append(InputSpec(v.name, v.dtype, v.shape, high))
    return specs


def session(model, threads: int | None = None):
    """An ONNX Runtime session of a ModelProto or OnnxModel, set up for timing (weights
    prepacked as ORT does by default)."""
    return load(model).session(threads=threads, prepack=True)


def run(model, feeds: Mapping[str, np.ndarray], extra: list[str] = ()) -> dict[str, np.ndarray]:
    """Run a ModelProto or OnnxModel once in ORT; `extra` names intermediate values to return."""
    return load(model).run(feeds, extra)


def load_view(model) -> tuple[OnnxModel, ir.Model, GraphView]:
    """(model with inferred shapes, its onnx_ir graph, its view) of a path, proto or OnnxModel."""
    om = with_shapes(load(model))
    return om, om.ir, view(om)
