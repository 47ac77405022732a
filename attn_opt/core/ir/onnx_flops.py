"""FLOPs of an ONNX graph at concrete input shapes, counted from the graph.

A multiply-add is 2 FLOPs. `matmul` covers MatMul, Gemm, Einsum, Conv and the fused
attention ops (2·B·H·Tq·Tk·(d+dv)), the same operations torch's FlopCounterMode counts;
`other` counts one FLOP per output element of elementwise ops, five per element of
Softmax and LayerNormalization, and one per input element of reductions. Nodes tagged by
a pass (metadata `attn_opt.site`) or covered by a detected site count as attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx

from attn_opt.core.graph import SELECTION_TAG, SITE_TAG
from attn_opt.core.ir import onnx_region_shapes as shapes_of

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Erf", "Sqrt", "Pow",
               "Where", "Neg", "Gelu", "Softplus", "Max", "Min", "Abs", "Reciprocal", "Not", "And", "Or",
               "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "IsNaN", "Clip", "HardSigmoid",
               "LeakyRelu", "Elu", "Cos", "Sin"}
FIVE_PER_ELEMENT = {"Softmax", "LogSoftmax", "LayerNormalization", "SimplifiedLayerNormalization",
                    "RMSNormalization", "SkipLayerNormalization"}
REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceLogSumExp"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
COUNTED = {"MatMul", "Gemm", "Einsum", "Conv"} | ATTENTION_OPS | ELEMENTWISE | FIVE_PER_ELEMENT | REDUCE


@dataclass
class Flops:
    total: int = 0
    matmul: int = 0
    attention: int = 0
    attention_matmul: int = 0
    selection_matmul: int = 0  # of attention_matmul: a content pattern's selection (block scores)
    notes: list[str] = field(default_factory=list)  # how subgraphs and functions were counted

    def to_json(self) -> dict:
        return {"total": self.total, "matmul": self.matmul, "attention": self.attention,
                "attention_matmul": self.attention_matmul, "selection_matmul": self.selection_matmul,
                "notes": self.notes}

    def add(self, other: "Flops", times: int = 1) -> None:
        self.total += other.total * times
        self.matmul += other.matmul * times
        self.attention += other.attention * times
        self.attention_matmul += other.attention_matmul * times
        self.selection_matmul += other.selection_matmul * times
        self.notes += [n for n in other.notes if n not in self.notes]


def static_shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes from static inference with the inputs fixed to the feeds' shapes
    (on the weightless proto: initializers give their dims), inside subgraphs and, per call,
    function bodies too (onnx_region_shapes.py); and the values it could not size."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for inp in m.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, feeds[inp.name].shape):
                d.Clear()
                d.dim_value = int(size)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        pass
    out: dict[str, tuple[int, ...]] = {}
    types: dict = {}
    shapes_of.collect(m.graph, out, types)
    shapes_of.calls(m, out, types)
    missing = []
    for g in shapes_of.all_graphs(m.graph):
        missing += [v for n in g.node if n.op_type in COUNTED for v in list(n.input) + list(n.output)[:1]
                    if v and v not in out]
    for f in m.functions:  # sized at no call: its first call's probe sizes it
        for g in shapes_of.all_graphs(onnx.helper.make_graph(f.node, f.name, [], [])):
            missing += [v for n in g.node if n.op_type in COUNTED for v in list(n.input) + list(n.output)[:1]
                        if v and v not in out and not any(k.endswith(shapes_of.SEP + v) for k in out)]
    return out, list(dict.fromkeys(missing))


def control_values(proto: onnx.ModelProto) -> list[str]:
    """The values FLOP counting reads, not only sizes: each If's condition and each Loop's
    trip count (which branch ran, how many times a body ran)."""
    out = []
    graphs = list(shapes_of.all_graphs(proto.graph))
    for f in proto.functions:
        graphs += list(shapes_of.all_graphs(onnx.helper.make_graph(f.node, f.name, [], [])))
    for g in graphs:
        for n in g.node:
            if n.op_type in ("If", "Loop") and n.input and n.input[0]:
                out.append(n.input[0])
    return out


def shapes(model, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every value a count needs (a ModelProto or OnnxModel): static
    inference, then one ORT run for the values inference could not size (values inside
    regions from each region run alone)."""
    out, missing = static_shapes(_graph(model), feeds)
    if missing:
        got = _run(model, feeds, missing)
        out.update({k: tuple(np.shape(v)) for k, v in got.items()})
    return out


def _run(model, feeds, names: list[str]) -> dict:
    from attn_opt.core.ir import onnx as adapter

    om = adapter.load(model)
    return adapter.probe(adapter.view(om), feeds, names, lambda ns: om.run(feeds, ns))


def _matmul(a: tuple, b: tuple) -> int:
    if len(a) == 1:
        a = (1,) + a
    if len(b) == 1:
        b = b + (1,)
    batch = np.broadcast_shapes(a[:-2], b[:-2]) if len(a) > 2 or len(b) > 2 else ()
    return 2 * prod(batch) * a[-2] * a[-1] * b[-1]


