"""softplus (approximate): softmax read as φ = exp then ℓ1 normalisation; keep the
normalisation, swap the map (Gao & Spratling 2025):

    A_ij = φ(λ_i S_ij) / Σ_j φ(λ_i S_ij),  φ = softplus,  λ_i = log n_i / log n_train

then optionally A' = A^p / Σ_j A^p. Masked keys are left out of the map and the sum.
No max-subtraction is needed: softplus does not overflow the way exp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.backends.onnxruntime.explicit import emit_explicit, f32, row_sum, safe_div
from attn_opt.passes._explicit_base import EXPLICIT_OPSET, explicit_skip_reason
from attn_opt.rewriter.errors import UserError
from attn_opt.rewriter.passbase import Pass, option


@dataclass(frozen=True)
class Softplus(Pass):
    name: ClassVar[str] = "softplus"
    exact: ClassVar[bool] = False
    why: ClassVar[str] = "softplus map with ℓ1 normalisation and length scaling instead of softmax"
    n_train: int | None = option(None, "training length for the length scale λ_i = log n_i / log n_train")
    p: float = option(1.0, "re-weighting power (>= 1)")

    def __post_init__(self):
        if self.n_train is not None and self.n_train < 2:
            raise UserError("softplus: n_train must be >= 2")
        if self.p < 1:
            raise UserError("softplus: p must be >= 1")

    def skip_reason(self, site):
        return explicit_skip_reason(site)

    def needs_opset(self) -> int:
        return EXPLICIT_OPSET

    def rewrite_onnx(self, e, choice) -> str:
        e.commit(emit_explicit(e, e.site, self.normalise))
        return f"softplus, λ={'log n_i / log %d' % self.n_train if self.n_train else '1'}, p={self.p:g}"

    def normalise(self, e, s, vis):
        zero = f32(e, 0)
        if self.n_train:
            n = row_sum(e, e.op("Cast", [vis], {"to": 1}))
            lam = e.op("Div", [e.op("Log", [e.op("Max", [n, f32(e, 1)])]), f32(e, __import__("math").log(self.n_train))])
            s = e.op("Mul", [s, lam])
        a = e.op("Where", [vis, e.op("Softplus", [s]), zero])
        a = safe_div(e, a, row_sum(e, a))
        if self.p != 1:
            a = e.op("Pow", [a, f32(e, self.p)])
            a = safe_div(e, a, row_sum(e, a))
        return a
