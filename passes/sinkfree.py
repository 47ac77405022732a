"""sinkfree: attention without sinks (rewrite-forms.md).

mode=logit       P_ij = exp(S_ij) / (exp(b_h) + Σ_j exp(S_ij)): a learnable null slot;
                 bias=-inf is softmax exactly, bias=0 is softmax-off-by-one; weights=FILE
                 loads b_h per site and head (.npz / .safetensors, key "<site>.sink_logit").
mode=redistribute  in the chosen heads, scale the attention the first `sinks` tokens
                 receive by α and renormalise the rest (training-free).
mode=relu        ReLU(S_ij) / n_i over the keys row i may see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.backends.onnxruntime.explicit import (MIN, emit_explicit, f32, per_head, row_max, row_sum, safe_div,
                                                    softmax_visible)
from attn_opt.passes._explicit_base import EXPLICIT_OPSET, explicit_skip_reason
from attn_opt.rewriter.errors import UserError
from attn_opt.rewriter.passbase import Pass, option
from attn_opt.rewriter.weights import load_weights


@dataclass(frozen=True)
class Sinkfree(Pass):
    name: ClassVar[str] = "sinkfree"
    exact: ClassVar[bool] = False
    why: ClassVar[str] = "remove attention sinks: a null-slot logit, redistribution, or ReLU attention"
    mode: str = option("logit", "which form", choices=("logit", "redistribute", "relu"))
    bias: float | None = option(None, "logit: the null-slot logit b (all heads); -inf is softmax")
    weights: str | None = option(None, "logit: per-head b_h from .npz/.safetensors (key <site>.sink_logit)")
    alpha: float | None = option(None, "redistribute: scale of the sink tokens' share")
    sinks: int = option(1, "redistribute: how many first tokens are sinks")
    heads: tuple[int, ...] | None = option(None, "redistribute: heads to change (default all), e.g. 0+3+5")

    def __post_init__(self):
        if self.mode == "logit" and (self.bias is None) == (self.weights is None):
            raise UserError("sinkfree: mode=logit needs exactly one of bias=B or weights=FILE")
        if self.mode == "redistribute" and (self.alpha is None or not 0 <= self.alpha):
            raise UserError("sinkfree: mode=redistribute needs alpha=A >= 0")
        if self.sinks < 1:
            raise UserError("sinkfree: sinks must be >= 1")
        if self.mode != "logit" and (self.bias is not None or self.weights is not None):
            raise UserError(f"sinkfree: bias/weights belong to mode=logit, not mode={self.mode}")
        if self.weights is not None:
            load_weights(self.weights)  # a missing or unreadable file fails now, not mid-pipeline

    def is_exact(self) -> bool:
        return self.mode == "logit" and self.bias == -math.inf or (self.mode == "redistribute" and self.alpha == 1)

    def skip_reason(self, site):
        reason = explicit_skip_reason(site)
        if reason:
            return reason
        if self.heads and max(self.heads) >= site.heads:
            return f"head {max(self.heads)} does not exist ({site.heads} heads)"
        return None

    def needs_opset(self) -> int:
        return EXPLICIT_OPSET

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

    def rewrite_onnx(self, e, choice) -> str:
        site = e.site
        if self.mode == "logit":
            b = self.site_bias(site)
            norm = lambda e_, s, vis: self._logit(e_, s, vis, per_head(e_, site, b))  # noqa: E731
            note = f"sink logit b = {np.array2string(b, precision=3)}"
        elif self.mode == "redistribute":
            norm = lambda e_, s, vis: self._redistribute(e_, s, vis, site)  # noqa: E731
            note = f"redistribute α={self.alpha:g} over the first {self.sinks} token(s)"
        else:
            norm, note = self._relu, "ReLU(S)/n_i"
        e.commit(emit_explicit(e, site, norm))
        return note

    @staticmethod
    def _logit(e, s, vis, b):
        m = e.op("Max", [row_max(e, e.op("Where", [vis, s, f32(e, MIN)])), b])
        ex = e.op("Where", [vis, e.op("Exp", [e.op("Sub", [s, m])]), f32(e, 0)])
        den = e.op("Add", [row_sum(e, ex), e.op("Exp", [e.op("Sub", [b, m])])])
        return safe_div(e, ex, den)

    def _redistribute(self, e, s, vis, site):
        p = softmax_visible(e, s, vis)
        n = self.sinks
        head = e.op("Slice", [p, e.ints(0), e.ints(n), e.ints(-1)])
        tail = e.op("Slice", [p, e.ints(n), e.ints(2 ** 62), e.ints(-1)])
        m = row_sum(e, head)
        rest = e.op("Sub", [f32(e, 1), m])
        scaled = e.op("Concat", [e.op("Mul", [head, f32(e, self.alpha)]),
                                 e.op("Mul", [tail, safe_div(e, e.op("Sub", [f32(e, 1), e.op("Mul", [m, f32(e, self.alpha)])]), rest)])],
                      {"axis": -1})
        keep = e.op("Less", [rest, f32(e, 1e-6)])  # a row all on the sinks is left as it is
        if self.heads:
            chosen = np.zeros(site.heads, np.float32)
            chosen[list(self.heads)] = 1
            keep = e.op("Or", [keep, e.op("Equal", [per_head(e, site, chosen), f32(e, 0)])])
        return e.op("Where", [keep, p, scaled])

    @staticmethod
    def _relu(e, s, vis):
        n = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        return safe_div(e, e.op("Where", [vis, e.op("Relu", [s]), f32(e, 0)]), n)