def _einsum(eq: str, shapes_in: list[tuple]) -> int:
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for term, shp in zip(lhs, shapes_in):
        for c, s in zip(term.replace("...", ""), shp[-len(term.replace("...", "")):]):
            sizes[c] = max(sizes.get(c, 1), s)
    return 2 * prod(sizes.values()) if len(lhs) == 2 else prod(sizes.values())


def _attention(n: onnx.NodeProto, shp: dict) -> int:
    q, k, v = (shp.get(n.input[i]) for i in range(3))
    if q is None or k is None or v is None:
        return 0, 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    if len(q) == 4:  # [B, H, Tq, d]
        b, h, tq, d = q
        tk, dv = k[2], v[3]
    else:  # [B, S, H*d]
        h = attrs.get("num_heads") or attrs.get("q_num_heads")
        b, tq = q[0], q[1]
        d = q[2] // h
        tk = k[1] if len(k) == 3 else k[2]
        kvh = attrs.get("kv_num_heads") or h
        dv = (v[2] // kvh) if len(v) == 3 else v[3]
    return 2 * b * h * tq * tk * (d + dv), 5 * b * h * tq * tk


def node_flops(n: onnx.NodeProto, shp: dict) -> tuple[int, bool]:
    """(FLOPs, whether they are matrix-multiply FLOPs)."""
    ins = [shp.get(i) for i in n.input]
    out = shp.get(n.output[0]) if n.output else None
    op = n.op_type
    try:
        if op == "MatMul" and ins[0] and ins[1]:
            return _matmul(ins[0], ins[1]), True
        if op == "Gemm" and ins[0] and ins[1] and out:
            a = {x.name: x.i for x in n.attribute}
            k = ins[0][0] if a.get("transA") else ins[0][1]
            return 2 * out[0] * out[1] * k + (prod(out) if len(ins) > 2 else 0), True
        if op == "Einsum":
            eq = next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "equation")
            return _einsum(eq.decode() if isinstance(eq, bytes) else eq, [s for s in ins if s]), True
        if op == "Conv" and ins[1] and out:
            return 2 * prod(out) * prod(ins[1][1:]), True
        if op in ATTENTION_OPS:
            return _attention(n, shp)[0], True
        if op in ELEMENTWISE and out:
            return prod(out), False
        if op in FIVE_PER_ELEMENT and out:
            return 5 * prod(out), False
        if op in REDUCE and ins[0]:
            return prod(ins[0]), False
    except (TypeError, ValueError, IndexError, StopIteration):
        return 0, False
    return 0, False


def _graph(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else model.graph_proto()


def count(model, feeds: dict[str, np.ndarray], attention_nodes: set[str] = frozenset()) -> Flops:
    """FLOPs of a ModelProto or OnnxModel at the feeds' shapes."""
    proto = _graph(model)
    shp = shapes(model, feeds)
    control = [n for n in control_values(proto) if n not in feeds]
    values = _run(model, feeds, control) if control else {}
    return count_shapes(proto, shp, attention_nodes, dict(values) | dict(feeds))


def count_shapes(proto: onnx.ModelProto, shp: dict, attention_nodes: set[str] = frozenset(),
                 values: dict | None = None) -> Flops:
    """FLOPs of the graph's nodes at the given concrete shapes, the regions' included
    (onnx_flops_regions.py): `values` are those of the run the shapes came from (which
    branch each If took, each Loop's trip count)."""
    from attn_opt.core.ir.onnx_flops_regions import Counter

    return Counter(proto, shp, attention_nodes, values or {}).count()


def node_counts(n: onnx.NodeProto, shp, attention_nodes: set[str]) -> Flops:
    """One node's FLOPs (not a control-flow node or a function call)."""
    f = Flops()
    fl, is_mm = node_flops(n, shp)
    if n.op_type in ATTENTION_OPS:  # the softmax inside a fused op: not a matrix product
        soft = _attention(n, shp)[1] if fl else 0
        f.total += soft
        f.attention += soft
    if not fl:
        return f
    f.total += fl
    f.matmul += fl if is_mm else 0
    tagged = any(p.key == SITE_TAG for p in n.metadata_props)
    if tagged or n.name in attention_nodes or n.op_type in ATTENTION_OPS:
        f.attention += fl
        f.attention_matmul += fl if is_mm else 0
        if is_mm and any(p.key == SELECTION_TAG for p in n.metadata_props):
            f.selection_matmul += fl
    return f


def params(model) -> int:
    """Parameters: elements of floating-point initializers of rank ≥ 1 (a subgraph's too)."""
    total = 0
    for t in (t for g in shapes_of.all_graphs(_graph(model).graph) for t in g.initializer):
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                           onnx.TensorProto.DOUBLE) and len(t.dims) >= 1:
            total += prod(t.dims)
    return total
