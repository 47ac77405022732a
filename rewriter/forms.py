"""The normalisers of every attention form, in NumPy: the executable statement of
docs' rewrite-forms.md that the tests compare the ONNX lowerings against, and that the
sink-ratio diagnostics run on probed Q/K/V.

Every function maps scores `s` [..., Tq, Tk] (scale and additive bias included) and
`vis` (keys each row may see) to probabilities, 0 outside `vis`, a zero row where a row
sees nothing.
"""

from __future__ import annotations

import numpy as np


def _safe_div(num, den):
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den > 0)


def softmax(s, vis):
    m = np.max(np.where(vis, s, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.where(vis, np.exp(s - m), 0.0)
    return _safe_div(e, e.sum(-1, keepdims=True))


def softplus(s, vis, n_train: int | None = None, p: float = 1.0):
    """A_ij = φ(λ_i s_ij) / Σ_j φ(λ_i s_ij), φ = softplus, λ_i = log n_i / log n_train."""
    n = vis.sum(-1, keepdims=True).astype(np.float64)
    lam = np.log(np.maximum(n, 1)) / np.log(n_train) if n_train else np.ones_like(n)
    a = np.where(vis, np.logaddexp(0, lam * s), 0.0)
    a = _safe_div(a, a.sum(-1, keepdims=True))
    if p != 1:
        a = a ** p
        a = _safe_div(a, a.sum(-1, keepdims=True))
    return a


def sink_logit(s, vis, bias):
    """exp(s_ij) / (exp(b_h) + Σ_j exp(s_ij)); `bias` broadcasts over [..., H, 1, 1]."""
    b = np.asarray(bias, dtype=np.float64)
    m = np.maximum(np.max(np.where(vis, s, -np.inf), axis=-1, keepdims=True), b)
    m = np.where(np.isfinite(m), m, 0)
    e = np.where(vis, np.exp(s - m), 0.0)
    return _safe_div(e, e.sum(-1, keepdims=True) + np.exp(b - m))


def redistribute(s, vis, alpha: float, sinks: int = 1, heads=None):
    """Scale the mass on the first `sinks` keys by α and renormalise the rest so rows sum to 1."""
    p = softmax(s, vis)
    m = p[..., :sinks].sum(-1, keepdims=True)
    rest = 1 - m
    scale_rest = _safe_div(1 - alpha * m, rest)
    q = np.concatenate([alpha * p[..., :sinks], p[..., sinks:] * scale_rest], axis=-1)
    q = np.where(rest < 1e-6, p, q)
    if heads is not None:  # p is [B, H, Tq, Tk]
        sel = np.zeros(p.shape[1], bool)
        sel[list(heads)] = True
        q = np.where(sel[None, :, None, None], q, p)
    return q


def relu(s, vis):
    n = vis.sum(-1, keepdims=True).astype(np.float64)
    return _safe_div(np.where(vis, np.maximum(s, 0), 0.0), n)


def sink_ratio(p: np.ndarray) -> np.ndarray:
    """Per head: the mean share of attention the first key receives. p is [B, H, Tq, Tk]."""
    return p[..., 0].mean(axis=(0, 2))
