"""sinkfree: attention without sinks (rewrite-forms.md).

mode=logit       P_ij = exp(S_ij) / (exp(b_h) + Σ_j exp(S_ij)): a learnable null slot;
                 bias=-inf is softmax exactly, bias=0 is softmax-off-by-one; weights=FILE
                 loads b_h per site and head (.npz / .safetensors, key "<site>.sink_logit").
mode=redistribute  in the chosen heads, scale the attention the first `sinks` tokens
                 receive by α and renormalise the rest (training-free).
mode=relu        ReLU(S_ij) / n_i over the keys row i may see.
On torch.fx the sink logits of mode=logit are an nn.Parameter of the module (trainable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.patterns.form import Form, Normaliser, form_skip_reason
from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option
from attn_opt.core.weights import load_weights


@dataclass(frozen=True)
class Sinkfree(Pass):
    name: ClassVar[str] = "sinkfree"
    replaces_normaliser: ClassVar[bool] = True
    why: ClassVar[str] = "remove attention sinks: a null-slot logit, redistribution, or ReLU attention"
    mode: str = option("logit", "which form", choices=("logit", "redistribute", "relu"))
    bias: float | None = option(None, "logit: the null-slot logit b (all heads); -inf is softmax", infinite=("-inf",))
    weights: str | None = option(None, "logit: per-head b_h from .npz/.safetensors (key <site>.sink_logit)")
    alpha: float | None = option(None, "redistribute: scale of the sink tokens' share", low=0, high=1)
    sinks: int = option(1, "redistribute: how many first tokens are sinks", low=1)
    heads: tuple[int, ...] | None = option(None, "redistribute: heads to change (default all), e.g. 0+3+5", low=0)

    def __post_init__(self):
        if self.mode == "logit" and (self.bias is None) == (self.weights is None):
            raise UserError("sinkfree: mode=logit needs exactly one of bias=B or weights=FILE")
        if self.mode == "redistribute" and self.alpha is None:
            raise UserError("sinkfree: mode=redistribute needs alpha=A (0 to 1)")
        if self.bias is not None and self.bias != self.bias:
            raise UserError("sinkfree: bias cannot be nan")
        if self.mode != "logit" and (self.bias is not None or self.weights is not None):
            raise UserError(f"sinkfree: bias/weights belong to mode=logit, not mode={self.mode}")
        if self.weights is not None:
            load_weights(self.weights)  # a missing or unreadable file fails now, not mid-pipeline

    def is_exact(self) -> bool:
        return self.mode == "logit" and self.bias == -math.inf or (self.mode == "redistribute" and self.alpha == 1)

    def exact_on(self, site) -> bool:
        return self.is_exact() and site.normaliser.is_softmax  # a site's own sink logits are what it removes

    def skip_reason(self, site):
        reason = form_skip_reason(site)
        if reason:
            return reason
        if self.heads and max(self.heads) >= site.heads:
            return f"head {max(self.heads)} does not exist ({site.heads} heads)"
        return None

    def site_bias(self, site) -> np.ndarray:
        if self.weights is None:
            return np.full(site.heads, self.bias, dtype=np.float32)
        table = load_weights(self.weights)
        key = f"{site.id}.sink_logit"
        if key not in table:
            raise UserError(f"sinkfree: {self.weights} has no {key!r} (keys: {', '.join(sorted(table)[:8])})")
        b = np.asarray(table[key], dtype=np.float32).reshape(-1)
        if b.size not in (1, site.heads):
            raise UserError(f"sinkfree: {key} has {b.size} values; site {site.id} has {site.heads} heads")
        return np.broadcast_to(b, (site.heads,)).copy()

    def form(self, site, diag=None) -> Form:
        if self.mode == "logit":
            norm = Normaliser("logit", bias=tuple(float(b) for b in self.site_bias(site)))
        elif self.mode == "redistribute":
            norm = Normaliser("redistribute", alpha=self.alpha, sinks=self.sinks, heads=self.heads)
        else:
            norm = Normaliser("relu")
        return Form(site.pattern, norm, notes=("sparse pattern kept",) if site.pattern else ())
