"""Find the Linear layers that feed Q, K, V and read the attention output.

Walks a bounded distance through layout and elementwise ops (bias Add, rotary
embedding's Mul/Add/Slice/Concat/Neg, Split of a fused QKV projection) to the first
MatMul/Gemm/Linear whose other operand is a weight."""

from __future__ import annotations

from collections import deque

from attn_opt.patterns.layout import weight_like
from attn_opt.patterns.site import Projection
from attn_opt.core.graph import EPILOGUE_TAG, Node, Value

_THROUGH = {"Transpose", "Reshape", "Add", "Mul", "Sub", "Neg", "Slice", "Concat", "Split",
            "Unsqueeze", "Squeeze", "Expand", "Cast", "Identity", "RotaryEmbedding", "Contiguous",
            "Gather", "RepeatInterleave", "Dropout", "Getitem", "Squeeze"}
_LINEAR = {"MatMul", "Gemm", "Linear"}


def _as_projection(n: Node) -> Projection | None:
    if n.op not in _LINEAR:
        return None
    x, w = n.input(0), n.input(1)
    if x is None or w is None or weight_like(x) or not weight_like(w):
        return None
    bias = n.input(2) if n.op in ("Gemm", "Linear") else None
    transposed = bool(n.attrs.get("transB", 0)) if n.op == "Gemm" else n.op == "Linear"
    return Projection(x=x, weight=w, bias=bias, node=n.name, transposed=transposed)


def feeding(v: Value, budget: int = 24) -> Projection | None:
    """The projection that `v` is computed from (first found, nearest first)."""
    frontier, seen = [v], set()
    while frontier and budget > 0:
        nxt = []
        for x in frontier:
            n = x.producer
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            budget -= 1
            if (p := _as_projection(n)) is not None:
                return p
            if n.op in _THROUGH:
                nxt.extend(i for i in n.inputs if i is not None and not weight_like(i))
        frontier = nxt
    return None


def reading(v: Value, budget: int = 6) -> Projection | None:
    """The output projection that reads `v` through Transpose/Reshape."""
    for _ in range(budget):
        users = [u for u in v.users if u.op not in ("Shape", "Size")  # TorchScript reads shapes too
                 and EPILOGUE_TAG not in u.meta]  # nor is a correction attn-opt added (a LoRA) the projection
        if len(users) != 1:
            return None
        n = users[0]
        if (p := _as_projection(n)) is not None and n.input(0) is v:
            return p
        if n.op not in ("Transpose", "Reshape", "Contiguous", "Identity", "Cast"):
            return None
        v = n.outputs[0]
    return None


_QUANT = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Cast", "Identity"}
_WEIGHTED = _LINEAR | {"MatMulInteger", "QLinearMatMul", "MatMulNBits", "Conv", "GRU", "LSTM", "RNN"}  # data operand first


def hidden_sources(v: Value, budget: int = 256) -> dict[int, Value]:
    """The hidden states `v` is projected from: walking back through any op (rotary
    embedding, a fused QKV's Split, reshapes, a cache Concat), each product with a weight
    contributes its data operand, followed back through quantize/dequantize/cast ops.
    Q and K of self-attention share one; cross-attention's do not. Empty when no
    projection is within reach (Q/K are inputs, or computed without weights). Breadth
    first, so the nearest projection is found before the rotary tables' long subgraph;
    integer sources (position ids scaled by inv_freq) are not hidden states."""
    out, frontier, seen = {}, deque([v]), set()
    while frontier and budget > 0:
        n = frontier.popleft().producer
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        budget -= 1
        if n.op in ("Shape", "Size", "ConstantOfShape"):  # a size, not data (TorchScript reads shapes)
            continue
        if n.op == "DynamicQuantizeLinear":  # reached through its scale output (dynamic quantization):
            src = n.input(0)  # the quantized hidden state itself is the source
            while src.producer is not None and src.producer.op in _QUANT:
                src = src.producer.input(0)
            out[id(src)] = src
            continue
        inputs = [i for i in n.inputs if i is not None]
        data = [i for i in inputs if not weight_like(i) and i.const is None]
        if n.op in _WEIGHTED and len(data) < len(inputs) and data:
            src = data[0]
            while src.producer is not None and src.producer.op in _QUANT:
                src = src.producer.input(0)
            if src.dtype is None or not src.dtype.startswith(("int", "uint", "bool")):
                out[id(src)] = src
            continue
        frontier.extend(data)
    return out


# ops a norm (LayerNorm, RMSNorm, written out or as one op) is made of: one data input,
# the rest constants or values computed from that same input
_NORM = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Pow", "ReduceMean", "Sqrt",
         "Reciprocal", "Div", "Mul", "Add", "Sub", "Cast", "Identity", "Reshape", "Transpose", "Split", "Slice",
         "Getitem", "Flatten", "Contiguous", "Squeeze", "Unsqueeze"}
_LAYOUT = {"Reshape", "Transpose", "Flatten", "Contiguous", "Squeeze", "Unsqueeze", "Cast", "Identity"}


def _bottleneck_input(src: Value, budget: int = 32) -> Value | None:
    """Where `src` is a compressed view of another hidden state: computed through norm and
    layout ops from one weighted op that narrows its input (a low-rank factor: MLA's q_a,
    kv_a) or reduces it with a stride (spatial-reduction attention's Conv), that op's data
    input (through layout ops); else None."""
    frontier, seen, found = [src], set(), []
    while frontier and budget > 0:
        n = frontier.pop().producer
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        budget -= 1
        if n.op in _WEIGHTED:
            found.append(n)
            continue
        if n.op not in _NORM:
            return None  # a residual Add of two hidden states, an activation, ...: not a norm of one source
        ins = n.inputs[:1] if n.op in _LAYOUT | {"Slice", "Split", "Getitem"} else n.inputs  # not their shapes
        frontier.extend(i for i in ins if i is not None and i.const is None and not weight_like(i))
    if len({id(n) for n in found}) != 1 or budget <= 0:
        return None
    n = found[0]
    x = next((i for i in n.inputs if i is not None and i.const is None and not weight_like(i)), None)
    if x is None or not _narrows(n, x):
        return None
    while x.producer is not None and x.producer.op in _LAYOUT:
        x = x.producer.input(0)
    return x


def _narrows(n: Node, x: Value) -> bool:
    """A projection to fewer features than it reads, or a strided convolution."""
    if n.op == "Conv":
        return any(int(s) > 1 for s in n.attrs.get("strides", ()) or ())
    y = n.outputs[0]
    return bool(x.shape and y.shape and isinstance(x.shape[-1], int) and isinstance(y.shape[-1], int)
                and y.shape[-1] < x.shape[-1])


def root_sources(v: Value, depth: int = 2) -> dict[int, Value]:
    """`hidden_sources`, each source that is a compressed view (a norm of a low-rank factor,
    a strided reduction) replaced by the hidden state it compresses, up to `depth` times:
    MLA's q_a → norm → q_b and kv_a → norm → kv_b, or SegFormer's reduced keys, read from
    the same hidden states as their queries."""
    out = hidden_sources(v)
    for _ in range(depth):
        nxt = {}
        for key, src in out.items():
            x = _bottleneck_input(src)
            nxt[id(x) if x is not None else key] = x if x is not None else src
        out = nxt
    return out
