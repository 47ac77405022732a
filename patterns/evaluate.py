"""A site's attention probabilities in NumPy, from Q/K/V and masks probed in one run of
the model: for fused ops (no probabilities in the graph) as much as for eager ones.
Used by the sink-ratio report and the attention diagnostics."""

from __future__ import annotations

import numpy as np

from attn_opt.patterns.detect import MASKED
from attn_opt.patterns.site import AttentionSite, Operand
from attn_opt.rewriter import forms
from attn_opt.rewriter.graph import Value


def needed(site: AttentionSite) -> list[Value]:
    vals = [site.q.value, site.k.value]
    vals += [m for m in site.additive if m.const is None]
    if site.bool_mask is not None and site.bool_mask.const is None:
        vals.append(site.bool_mask)
    return vals


def _get(v: Value, probed: dict) -> np.ndarray:
    return v.const if v.const is not None else probed[v.name]


def _bhsd(op: Operand, probed: dict) -> np.ndarray:
    x = _get(op.value, probed)
    x = np.transpose(x, op.perm) if op.perm else x
    return x.reshape((-1, op.fold) + x.shape[1:]) if op.fold else x


def _four_d(m: np.ndarray) -> np.ndarray:
    return m.reshape((1,) * (4 - m.ndim) + m.shape) if m.ndim < 4 else m


def scores(site: AttentionSite, probed: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, visible), S = scale·Q·Kᵀ + additive terms, [B, H, Tq, Tk] in float64."""
    if any(op.packed for op in (site.q, site.k)):
        raise ValueError(f"site {site.id}: Q/K are packed [B, S, H*D]; no per-head probabilities")
    q = _bhsd(site.q, probed).astype(np.float64)
    k = _bhsd(site.k, probed).astype(np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = q @ np.swapaxes(k, -1, -2) * site.scale
    if site.softcap:
        s = np.tanh(s / site.softcap) * site.softcap
    vis = np.ones(s.shape, bool)
    for m in site.additive:
        a = np.asarray(_get(m, probed), dtype=np.float64)
        if m.name in site.folded_terms and a.ndim == 3:
            a = a.reshape((-1, site.heads) + a.shape[1:])
        a = _four_d(a)
        s = s + a
        vis &= a > MASKED
    if site.bool_mask is not None:
        c = _four_d(np.asarray(_get(site.bool_mask, probed)).astype(bool))
        vis &= c if site.bool_keep else ~c
    if site.causal and site.rule != "eager":
        tq, tk = s.shape[-2:]
        vis &= np.tril(np.ones((tq, tk), bool), tk - tq)
    return s, np.broadcast_to(vis, s.shape)


def probabilities(site: AttentionSite, probed: dict, normalise=forms.softmax) -> np.ndarray:
    s, vis = scores(site, probed)
    return normalise(s, vis)
