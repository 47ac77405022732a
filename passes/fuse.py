"""fuse (exact): each eager site becomes one attention op.

target=onnx: the standard `Attention` op (opset 23; the model is converted up when it
is older). target=ort: ONNX Runtime's `com.microsoft.MultiHeadAttention` (no GQA there:
GQA sites get `Attention`). target=auto: per site shape, whichever of the two ONNX
Runtime's CPU provider runs faster, timed once per shape and said in the report
(backends/onnx/ort.py). On torch.fx: one `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.patterns.form import FUSED_TARGETS, Form
from attn_opt.patterns.site import AttentionSite
from attn_opt.rewriter.passbase import Pass, option

FUSED_RULES = ("onnx-attention", "ms-mha", "ms-gqa", "ms-attention", "sdpa", "torch-mha")


@dataclass(frozen=True)
class Fuse(Pass):
    name: ClassVar[str] = "fuse"
    exact: ClassVar[bool] = True
    why: ClassVar[str] = "one fused attention op per site, the same function"
    produces: ClassVar[str] = "fused"
    target: str = option("auto", "which fused op (ONNX models; torch.fx gets scaled_dot_product_attention)",
                         choices=FUSED_TARGETS)

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

    def form(self, site: AttentionSite, diag=None) -> Form:
        return Form(fused=self.target)
