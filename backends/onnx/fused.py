"""The fused lowering: a site as one attention op, the same function.

ONNX `Attention` (opset 23: GQA, soft-cap, any float dtype), or ONNX Runtime's
`com.microsoft.MultiHeadAttention` (backends/onnx/ort.py) where the fuse target asks for
it or, with target=auto, where it runs faster at the site's shape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx import ort
from attn_opt.backends.onnx.edit import SiteEdit, ensure_opset
from attn_opt.backends.onnx.visible import causal_visible
from attn_opt.patterns.cache import new_part
from attn_opt.patterns.site import AttentionSite

HIDE = {"float32": -1e30, "float64": -1e30, "bfloat16": -1e30, "float16": -6e4}  # hidden, yet finite


def choose(site: AttentionSite, target: str) -> tuple[str, str]:
    """("onnx" | "ort", why) for one site."""
    if site.cache is not None and site.cache.present_key and site.cache.present_value:
        return "onnx", "a decoder step: Attention reads the past cache and returns the present one"
    dtype = site.output.dtype or site.q.value.dtype
    if target != "onnx" and dtype not in (None, "float32"):
        return "onnx", f"ORT's CPU MultiHeadAttention takes float32 only; this site is {dtype}"
    if target != "onnx" and site.softcap:
        return "onnx", "MultiHeadAttention has no soft-cap; Attention (opset 23) has"
    if target != "auto":
        return target, "asked for"
    b, h, tq, tk, d = site.run_shape or (1, site.heads, 128, 128, site.head_dim)
    return ort.fastest_fused(b, h, site.kv_heads, max(tq, tk), d)


def emit_fused(e: SiteEdit, target: str) -> str:
    """The site as one op; returns a note for the report."""
    s = e.site
    choice, why = choose(s, target)
    q, k, v = e.bhsd(s.q), e.bhsd(s.k), e.bhsd(s.v)
    mask, is_bool = attention_mask(e, s, q)
    if choice == "ort" and not s.gqa:
        e.commit(ort.multi_head_attention(e, s, q, k, v, mask, is_bool))
        return f"MultiHeadAttention (com.microsoft): {why}"
    ensure_opset(e.model, "", 23)
    attrs = {"scale": float(s.scale), "is_causal": int(s.mask == "causal")}
    if s.softcap:
        attrs["softcap"] = float(s.softcap)
    cached = _with_cache(e, s)
    if cached is not None:  # past in, present out: the op's own cache inputs and outputs
        (k_new, v_new, past_k, past_v) = cached
        if s.mask == "causal":  # is_causal aligns the triangle top-left; a step's queries come last
            attrs["is_causal"], mask = 0, causal_visible(e, q, k)
        y, present_k, present_v = e.op("Attention", [q, k_new, v_new, mask, past_k, past_v], attrs, outputs=3)
        e.commit(y)
        e.replace_output(s.cache.present_key, present_k)
        e.replace_output(s.cache.present_value, present_v)
        return f"Attention (opset 23) with past_key/past_value in and present_key/present_value out: {why}"
    e.commit(e.op("Attention", [q, k, v] + ([mask] if mask is not None else []), attrs))
    if choice == "ort":
        why = "MultiHeadAttention has no grouped-query form"
    return f"Attention (opset 23): {why}"


def _with_cache(e: SiteEdit, s: AttentionSite):
    """(new K, new V, past key, past value) for Attention's cache inputs, when the site's
    K/V are Concat(past input, new) returned as present; else None."""
    if s.cache is None or not (s.cache.present_key and s.cache.present_value) or s.k.perm or s.v.perm:
        return None
    k, v = new_part(s.k.value), new_part(s.v.value)
    if k is None or v is None or k[0] is None or v[0] is None:
        return None
    return e.value(k[1]), e.value(v[1]), e.value(k[0]), e.value(v[0])


def attention_mask(e: SiteEdit, s: AttentionSite, q: ir.Value) -> tuple[ir.Value | None, bool]:
    """The site's mask as one input: additive float (terms summed) or boolean (True =
    attend), expanded to [*, *, Tq, Tk] since ONNX Runtime does not broadcast the query axis.
    A purely causal mask is dropped: is_causal says it."""
    if s.mask in ("none", "causal"):
        return None, False
    add = None
    for term in s.additive:
        t = e.value(term)
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
            after = e.value(term) if after is None else e.op("Add", [after, e.value(term)])
    dead = e.op("IsInf", [e.op("Add", [e.const(np.asarray(s.mask_value, dtype=_np_dtype(dt))), after])])
    return e.op("Where", [dead, e.const(np.asarray(-np.inf, dtype=_np_dtype(dt))), low])


def _finfo_min(name: str) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(_np_dtype(name)).min)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
