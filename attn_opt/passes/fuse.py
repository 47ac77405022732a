"""fuse (exact): each eager site becomes one attention op.

target=onnx: the standard `Attention` op (opset 23; the model is converted up when it
is older). target=ort: ONNX Runtime's `com.microsoft.MultiHeadAttention` (no GQA there:
GQA sites get `Attention`). target=auto: per site shape, whichever of the two ONNX
Runtime's CPU provider runs faster, timed once per shape and said in the report
(backends/onnx/ort.py). On torch.fx: one `scaled_dot_product_attention`.

A decoder step (K/V = Concat(past input, new), returned as present) keeps its cache:
target=onnx gives `Attention` with past_key/past_value and present outputs; target=ort
gives `com.microsoft.GroupQueryAttention` reading the same past inputs and writing the
same present outputs (MHA sites too: kv_num_heads = num_heads), and target=auto the
faster of the two at the site's shape. Where GroupQueryAttention cannot take the step
(not causal, a boolean mask, not float32, ...) the site gets `Attention`
and the report says why. A site a pass already rewrote keeps its pattern and normaliser
in the form; the backend says whether a fused op computes them (ONNX: softmax, or a sink
logit on a decoder step with target=ort|auto as GroupQueryAttention's head_sink; torch:
softmax), else the site is skipped, saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.patterns.form import FUSED_TARGETS, Form
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.passbase import Pass, option

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
        """One op computing the site as it is: its pattern and normaliser travel with the
        form, and the backend says whether its fused op has them."""
        return Form(fused=self.target, pattern=site.pattern, normaliser=site.normaliser)
