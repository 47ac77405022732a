"""Attention that is already one op: torch's SDPA and nn.MultiheadAttention (FX), the
ONNX `Attention` op (opset 23+), and ONNX Runtime's com.microsoft attention ops."""

from __future__ import annotations

from attn_opt.patterns.candidate import Candidate
from attn_opt.patterns.layout import operand
from attn_opt.patterns.site import Miss, Operand
from attn_opt.patterns.form import Normaliser
from attn_opt.core.graph import EPILOGUE_TAG, FORM_KEY, SITE_TAG, GraphView, Node, Value


def _mask(c: Candidate, m: Value | None) -> None:
    if m is None:
        return
    if m.dtype == "bool":
        c.bool_mask, c.bool_keep = m, True
    else:
        c.additive.append(m)


def _base(rule: str, n: Node) -> Candidate:
    c = Candidate(rule=rule, anchor=n, covered=[n], output=n.outputs[0], scope=n.scope)
    s = n.attrs.get("scale")
    c.scale = float(s) if s not in (None, 0.0) else None
    return c


def _four_d_or_packed(c: Candidate, q: Value, k: Value, v: Value) -> None:
    packed = q.rank == 3
    if packed:
        c.q, c.k, c.v = Operand(q, packed=True), Operand(k, packed=True), Operand(v, packed=True)
    else:
        c.q, c.k, c.v = operand(q, False), operand(k, False), operand(v, False)


def match_onnx_attention(gv: GraphView, n: Node) -> Candidate:
    c = _base("onnx-attention", n)
    k, v = n.input(1), n.input(2)
    if n.input(4) is not None and n.input(5) is not None and len(n.outputs) >= 3 and all(n.outputs[1:3]):
        k, v = n.outputs[1], n.outputs[2]  # the keys/values attended: past + new, as the op returns them
        c.notes.append("reads a past key/value cache and returns the present one")
    _four_d_or_packed(c, n.input(0), k, v)
    _mask(c, n.input(3))
    c.causal_attr = bool(n.attrs.get("is_causal", 0))
    c.heads_attr = n.attrs.get("q_num_heads")
    c.kv_heads_attr = n.attrs.get("kv_num_heads")
    if n.attrs.get("softcap"):
        c.softcap = float(n.attrs["softcap"])
    return c


def match_ms_mha(gv: GraphView, n: Node) -> Candidate:
    c = _base("ms-mha", n)
    q, k, v = n.input(0), n.input(1), n.input(2)
    if k is None or v is None:
        raise Miss("packed QKV MultiHeadAttention is not supported", n)
    c.q, c.k, c.v = Operand(q, packed=True), Operand(k, packed=k.rank == 3), Operand(v, packed=v.rank == 3)
    _mask(c, n.input(5))  # attention_bias
    if n.input(4) is not None:
        c.notes.append("key_padding_mask input")
    c.causal_attr = bool(n.attrs.get("unidirectional", 0))
    c.heads_attr = n.attrs.get("num_heads")
    c.kv_heads_attr = c.heads_attr
    return c


def match_ms_gqa(gv: GraphView, n: Node) -> Candidate:
    c = _base("ms-gqa", n)
    c.q, c.k, c.v = (Operand(n.input(i), packed=True) for i in range(3))
    if n.input(3) is not None and n.input(4) is not None and len(n.outputs) >= 3 and all(n.outputs[1:3]):
        # the keys/values attended: past + new, as the op returns them ([B, kvH, T, D])
        c.k, c.v = operand(n.outputs[1], False), operand(n.outputs[2], False)
        c.notes.append("reads a past key/value cache and returns the present one")
    c.causal_attr = n.attrs.get("causal", 1) == 1
    c.heads_attr = n.attrs.get("num_heads")
    c.kv_heads_attr = n.attrs.get("kv_num_heads")
    _mask(c, n.input(10))  # attention_bias
    if n.attrs.get("softcap"):
        c.softcap = float(n.attrs["softcap"])
    sink = n.input(11)  # head_sink: exp(S) / (exp(b_h) + Σ exp(S))
    if sink is not None and sink.const is not None:
        c.normaliser = Normaliser("logit", bias=tuple(float(b) for b in sink.const.reshape(-1)))
    elif sink is not None:
        c.notes.append("a head_sink computed in the graph")
    if n.attrs.get("local_window_size", -1) not in (-1, None):
        c.notes.append(f"local_window_size={n.attrs['local_window_size']}")
    return c


