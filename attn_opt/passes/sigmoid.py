"""sigmoid (approximate): sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and
Best Practices for Sigmoid Self-Attention"; FlashSigmoid):

    P_ij = σ(S_ij + b) over the keys row i may see, 0 elsewhere, no row normalisation

bias=auto (default) is b = −log n_i, n_i the keys row i sees, so a row's weights start
summing to about 1 as softmax's do; or a number for every row. Composes with sparse (a
windowed sigmoid: n_i counts the window's keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.patterns.form import Form, Normaliser, form_skip_reason
from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option


@dataclass(frozen=True)
class Sigmoid(Pass):
    name: ClassVar[str] = "sigmoid"
    why: ClassVar[str] = "sigmoid attention σ(S + b), b = −log n_i, with no row normalisation"
    replaces_normaliser: ClassVar[bool] = True
    bias: str = option("auto", "the score offset b", accepts="auto (−log n_i), or a number")

    def __post_init__(self):
        if self.bias != "auto":
            try:
                b = float(self.bias)
            except ValueError:
                raise UserError(f"sigmoid: bad value {self.bias!r} for bias (expected auto or a number)") from None
            if b != b or abs(b) == float("inf"):
                raise UserError("sigmoid: bias must be a finite number or auto")

    def skip_reason(self, site):
        return form_skip_reason(site)

    def form(self, site, diag=None) -> Form:
        bias = None if self.bias == "auto" else (float(self.bias),)
        return Form(site.pattern, Normaliser("sigmoid", bias=bias), notes=("sparse pattern kept",) if site.pattern else ())
