"""softplus (approximate): softmax read as φ = exp then ℓ1 normalisation; keep the
normalisation, swap the map (Gao & Spratling 2025):

    A_ij = φ(λ_i S_ij) / Σ_j φ(λ_i S_ij),  φ = softplus,  λ_i = log n_i / log n_train

then optionally A' = A^p / Σ_j A^p. Masked keys are left out of the map and the sum.
No max-subtraction is needed: softplus does not overflow the way exp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.patterns.form import Form, Normaliser, form_skip_reason
from attn_opt.core.passbase import Pass, option


@dataclass(frozen=True)
class Softplus(Pass):
    name: ClassVar[str] = "softplus"
    why: ClassVar[str] = "softplus map with ℓ1 normalisation and length scaling instead of softmax"
    replaces_normaliser: ClassVar[bool] = True
    n_train: int | None = option(None, "training length for the length scale λ_i = log n_i / log n_train", low=2)
    p: float = option(1.0, "re-weighting power", low=1)

    def skip_reason(self, site):
        return form_skip_reason(site)

    def form(self, site, diag=None) -> Form:
        return Form(site.pattern, Normaliser("softplus", n_train=self.n_train, p=self.p),
                    notes=("sparse pattern kept",) if site.pattern else ())
