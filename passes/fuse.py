"""fuse (exact): each eager site becomes one attention op.

target=onnx: the standard `Attention` op (opset 23; the model is converted up when it
is older). target=ort: ONNX Runtime's `com.microsoft.MultiHeadAttention` (no GQA there:
GQA sites get `Attention`). target=auto: per site shape, whichever of the two ONNX
Runtime's CPU provider runs faster, timed once per shape and said in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnxruntime.edit import MS, SiteEdit, ensure_opset
from attn_opt.patterns.site import AttentionSite
from attn_opt.rewriter.passbase import Pass, option

FUSED_RULES = ("onnx-attention", "ms-mha", "ms-gqa", "ms-attention", "sdpa", "torch-mha")
HIDE = {"float32": -1e30, "float64": -1e30, "bfloat16": -1e30, "float16": -6e4}  # hidden, yet finite


@dataclass(frozen=True)
class Fuse(Pass):
    name: ClassVar[str] = "fuse"
    exact: ClassVar[bool] = True
    why: ClassVar[str] = "one fused attention op per site, the same function"
    target: str = option("auto", "which fused op", choices=("onnx", "ort", "auto"))

    def skip_reason(self, site: AttentionSite) -> str | None:
        if site.rule in FUSED_RULES:
            return f"already one op ({site.rule})"
        if site.probs_shared:
            return "its attention probabilities are used outside the attention too; fusing would lose them"
        if site.heads is None or site.head_dim is None:
            return "heads or head size unknown (the model did not run on sample inputs)"
        if any(op.packed for op in (site.q, site.k, site.v)):
            return "Q/K/V are not in [B, H, S, D] layout"
        return None

    def needs_opset(self) -> int | None:
        return 23  # target=ort still uses Attention for GQA sites

    def rewrite_fx(self, gm, site: AttentionSite, diag=None) -> str:
        """On torch.fx: one F.scaled_dot_product_attention (target does not apply)."""
        from attn_opt.backends.torch_fx import fuse_site

        fuse_site(gm, site)
        if site.softcap:
            return f"one call of the dense form with soft-cap {site.softcap:g} (SDPA has no soft-cap)"
        return "scaled_dot_product_attention"

    def choose(self, site: AttentionSite) -> tuple[str, str]:
        """(target, why) for one site."""
        dtype = site.output.dtype or site.q.value.dtype
        if self.target != "onnx" and dtype not in (None, "float32"):
            return "onnx", f"ORT's CPU MultiHeadAttention takes float32 only; this site is {dtype}"
        if self.target != "onnx" and site.softcap:
            return "onnx", "MultiHeadAttention has no soft-cap; Attention (opset 23) has"
        if self.target != "auto":
            return self.target, "asked for"
        from attn_opt.backends.onnxruntime.bench import fastest_fused

        b, h, tq, tk, d = site.run_shape or (1, site.heads, 128, 128, site.head_dim)
        return fastest_fused(b, h, site.kv_heads, max(tq, tk), d)

    def rewrite_onnx(self, e: SiteEdit, choice: tuple[str, str]) -> str:
        """Emit the fused op for `e.site`; returns a note for the report."""
        s = e.site
        choice, why = choice
        q, k, v = e.bhsd(s.q), e.bhsd(s.k), e.bhsd(s.v)
        mask, is_bool = attention_mask(e, s, q)
        if choice == "ort" and not s.gqa:
            out = _ms_mha(e, s, q, k, v, mask, is_bool)
        else:
            ensure_opset(e.model, "", 23)
            attrs = {"scale": float(s.scale), "is_causal": int(s.mask == "causal")}
            if s.softcap:
                attrs["softcap"] = float(s.softcap)
            out = e.op("Attention", [q, k, v] + ([mask] if mask is not None else []), attrs)
            if choice == "ort":
                why = "MultiHeadAttention has no grouped-query form"
            choice = "onnx"
        e.commit(out)
        op = "MultiHeadAttention (com.microsoft)" if choice == "ort" else "Attention (opset 23)"
        return f"{op}: {why}"


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
        mask = e.op("Where", [cond, add, low])
    elif cond is not None and s.mask_value is not None and np.isfinite(s.mask_value):
        mask, add = e.op("Where", [cond, e.op("Sub", [low, low]), low]), True  # finite fill: additive
    else:
        mask = add if add is not None else cond
    tq = e.shape_dim(q, 2)
    target = e.op("Concat", [e.ints(1, 1), tq, e.ints(1)], {"axis": 0})
    return e.op("Expand", [mask, target]), add is None


def _finfo_min(name: str) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(_np_dtype(name)).min)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _ms_mha(e: SiteEdit, s: AttentionSite, q, k, v, mask, is_bool: bool):
    """MultiHeadAttention wants Q [B, S, H*D] and takes K/V as [B, H, S, D]; bias additive."""
    ensure_opset(e.model, MS, 1)
    q3 = e.op("Reshape", [e.op("Transpose", [q], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])
    if mask is not None and is_bool:  # a row hidden by a boolean mask gives zeros, as with -inf
        mask = e.op("Where", [mask, e.const(np.float32(0)), e.const(np.float32(-np.inf))])
    inputs = [q3, k, v, None, None, mask]
    out3 = e.op("MultiHeadAttention", inputs, {"num_heads": int(s.heads), "scale": float(s.scale),
                                                "unidirectional": int(s.mask == "causal")}, domain=MS)
    out3 = e.op("Where", [e.op("IsNaN", [out3]), e.const(np.float32(0)), out3])  # a row with no key: 0, not NaN
    b_s_h_d = e.op("Reshape", [out3, e.ints(0, 0, int(s.heads), -1)])
    return e.op("Transpose", [b_s_h_d], {"perm": [0, 2, 1, 3]})
