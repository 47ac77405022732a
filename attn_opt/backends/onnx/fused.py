"""The fused lowering: a site as one attention op, the same function.

ONNX `Attention` (opset 23: GQA, soft-cap, any float dtype), or ONNX Runtime's
`com.microsoft.MultiHeadAttention` (backends/onnx/ort.py) where the fuse target asks for
it or, with target=auto, where it runs faster at the site's shape.

A decoder step (K/V = Concat(past input, new), returned as present) keeps its cache
inputs and outputs: `Attention` with past_key/past_value in and present out, or with
target=ort (and with auto where it times faster at the site's shape) ONNX Runtime's
`com.microsoft.GroupQueryAttention` reading the same past inputs and writing the same
present outputs, seqlens_k and total_sequence_length computed in the graph from the
shapes, the site's mask as attention_bias. A sink-logit normaliser (sinkfree:mode=logit,
fused in a later run, target=ort or auto) is GroupQueryAttention's head_sink: no other
fused op computes it (passes/fuse.py skips it for target=onnx). Where GroupQueryAttention
cannot take a step (`gqa_step_reason`), it gets `Attention`, and the report says why.
`limits` is what the ONNX backend declares it cannot fuse (backends/onnx/lower.py:
CAPABILITIES): a pattern, a normaliser other than softmax, a sink logit anywhere but
GroupQueryAttention's head_sink.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx import ort
from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.visible import causal_visible
from attn_opt.patterns.cache import new_part
from attn_opt.patterns.form import Form
from attn_opt.patterns.site import AttentionSite

HIDE = {"float32": -1e30, "float64": -1e30, "bfloat16": -1e30, "float16": -6e4}  # hidden, yet finite


def limits(site: AttentionSite, form: Form) -> str | None:
    """Why the ONNX backend cannot fuse `site` into one op keeping `form`'s pattern and
    normaliser (the site's own), or None."""
    if form.pattern is not None:
        return f"its pattern ({form.pattern.describe()}) would be lost: a fused op keeps every pair"
    n = form.normaliser
    if n.is_softmax:
        return None
    if n.kind != "logit" or n.calibrated:
        return f"its normaliser ({n.describe()}) would be lost: the fused ops compute softmax"
    if site.cache is None or not (site.cache.present_key and site.cache.present_value):
        return None  # ONNX Attention with the sink as one more key (value 0): emit_fused
    if form.fused == "onnx":
        return "a sink logit, which ONNX Attention has not: fuse:target=ort writes GroupQueryAttention's head_sink"
    if (why := gqa_step_reason(site)) is not None:
        return f"a sink logit, which only GroupQueryAttention (head_sink) computes, and {why}"
    return None


def gqa_step_reason(site) -> str | None:
    """Why a decoder-step site cannot be ONNX Runtime's GroupQueryAttention reading its own
    past cache and returning the present one (None: it can). The op is causal (ORT's CPU
    takes causal=0 only without a multi-token batch after a past), float32 here (float16
    on CPU too, not written), its mask an additive attention_bias, its normaliser softmax
    or softmax with a per-head sink logit (head_sink)."""
    c = site.cache
    if c is None or not (c.present_key and c.present_value):
        return "not a decoder step that returns its cache"
    if site.kind != "self":
        return "cross-attention: GroupQueryAttention's new keys are its queries' own tokens"
    parts = [new_part(op.value) for op in (site.k, site.v)]
    if any(op.perm or op.packed or op.fold for op in (site.k, site.v)) or not all(p and p[0] for p in parts):
        return "its K/V are not Concat(past input, new) in [B, H, S, D] layout"
    if site.heads is None or site.kv_heads is None or site.scale is None or site.heads % site.kv_heads:
        return "heads, kv heads or scale unknown, or the heads do not group over the kv heads"
    dtype = site.output.dtype or site.q.value.dtype
    if dtype not in (None, "float32"):  # ORT's CPU op also takes float16; that lowering is not written
        return f"this site is {dtype}: attn-opt writes GroupQueryAttention for float32 steps"
    if not site.causal:
        return "not causal: GroupQueryAttention after a past cache is causal (causal=0 takes no multi-token batch)"
    if site.head_dim is None or site.head_dim % 8:
        return f"head size {site.head_dim}: GroupQueryAttention needs a multiple of 8"
    if site.bool_mask is not None:
        return "a boolean mask: GroupQueryAttention takes an additive attention_bias"
    n = site.normaliser
    if n.calibrated or n.kind not in ("softmax", "logit"):
        return f"{n.describe()}: GroupQueryAttention computes softmax, with or without a sink logit per head"
    return None


def choose(site: AttentionSite, target: str) -> tuple[str, str]:
    """("onnx" | "ort" | "gqa", why) for one site."""
    if site.cache is not None and site.cache.present_key and site.cache.present_value:
        return _choose_step(site, target)
    dtype = site.output.dtype or site.q.value.dtype
    if site.normaliser.kind == "logit":
        return "onnx", "a sink logit: Attention with the sink as one more key whose value is 0"
    if target != "onnx" and dtype not in (None, "float32"):
        return "onnx", f"ORT's CPU MultiHeadAttention takes float32 only; this site is {dtype}"
    if target != "onnx" and site.gqa and not site.causal and site.kind == "self":  # an encoder's GQA
        if site.head_dim is None or site.head_dim % 8:
            return "onnx", f"head size {site.head_dim}: GroupQueryAttention needs a multiple of 8"
        if not ort.gqa_has_causal():
            return "onnx", "the installed ONNX Runtime's GroupQueryAttention has no causal=0 (bidirectional)"
        if target == "ort":
            return "gqa", "bidirectional grouped-query attention: GroupQueryAttention with causal=0"
        b, h, tq, tk, d = site.run_shape or (1, site.heads, 128, 128, site.head_dim)
        return ort.fastest_bidirectional(b, h, site.kv_heads, max(tq, tk), d)
    if target != "onnx" and site.softcap:
        return "onnx", "MultiHeadAttention has no soft-cap; Attention (opset 23) has"
    if target != "onnx" and (sizes := _head_sizes(site)) and sizes[0] != sizes[1]:
        return "onnx", f"MultiHeadAttention needs one head size for K and V (here {sizes[0]} and {sizes[1]}: MLA)"
    if target != "auto":
        return target, "asked for"
    b, h, tq, tk, d = site.run_shape or (1, site.heads, 128, 128, site.head_dim)
    return ort.fastest_fused(b, h, site.kv_heads, max(tq, tk), d)


def _head_sizes(site: AttentionSite) -> tuple[int, int] | None:
    """(K's head size, V's) from static shapes, where both are known."""
    out = []
    for op in (site.k, site.v):
        shape = op.value.shape
        if shape is None or op.packed or len(shape) < 3:
            return None
        d = shape[op.perm[-1]] if op.perm else shape[-1]
        if not isinstance(d, int):
            return None
        out.append(d)
    return out[0], out[1]


def _choose_step(site: AttentionSite, target: str) -> tuple[str, str]:
    """("onnx" | "gqa", why) for a decoder step that returns its cache."""
    if site.normaliser.kind == "logit":  # Fuse.skip_reason let it through only where GQA can take it
        return "gqa", ("asked for" if target == "ort" else
                       "a sink logit: GroupQueryAttention's head_sink computes it, Attention has none")
    if target == "onnx":
        return "onnx", "a decoder step: Attention reads the past cache and returns the present one"
    if (why := gqa_step_reason(site)) is not None:
        return "onnx", f"not GroupQueryAttention: {why}"
    if target == "ort":
        return "gqa", "asked for"
    b, h, tq, tk, d = site.run_shape or (1, site.heads, 1, 128, site.head_dim)
    return ort.fastest_step(b, h, site.kv_heads, tq, tk - tq, d, site.mask != "causal")


def emit_fused(e: SiteEdit, target: str) -> str:
    """The site as one op; returns a note for the report."""
    s = e.site
    choice, why = choose(s, target)
    q, k, v = e.bhsd(s.q), e.bhsd(s.k), e.bhsd(s.v)
    mask, is_bool = attention_mask(e, s, q)
    if choice == "ort" and not s.gqa:
        e.commit(_zero_hidden_rows(e, s, ort.multi_head_attention(e, s, q, k, v, mask, is_bool)))
        return f"MultiHeadAttention (com.microsoft): {why}"
    if choice == "gqa" and s.cache is None:
        e.commit(ort.bidirectional_gqa(e, s, q, k, v, mask, is_bool))
        return f"GroupQueryAttention (com.microsoft) causal=0: {why}"
    e.ensure_opset("", 23)
    attrs = {"scale": float(s.scale), "is_causal": int(s.mask == "causal")}
    if s.softcap:
        attrs["softcap"] = float(s.softcap)
    cached = _with_cache(e, s)
    if cached is None and s.normaliser.kind == "logit":
        return _emit_sink_key(e, s, q, k, v, mask, is_bool, attrs)
    if cached is not None and choice == "gqa":
        return _emit_gqa(e, s, q, mask, cached, why)
    if cached is not None:  # past in, present out: the op's own cache inputs and outputs
        (k_new, v_new, past_k, past_v) = cached
        if s.mask == "causal":  # is_causal aligns the triangle top-left; a step's queries come last
            attrs["is_causal"], mask = 0, causal_visible(e, q, k)
        y, present_k, present_v = e.op("Attention", [q, k_new, v_new, mask, past_k, past_v], attrs, outputs=3)
        e.commit(y)
        e.replace_output(s.cache.present_key, present_k)
        e.replace_output(s.cache.present_value, present_v)
        return f"Attention (opset 23) with past_key/past_value in and present_key/present_value out: {why}"
    e.commit(_zero_hidden_rows(e, s, e.op("Attention", [q, k, v] + ([mask] if mask is not None else []), attrs)))
    if choice == "ort":
        why = "MultiHeadAttention has no grouped-query form"
    return f"Attention (opset 23): {why}"


def _emit_sink_key(e: SiteEdit, s: AttentionSite, q, k, v, mask, is_bool: bool, attrs: dict) -> str:
    """exp(S) / (exp(b_h) + Σ exp(S)) as Attention over the keys and one more: a zero key
    (score 0) with bias b_h in the mask's column for it and a zero value, so it takes its
    share of the weights and adds nothing. The causal triangle is written into the mask
    (is_causal would hide the extra key)."""
    zero = lambda x: e.op("Slice", [e.op("Sub", [x, x]), e.ints(0), e.ints(1), e.ints(2)])  # noqa: E731  [B, H, 1, D]
    k1, v1 = e.op("Concat", [k, zero(k)], {"axis": 2}), e.op("Concat", [v, zero(v)], {"axis": 2})
    dt = _np_dtype(s.q.value.dtype or "float32")
    low = e.const(np.asarray(HIDE.get(s.q.value.dtype or "float32", HIDE["float32"]), dtype=dt))
    if mask is not None and is_bool:
        mask = e.op("Where", [mask, e.op("Sub", [low, low]), low])
    if s.mask == "causal":
        c = e.op("Where", [causal_visible(e, q, k), e.op("Sub", [low, low]), low])
        mask = c if mask is None else e.op("Add", [mask, c])
    attrs = dict(attrs, is_causal=0)
    shape = e.op("Concat", [e.shape_dim(q, 0), e.ints(int(s.heads)), e.shape_dim(q, 2), e.shape_dim(k, 2)], {"axis": 0})
    bias = e.op("Reshape", [e.weight("sink_logit", s.normaliser.per_head_bias(s.heads)), e.ints(1, -1, 1, 1)])
    if dt != np.float32:
        bias = e.op("Cast", [bias], {"to": ir.DataType.FLOAT16 if dt == np.float16 else ir.DataType.BFLOAT16})
    col = e.op("Expand", [bias, e.op("Concat", [e.op("Slice", [shape, e.ints(0), e.ints(3), e.ints(0)]), e.ints(1)],
                                     {"axis": 0})])
    scores = e.op("Sub", [low, low]) if mask is None else mask
    full = e.op("Concat", [e.op("Expand", [scores, shape]), col], {"axis": -1})  # [B, H, Tq, Tk + 1]
    e.commit(_zero_hidden_rows(e, s, e.op("Attention", [q, k1, v1, full], attrs)))
    return "Attention (opset 23) with the sink logit as one more key: a zero key and value, its bias b_h in the mask"


def _emit_gqa(e: SiteEdit, s: AttentionSite, q, mask, cached, why: str) -> str:
    """The step as GroupQueryAttention, its present outputs in place of the step's."""
    y, present_k, present_v = ort.group_query_attention(e, s, q, cached, mask)
    if mask is not None and s.normaliser.kind == "softmax":
        y = _hidden_rows(e, s, y, mask, cached)
    e.commit(y)
    e.replace_output(s.cache.present_key, present_k)
    e.replace_output(s.cache.present_value, present_v)
    how = ["seqlens_k = past + new - 1 per row"] + (["the mask as attention_bias"] if mask is not None else []) \
        + (["the sink logit as head_sink"] if s.normaliser.kind == "logit" else [])
    return (f"GroupQueryAttention (com.microsoft) with past_key/past_value in and present_key/present_value out, "
            f"{', '.join(how)}: {why}")


def _zero_hidden_rows(e: SiteEdit, s: AttentionSite, y):
    """y [B, H, Tq, dv] with zeros on the rows the boolean mask hides completely, where the
    site masks its probabilities again after the softmax (the fused ops give them uniform
    weights, or zeros, depending on the fill)."""
    if not s.zero_hidden_rows:
        return y
    keep = s.bool_mask.native
    if keep.dtype != ir.DataType.BOOL:
        keep = e.op("Cast", [keep], {"to": ir.DataType.BOOL})
    if not s.bool_keep:
        keep = e.op("Not", [keep])
    seen = e.op("ReduceMax", [e.op("Cast", [keep], {"to": ir.DataType.FLOAT}), e.ints(-1)], {"keepdims": 1})
    return e.op("Where", [e.op("Greater", [seen, e.const(np.float32(0))]), y, e.op("Sub", [y, y])])


def _with_cache(e: SiteEdit, s: AttentionSite):
    """(new K, new V, past key, past value) for Attention's cache inputs, when the site's
    K/V are Concat(past input, new) returned as present; else None."""
    if s.cache is None or not (s.cache.present_key and s.cache.present_value) or s.k.perm or s.v.perm:
        return None
    k, v = new_part(s.k.value), new_part(s.v.value)
    if k is None or v is None or k[0] is None or v[0] is None:
        return None
    return e.value(k[1]), e.value(v[1]), e.value(k[0]), e.value(v[0])


def _hidden_rows(e: SiteEdit, s: AttentionSite, y, mask, cached):
    """A query row whose every key the mask hides: the original's fill (the dtype's lowest,
    HF's finfo.min, mapped to HIDE) leaves equal scores on every key, so it averages V over
    all T keys; GroupQueryAttention's causal triangle averages only the P + i + 1 keys up
    to the row's own position (0-based i among the S new ones). Those rows get
    (y·(P + i + 1) + Σ_{j > i} V_new[j]) / T: the keys after the row are new ones only, so
    the fix reads the step's new values, not the cache (a one-token step never needs it)."""
    _, v_new, past_k, _ = cached
    dead = e.op("LessOrEqual", [e.op("ReduceMax", [mask, e.ints(-1)]), e.const(np.float32(HIDE["float32"]))])
    after = e.op("CumSum", [v_new, e.const(np.int64(2))], {"exclusive": 1, "reverse": 1})  # [B, kvH, S, Dv]
    g = s.heads // s.kv_heads  # query head h reads kv head h // g
    heads = e.op("Concat", [e.ints(0, int(s.heads), -1), e.shape_dim(v_new, 3)], {"axis": 0})
    after = e.op("Reshape", [e.op("Expand", [e.op("Unsqueeze", [after, e.ints(2)]), e.ints(1, 1, g, 1, 1)]), heads])
    past, new = e.shape_dim(past_k, 2), e.shape_dim(v_new, 2)
    total = e.op("Add", [past, new])
    f, one = {"to": ir.DataType.FLOAT}, e.const(np.int64(1))  # float32 only (gqa_step_reason)
    first, end = (e.op("Add", [e.op("Squeeze", [x, e.ints(0)]), one]) for x in (past, total))
    seen = e.op("Cast", [e.op("Unsqueeze", [e.op("Range", [first, end, one]), e.ints(1)])], f)  # [S, 1]: P + i + 1
    fixed = e.op("Div", [e.op("Add", [e.op("Mul", [y, seen]), after]), e.op("Cast", [total], f)])
    return e.op("Where", [dead, fixed, y])


def attention_mask(e: SiteEdit, s: AttentionSite, q: ir.Value) -> tuple[ir.Value | None, bool]:
    """The site's mask as one input: additive float (terms summed) or boolean (True =
    attend), expanded to [*, *, Tq, Tk] since ONNX Runtime does not broadcast the query axis.
    A purely causal mask is dropped: is_causal says it."""
    if s.mask in ("none", "causal"):
        return None, False
    add = None
    for term in s.additive:
        t = e.term(term)
        add = t if add is None else e.op("Add", [add, t])
    cond = None
    if s.bool_mask is not None:
        cond = s.bool_mask.native
        if cond.dtype != ir.DataType.BOOL:
            cond = e.op("Cast", [cond], {"to": ir.DataType.BOOL})
        if not s.bool_keep:
            cond = e.op("Not", [cond])
    dt = next((t.dtype for t in s.additive if t.dtype), None) or s.q.value.dtype or "float32"
    low = e.const(np.asarray(HIDE.get(dt, HIDE["float32"]), dtype=_np_dtype(dt)))
    if add is not None:  # ORT reads the dtype's lowest value as "no key" (a zero row, as for -inf),
        lowest = e.const(np.asarray(_finfo_min(dt), dtype=_np_dtype(dt)))  # where the original's finite
        add = e.op("Where", [e.op("Equal", [add, lowest]), low, add])  # fill gives uniform weights
    if add is not None and cond is not None:
        mask = e.op("Where", [cond, add, _hidden_by_fill(e, s, low, dt)])
    elif cond is not None and s.mask_value is not None and np.isfinite(s.mask_value):
        mask, add = e.op("Where", [cond, e.op("Sub", [low, low]), low]), True  # finite fill: additive
    else:
        mask = add if add is not None else cond
    tq = e.shape_dim(q, 2)
    target = e.op("Concat", [e.ints(1, 1), tq, e.ints(1)], {"axis": 0})
    return e.op("Expand", [mask, target]), add is None


def _hidden_by_fill(e: SiteEdit, s: AttentionSite, low, dt: str):
    """What a key the boolean mask hides gets: `low`, or -inf where the original's fill
    plus the terms added after it overflows (a where-then-add double mask), so a row
    hidden completely spreads its weight over the same keys as the original."""
    if not s.filled_terms or s.mask_value is None or not np.isfinite(s.mask_value):
        return low
    after = None
    for term in s.additive:
        if term.name in s.filled_terms:
            after = e.term(term) if after is None else e.op("Add", [after, e.term(term)])
    dead = e.is_inf(e.op("Add", [e.const(np.asarray(s.mask_value, dtype=_np_dtype(dt))), after]),
                    dt in ("float16", "bfloat16"))
    return e.op("Where", [dead, e.const(np.asarray(-np.inf, dtype=_np_dtype(dt))), low])


def _finfo_min(name: str) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(_np_dtype(name)).min)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
