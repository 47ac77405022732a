"""softplus (approximate): softmax read as φ = exp then ℓ1 normalisation; keep the
normalisation, swap the map (Gao & Spratling 2025):

    A_ij = φ(λ_i S_ij) / Σ_j φ(λ_i S_ij),  φ = softplus,  λ_i = log n_i / log n_train

then optionally A' = A^p / Σ_j A^p. Masked keys are left out of the map and the sum.
No max-subtraction is needed: softplus does not overflow the way exp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.passes._explicit_base import EXPLICIT_OPSET, explicit_skip_reason
from attn_opt.rewriter.passbase import Pass, option


@dataclass(frozen=True)
class Softplus(Pass):
    name: ClassVar[str] = "softplus"
    exact: ClassVar[bool] = False
    why: ClassVar[str] = "softplus map with ℓ1 normalisation and length scaling instead of softmax"
    n_train: int | None = option(None, "training length for the length scale λ_i = log n_i / log n_train", low=2)
    p: float = option(1.0, "re-weighting power", low=1)

    def skip_reason(self, site):
        return explicit_skip_reason(site)

    def needs_opset(self) -> int:
        return EXPLICIT_OPSET

    def spec(self) -> dict:
        return {"kind": "softplus", "n_train": self.n_train, "p": self.p}

    def rewrite_fx(self, gm, site, diag=None) -> str:
        from attn_opt.backends.torch_fx import emit_form

        emit_form(gm, site, site.pattern, self.spec())
        return "softplus"

    def rewrite_onnx(self, e, choice) -> str:
        from attn_opt.backends.onnxruntime.lower import emit_attention

        emit_attention(e, e.site, e.site.pattern, self.spec())
        return f"softplus, λ={'log n_i / log %d' % self.n_train if self.n_train else '1'}, p={self.p:g}" + (
            ", sparse pattern kept" if e.site.pattern else "")