def match_ms_attention(gv: GraphView, n: Node) -> Candidate:
    c = _base("ms-attention", n)
    x = n.input(0)  # the projections are inside the op: Q, K and V all come from x
    c.q = c.k = c.v = Operand(x, packed=True)
    c.causal_attr = bool(n.attrs.get("unidirectional", 0))
    c.heads_attr = c.kv_heads_attr = n.attrs.get("num_heads")
    _mask(c, n.input(5) if len(n.inputs) > 5 else None)
    c.notes.append("Q/K/V projections are inside the op")
    return c


def match_sdpa(gv: GraphView, n: Node) -> Candidate:
    c = _base("sdpa", n)
    c.q, c.k, c.v = operand(n.input(0), False), operand(n.input(1), False), operand(n.input(2), False)
    _mask(c, n.input(3))
    c.causal_attr = bool(n.attrs.get("is_causal", False))
    return c


def match_torch_mha(gv: GraphView, n: Node) -> Candidate:
    c = _base("torch-mha", n)
    q, k, v = n.input(0), n.input(1), n.input(2)
    c.q, c.k, c.v = Operand(q, packed=True), Operand(k, packed=True), Operand(v, packed=True)
    _mask(c, n.input(3))
    c.bool_keep = False  # nn.MultiheadAttention: True in a boolean attn_mask means "hidden"
    c.causal_attr = bool(n.attrs.get("is_causal", False))
    c.heads_attr = c.kv_heads_attr = n.attrs.get("num_heads")
    c.notes.append("Q/K/V projections are inside the op")
    c.seq_first = not n.attrs.get("batch_first", False)
    if n.attrs.get("whole_layer"):
        c.notes.append("torch's fused encoder-layer fast path: attention, MLP and norms in one op")
    return c


OPAQUE_MODULES = ("TransformerEncoder", "TransformerEncoderLayer", "TransformerDecoder",
                  "TransformerDecoderLayer", "Transformer")


def opaque_module(gv: GraphView, n: Node) -> Candidate:
    name = n.op.split(":", 1)[1]
    raise Miss(f"nn.{name} is a leaf module under symbolic_trace, so its attention is hidden inside "
               "one call_module; trace with torch.export or Dynamo to see it", n)


def match_attn_opt(gv: GraphView, n: Node) -> Candidate:
    """A site attn-opt already rewrote: rebuilt from the record on its output node."""
    from attn_opt.patterns.record import FormRecord

    rec = FormRecord.from_json(n.meta[FORM_KEY])
    c = Candidate(rule="attn-opt", anchor=n, output=n.outputs[0], scope=rec.scope)
    vals = {}
    for key in ("q", "k", "v"):
        o = getattr(rec, key)
        v = gv.value(o.name)
        if v is None:
            raise Miss(f"the record of rewritten site {rec.site} names a missing value {o.name}", n)
        vals[key] = Operand(v, o.perm, repeated=o.repeated, fold=o.fold)
    c.q, c.k, c.v = vals["q"], vals["k"], vals["v"]
    # a mask the lowering did not read (a 2-D neighborhood drops the site's no-op mask) is gone
    # from the graph: the form does not depend on it
    c.additive = [v for a in rec.additive if (v := gv.value(a)) is not None]
    c.folded_terms = [v for v in c.additive if v.name in rec.folded_terms]
    c.filled_terms = [v for v in c.additive if v.name in rec.filled_terms]
    c.negated = [v for v in c.additive if v.name in rec.negated_terms]
    c.regrouped_terms = [v for v in c.additive if v.name in rec.regrouped_terms]
    c.regroup = rec.regroup
    c.zero_rows = rec.zero_rows
    if rec.bool and gv.value(rec.bool) is not None:
        c.bool_mask, c.bool_keep = gv.value(rec.bool), rec.bool_keep
    c.scale, c.causal_attr = rec.scale, rec.causal
    c.heads_attr, c.kv_heads_attr = rec.heads, rec.kv_heads
    c.pattern, c.normaliser = rec.pattern, rec.normaliser
    c.softcap, c.fill_value = rec.softcap, rec.fill
    c.covered = [m for m in gv.nodes if m.meta.get(SITE_TAG) == rec.site and EPILOGUE_TAG not in m.meta]
    return c


def quantized_softmax(gv: GraphView, n: Node) -> Candidate:
    """QOperator models (QLinearMatMul → QLinearSoftmax) hold attention in quantized ops the
    passes do not rewrite: an honest near miss instead of silence."""
    raise Miss("a quantized (QOperator) softmax: attention built from QLinearMatMul/QLinearSoftmax is not "
               "rewritten; quantize with QDQ (QuantizeLinear/DequantizeLinear) to keep it rewritable", n)
