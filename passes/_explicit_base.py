"""What the form passes (sparse, softplus, sinkfree) share: which sites the form lowering
(backends/onnxruntime/lower.py) can take, and the opset it needs."""

from __future__ import annotations

from attn_opt.patterns.site import AttentionSite


def explicit_skip_reason(site: AttentionSite) -> str | None:
    if any(op.packed for op in (site.q, site.k, site.v)):
        return "Q/K/V are not in [B, H, S, D] layout"
    if site.heads is None or site.kv_heads is None or site.head_dim is None or site.scale is None:
        return "heads, head size or scale unknown (the model did not run on sample inputs)"
    if site.probs_shared:
        return "its attention probabilities are used outside the attention too"
    for m in site.additive + ((site.bool_mask,) if site.bool_mask is not None else ()):
        shape = site.mask_shapes.get(m.name)
        if shape is None or len(shape) not in (2, 4):
            return f"mask {m.name} has an unsupported or unknown shape {shape}"
    return None


EXPLICIT_OPSET = 18  # ReduceMax/ReduceSum with axes as an input
