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

    def reference(self, site):
        """The NumPy normaliser of this form for `site` (rewriter/forms.py)."""
        from attn_opt.rewriter import forms

        if self.mode == "logit":
            b = self.site_bias(site).astype(np.float64)[None, :, None, None]
            return lambda s, v: forms.sink_logit(s, v, b)
        if self.mode == "redistribute":
            return lambda s, v: forms.redistribute(s, v, self.alpha, self.sinks, self.heads)
        return forms.relu

    def spec(self, site) -> dict:
        if self.mode == "logit":
            return {"kind": "logit", "bias": self.site_bias(site).tolist()}
        if self.mode == "redistribute":
            return {"kind": "redistribute", "alpha": self.alpha, "sinks": self.sinks,
                    "heads": list(self.heads) if self.heads else None}
        return {"kind": "relu"}

    def rewrite_fx(self, gm, site, diag=None) -> str:
        """On torch.fx the sink logits are an nn.Parameter of the module (trainable)."""
        import torch

        from attn_opt.backends.torch_fx import emit_form

        bias = None
        if self.mode == "logit" and np.all(np.isfinite(self.site_bias(site))):
            bias = f"attn_opt_{site.id}_sink_logit"
            gm.register_parameter(bias, torch.nn.Parameter(torch.from_numpy(self.site_bias(site))))
        emit_form(gm, site, site.pattern, self.spec(site), bias=bias)
        return f"sinkfree {self.mode}" + (f", sink logits in parameter {bias}" if bias else "")

    def rewrite_onnx(self, e, choice) -> str:
        from attn_opt.backends.onnxruntime.lower import emit_attention

        site = e.site
        emit_attention(e, site, site.pattern, self.spec(site))
        if self.mode == "logit":
            note = f"sink logit b = {np.array2string(self.site_bias(site), precision=3)}"
        elif self.mode == "redistribute":
            note = f"redistribute α={self.alpha:g} over the first {self.sinks} token(s)"
        else:
            note = "ReLU(S)/n_i"
        return note + (", sparse pattern kept" if site.pattern else "")
