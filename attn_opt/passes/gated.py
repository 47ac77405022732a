"""gated (exact at insertion, trainable after): Gated Attention (Qiu et al. 2025), a
head-specific, query-dependent sigmoid gate on the attention output before Wo:

    O_h' = O_h ⊙ σ(X W_g[h] + b_g[h])

X is the hidden state that fed the Q projection. mode=headwise: W_g is [D, H] (one
scalar per head and token); mode=elementwise: [D, H·dv]. Inserted with W_g = 0 and
b_g = 30, where σ rounds to exactly 1 in fp32, so the model is unchanged until trained
gates are loaded (weights=FILE: .npz/.safetensors keys "<site>.weight", "<site>.bias").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.patterns.form import Form, Gate
from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option
from attn_opt.core.weights import load_weights

OPEN_BIAS = 30.0  # σ(30) = 1 - 9e-14: exactly 1.0 in fp32


@dataclass(frozen=True)
class Gated(Pass):
    name: ClassVar[str] = "gated"
    exact: ClassVar[bool] = True
    produces: ClassVar[str] = "gate"
    computes_attention: ClassVar[bool] = False  # the gate reads the site's output; the site stays
    once: ClassVar[bool] = True
    why: ClassVar[str] = "a sigmoid gate per head on the attention output (Gated Attention)"
    mode: str = option("headwise", "gate granularity", choices=("headwise", "elementwise"))
    weights: str | None = option(None, "trained gates (.npz/.safetensors, keys <site>.weight/<site>.bias)")

    def __post_init__(self):
        if self.weights is not None:
            load_weights(self.weights)

    def is_exact(self) -> bool:
        return self.weights is None

    def skip_reason(self, site):
        if gate_input(site) is None:
            return "no Q projection found, so no hidden state to drive the gate"
        if self.gate_shape(site)[0] is None:
            return "the hidden size of the gate's input is unknown"
        if site.heads is None or site.head_dim is None:
            return "heads or head size unknown (the model did not run on sample inputs)"
        if (why := rows_differ(site, gate_input(site))) is not None:
            return why
        four_d = site.output.rank in (None, 4) or (site.q.fold and site.output.rank == 3)  # [B*H, S, dv] unfolds
        if not four_d or site.rule in ("ms-mha", "ms-gqa", "ms-attention", "torch-mha"):
            return "the attention output is not [B, H, S, dv]"
        return None

    def gate_shape(self, site) -> tuple[int | None, int]:
        p = site.projections.get("q")
        if p is not None:
            w = p.weight.const
            d_model = int(w.shape[1] if p.transposed else w.shape[0])
        else:  # Q reaches its projection through other ops (rotary, norms): the hidden state's width
            shape = site.hidden.shape if site.hidden is not None else None
            d_model = shape[-1] if shape and isinstance(shape[-1], int) else None
        width = site.heads * (1 if self.mode == "headwise" else site.head_dim)
        return d_model, width

    def site_weights(self, site) -> tuple[np.ndarray, np.ndarray]:
        d_model, width = self.gate_shape(site)
        if self.weights is None:
            return np.zeros((d_model, width), np.float32), np.full(width, OPEN_BIAS, np.float32)
        table = load_weights(self.weights)
        got = []
        for part, shape in (("weight", (d_model, width)), ("bias", (width,))):
            key = f"{site.id}.{part}"
            if key not in table:
                raise UserError(f"gated: {self.weights} has no {key!r} (keys: {', '.join(sorted(table)[:8])})")
            arr = np.asarray(table[key], dtype=np.float32)
            if arr.shape != shape:
                raise UserError(f"gated: {key} has shape {arr.shape}; site {site.id} ({self.mode}) needs {shape}")
            got.append(arr)
        return got[0], got[1]

    def form(self, site, diag=None) -> Form:
        w, b = self.site_weights(site)
        src = gate_input(site)
        return Form(gate=Gate(self.mode, w, b, src),
                    notes=(f"{self.mode} gate from {src.name}: +{w.size + b.size} parameters",))


def rows_differ(site, src) -> str | None:
    """Why the gate's hidden state cannot give one gate per query row: its rows (static
    shape) are not the site's query rows (pooled landmarks, a sliced stream, windows)."""
    shape, q = src.shape, site.q.value.shape
    if not shape or len(shape) < 2 or not q or site.q.packed or len(q) != 4:
        return None
    rows, tq = shape[-2], q[site.q.perm[2]] if site.q.perm else q[2]
    if isinstance(rows, int) and isinstance(tq, int) and rows != tq:
        return (f"the gate's input {src.name} has {rows} rows, the site's queries {tq} (pooled or sliced "
                "queries): no gate per query row can be built from it")
    return None


def gate_input(site):
    """The hidden state that drives the gate: Q's projection input, else the hidden state
    Q is projected from through other ops."""
    p = site.projections.get("q")
    return p.x if p is not None else site.hidden
