"""The NumPy reference of every form (patterns/form.py): the executable statement of the
forms' math that the ONNX, torch and Triton lowerings are tested against, and what the
diagnostics and the sink-ratio report run on a site's probed Q, K and masks.

A content pattern (patterns/form.py: Selection) is stated by `selected_visible` (routing:
`routing_visible`): the pairs it keeps given the probed Q and K.

Every normaliser maps scores `s` [..., Tq, Tk] (scale and additive terms included) and
`vis` (keys each row may see) to weights, 0 outside `vis`, a zero row where a row sees
nothing. Per-head values broadcast over the heads axis of [B, H, Tq, Tk].
"""

from __future__ import annotations

import numpy as np

from attn_opt.patterns.capability import FEATURES, Capabilities
from attn_opt.patterns.form import Normaliser, Pattern
from attn_opt.patterns.site import MASKED, AttentionSite, Operand
from attn_opt.core.graph import Value


def _safe_div(num, den):
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den > 0)


def softmax(s, vis):
    m = np.max(np.where(vis, s, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(over="ignore"):  # hidden scores may overflow; they are dropped
        e = np.where(vis, np.exp(s - m), 0.0)
    return _safe_div(e, e.sum(-1, keepdims=True))


def softplus(s, vis, n_train: int | None = None, p=1.0, kappa=None):
    """A_ij = φ(λ_i s_ij) / Σ_j φ(λ_i s_ij), φ = softplus, λ_i = log n_i / log n_train;
    with a (per-head) length exponent κ: λ_i = (log n_i / log n_train)^κ, n_train = 2
    where none is given. Then A^p / Σ A^p (p per head or one number)."""
    n = vis.sum(-1, keepdims=True).astype(np.float64)
    if kappa is not None:
        lam = (np.log(np.maximum(n, 2)) / np.log(n_train or 2)) ** kappa
    else:
        lam = np.log(np.maximum(n, 1)) / np.log(n_train) if n_train else np.ones_like(n)
    a = np.where(vis, np.logaddexp(0, lam * s), 0.0)
    a = _safe_div(a, a.sum(-1, keepdims=True))
    if np.any(np.asarray(p) != 1):
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


def sigmoid(s, vis, bias=None):
    """σ(s_ij + b) on visible keys, no row normalisation; b = −log n_i when `bias` is None."""
    if bias is None:
        n = vis.sum(-1, keepdims=True).astype(np.float64)
        bias = -np.log(np.maximum(n, 1))
    x = s + np.asarray(bias, dtype=np.float64)
    return np.where(vis, np.exp(-np.logaddexp(0, -x)), 0.0)  # σ(x), without overflow


def _per_head(values, s):
    """Per-head values shaped to broadcast over [B, H, Tq, Tk] scores."""
    return np.asarray(values, dtype=np.float64).reshape((1, -1) + (1,) * (s.ndim - 2))


def normalise(n: Normaliser, s, vis):
    """The weights of normaliser `n` on [B, H, Tq, Tk] scores (with its per-head
    parameters, gain · N(temperature · S + offset), where it is calibrated)."""
    h = s.shape[1]
    if n.calibrated:
        v = {k: _per_head(x, s) for k, x in n.values(h).items()}
        s = s * v["temperature"] + v["offset"]
        return CAPABILITIES.implementation("normaliser", n.kind)(n, s, vis, v) * v["gain"]
    return CAPABILITIES.implementation("normaliser", n.kind)(n, s, vis, None)


def _softmax(n: Normaliser, s, vis, v):
    return softmax(s, vis)


def _softplus(n: Normaliser, s, vis, v):
    return softplus(s, vis, n.n_train, v["p"], v["kappa"]) if v else softplus(s, vis, n.n_train, n.p)


def _logit(n: Normaliser, s, vis, v):
    return sink_logit(s, vis, v["bias"] if v else _per_head(n.per_head_bias(s.shape[1]), s))


def _redistribute(n: Normaliser, s, vis, v):
    return redistribute(s, vis, v["alpha"], n.sinks) if v else redistribute(s, vis, n.alpha, n.sinks, n.heads)


def _relu(n: Normaliser, s, vis, v):
    return relu(s, vis)


def _sigmoid(n: Normaliser, s, vis, v):
    return sigmoid(s, vis, None if n.bias is None else _per_head(n.per_head_bias(s.shape[1]), s))


def _block_means(x: np.ndarray, block: int) -> np.ndarray:
    """[B, H, T, D] -> [B, H, ceil(T/block), D]: each block's mean over its tokens in the sequence."""
    t = x.shape[2]
    nb = -(-t // block)
    pad = np.zeros(x.shape[:2] + (nb * block - t,) + x.shape[3:], x.dtype)
    sums = np.concatenate([x, pad], 2).reshape(x.shape[:2] + (nb, block) + x.shape[3:]).sum(3)
    count = np.minimum(block, t - np.arange(nb) * block).astype(x.dtype)
    return sums / count[:, None]


def seen_blocks(seen, block: int, kv_heads: int) -> np.ndarray:
    """[B|1, Hkv|1, nbq|1, nbk] bool: the (query block, key block) pairs holding at least
    one pair the site's masks keep (`seen` [B|1, H|1, Tq|1, Tk] bool; a KV group sees a
    block where any of its heads does)."""
    seen = np.asarray(seen, bool)
    seen = seen.reshape((1,) * (4 - seen.ndim) + seen.shape)
    b, h, tq, tk = seen.shape
    nbq, bq = (-(-tq // block), block) if tq > 1 else (1, 1)  # tq == 1: the same keys for every query
    nbk = -(-tk // block)
    x = np.pad(seen, ((0, 0), (0, 0), (0, nbq * bq - tq), (0, nbk * block - tk)))
    x = x.reshape(b, h, nbq, bq, nbk, block).any((3, 5))
    if h > 1:
        x = x.reshape(b, kv_heads, h // kv_heads, nbq, nbk).any(2)
    return x


def selected_blocks(pattern: Pattern, q: np.ndarray, k: np.ndarray, scale: float, seen=None) -> np.ndarray:
    """The key blocks each query block keeps, [B, Hkv, nbq, C] (patterns/form.py:
    Selection): forced blocks first, then by block score, ties to the lowest index; a
    block the site's masks hide from the whole query block (`seen`, see `seen_blocks`)
    ranks below every block it does not hide. q is [B, H, Tq, D], k [B, Hkv, Tk, D];
    scores in float32 as the lowerings compute them."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qm = _block_means(q.astype(np.float32), pattern.block)  # [B, H, nbq, D]
    qm = qm.reshape(b, hkv, h // hkv, -1, d).sum(2) * np.float32(scale)
    km = _block_means(k.astype(np.float32), pattern.block)  # [B, Hkv, nbk, D]
    score = qm @ np.swapaxes(km, -1, -2)  # [B, Hkv, nbq, nbk]
    a, c = np.arange(score.shape[2])[:, None], np.arange(score.shape[3])[None, :]
    if pattern.causal:  # a query block stands at the key block of its last query (a step: the cache's end)
        tq, tk = q.shape[2], k.shape[2]
        a = (np.minimum((a + 1) * pattern.block, tq) - 1 + tk - tq) // pattern.block
    seen_b = None if seen is None else seen_blocks(seen, pattern.block, hkv)
    if seen_b is not None:
        score = np.where(seen_b, score, -np.inf)
    cand = None
    for level in range(pattern.selection.levels - 1, 0, -1):  # HiP: coarse groups of 2^level blocks first
        m = 2 ** level
        s = qm @ np.swapaxes(_block_means(k.astype(np.float32), pattern.block * m), -1, -2)  # [B, Hkv, nbq, n_l]
        g = np.arange(s.shape[-1])[None, :]
        if seen_b is not None:  # a group some block of which the masks leave
            pad = np.zeros(seen_b.shape[:-1] + (s.shape[-1] * m - seen_b.shape[-1],), bool)
            s = np.where(np.concatenate([seen_b, pad], -1).reshape(seen_b.shape[:-1] + (-1, m)).any(-1), s, -np.inf)
        if pattern.causal:
            s = np.where(g * m > a, -np.inf, s)
        if cand is not None:
            s = np.where(cand, s, -np.inf)
        top = np.argsort(-s, axis=-1, kind="stable")[..., :min(pattern.selection.topk, s.shape[-1])]
        kept = np.zeros(s.shape, bool)
        np.put_along_axis(kept, top, True, axis=-1)
        cand = kept[..., np.arange(-(-score.shape[-1] // (m // 2))) // 2]  # their two halves, one level down
    if cand is not None:
        score = np.where(cand, score, -np.inf)
    rank = np.where(pattern.forced(a, c), np.inf, score)
    if pattern.causal:
        rank = np.where(c > a, -np.inf, rank)
    order = np.argsort(-rank, axis=-1, kind="stable")  # descending, equal ranks in index order
    return order[..., :sum(pattern.level_counts(score.shape[3]))]


def selected_visible(pattern: Pattern, q: np.ndarray, k: np.ndarray, scale: float, seen=None) -> np.ndarray:
    """[B, H, Tq, Tk] bool: the pairs a content pattern keeps (its selection, and
    causality where the pattern is causal; the site's masks apply on top; `seen`: the
    pairs they keep, which the selection ranks by)."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nbk = -(-tk // pattern.block)
    idx = selected_blocks(pattern, q, k, scale, seen)[..., :pattern.kept_blocks(nbk)]
    kept = np.zeros(idx.shape[:3] + (nbk,), bool)
    np.put_along_axis(kept, idx, True, axis=-1)  # [B, Hkv, nbq, nbk]
    i, j = np.arange(tq), np.arange(tk)
    vis = kept[:, :, i // pattern.block][..., j // pattern.block]  # [B, Hkv, Tq, Tk]
    if pattern.causal:
        vis = vis & (j[None, :] <= i[:, None] + tk - tq)
    return np.repeat(vis, h // hkv, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), np.float32(1e-12))


def routing_clusters(pattern: Pattern, q: np.ndarray, k: np.ndarray, seen=None) -> tuple[np.ndarray, np.ndarray]:
    """(members [B, Hkv, C, Tk] bool, nearest [B, H, Tq] int): each centroid's cluster of
    keys and each query's nearest centroid (patterns/form.py: Selection, routing), in
    float32 as the lowerings compute them."""
    sel = pattern.selection
    b, h, tq, d = q.shape
    hkv, tk, c = k.shape[1], k.shape[2], sel.clusters
    qn = _unit(q.astype(np.float32)).reshape(b, hkv, (h // hkv) * tq, d)
    kn = _unit(k.astype(np.float32))
    live = np.ones((b, 1, tk), bool)
    if seen is not None:  # keys some query may see
        x = np.asarray(seen, bool)
        live = live & x.reshape((1,) * (4 - x.ndim) + x.shape).any((1, 2))[:, None, :]
    w = np.broadcast_to(live, (b, hkv, tk)).astype(np.float32)
    run = (np.arange(tk) * c) // tk  # key j starts in centroid run[j]
    onehot = (run[:, None] == np.arange(c)[None, :]).astype(np.float32)  # [Tk, C]
    mu = _unit(np.swapaxes(onehot[None, None] * w[..., None], -1, -2) @ kn)  # [B, Hkv, C, d]
    pts = np.concatenate([qn, kn], 2)
    wp = np.concatenate([np.ones((b, hkv, qn.shape[2]), np.float32), w], 2)
    for _ in range(sel.iterations):
        near = np.argmax(pts @ np.swapaxes(mu, -1, -2), -1)  # [B, Hkv, N]
        m = (near[..., None] == np.arange(c)).astype(np.float32) * wp[..., None]  # [B, Hkv, N, C]
        mass = m.sum(2)[..., None]
        mu = np.where(mass > 0, _unit(np.swapaxes(m, -1, -2) @ pts), mu)
    n = min(tk, sel.size or -(-tk // c))
    sim = np.where(live[:, :, None, :], mu @ np.swapaxes(kn, -1, -2), -np.inf)  # [B, Hkv, C, Tk]
    order = np.argsort(-sim, axis=-1, kind="stable")[..., :n]
    members = np.zeros(sim.shape, bool)
    np.put_along_axis(members, order, True, axis=-1)
    nearest = np.argmax(qn @ np.swapaxes(mu, -1, -2), -1).reshape(b, h, tq)
    return members, nearest


def routing_visible(pattern: Pattern, q: np.ndarray, k: np.ndarray, seen=None) -> np.ndarray:
    """[B, H, Tq, Tk] bool: the pairs a routing pattern keeps (its query's cluster, the
    window band, causality where causal; the site's masks apply on top)."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    members, nearest = routing_clusters(pattern, q, k, seen)
    members = np.repeat(members, h // hkv, axis=1)  # [B, H, C, Tk]
    vis = np.take_along_axis(members, nearest[..., None], axis=2)  # [B, H, Tq, Tk]
    i, j = np.arange(tq)[:, None] + (tk - tq), np.arange(tk)[None, :]
    if pattern.window > 0:
        vis = vis | (((i - j >= 0) & (i - j < pattern.window)) if pattern.causal else (np.abs(i - j) <= pattern.window // 2))
    return vis & (j <= i) if pattern.causal else vis


def block_levels(pattern: Pattern, q: np.ndarray, k: np.ndarray, scale: float, seen=None) -> np.ndarray:
    """[B, Hkv, nbq, nbk]: the level each key block gets for each query block (0: its
    keys, l: pooled by 2^l, L + 1: dropped), from the ranking of `selected_blocks`."""
    nbk = -(-k.shape[2] // pattern.block)
    idx = selected_blocks(pattern, q, k, scale, seen)
    counts = pattern.level_counts(nbk)
    levels = np.full(idx.shape[:3] + (nbk,), len(counts), np.int64)
    rank_level = np.repeat(np.arange(len(counts)), counts)  # the level of each rank position
    np.put_along_axis(levels, idx, np.broadcast_to(rank_level, idx.shape), axis=-1)
    return levels


def pyramid_attention(pattern: Pattern, q, k, v, scale: float, term=None, keep=None) -> np.ndarray:
    """A pyramid pattern's output [B, H, Tq, Dv] (patterns/form.py: Selection): softmax over
    each row's full-resolution keys and pooled keys together. `term` [B|1, 1, 1, Tk]: the
    site's additive per-key terms summed; `keep` [B|1, 1, 1, Tk]: its boolean mask."""
    b, h, tq, _ = q.shape
    hkv, tk, blk = k.shape[1], k.shape[2], pattern.block
    nbk = -(-tk // blk)
    seen = np.ones((1, 1, 1, tk), bool)  # the keys the per-key masks keep rank first
    if term is not None:
        seen = seen & (np.asarray(term, np.float64).reshape(-1, 1, 1, tk) > MASKED)
    if keep is not None:
        seen = seen & np.asarray(keep, bool).reshape(-1, 1, 1, tk)
    levels = np.repeat(block_levels(pattern, q, k, scale, seen), h // hkv, axis=1)  # [B, H, nbq, nbk]
    q64, k64, v64 = (np.repeat(x.astype(np.float64), h // x.shape[1], axis=1) for x in (q, k, v))
    pad = nbk * blk - tk
    w = np.broadcast_to(np.arange(nbk * blk) < tk, (b, 1, nbk * blk)).astype(np.float64)
    t = np.zeros((b, 1, nbk * blk))
    if term is not None:
        tt = np.broadcast_to(np.asarray(term, np.float64).reshape(-1, 1, tk), (b, 1, tk))
        w[..., :tk] *= tt > MASKED
        t[..., :tk] = np.where(tt > MASKED, tt, 0)
    if keep is not None:
        w[..., :tk] *= np.broadcast_to(np.asarray(keep, bool).reshape(-1, 1, tk), (b, 1, tk))
    kp, vp = (np.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k64, v64))
    logits, values, vis = [], [], []
    qblock = np.arange(tq) // blk
    for lv in range(pattern.selection.pyramid + 1):
        m = 2 ** lv
        n = w.reshape(b, 1, -1, m).sum(-1)  # [B, 1, G] visible keys per group
        den = np.maximum(n, 1)[..., None]
        kbar = (kp * w[..., None]).reshape(b, h, -1, m, kp.shape[-1]).sum(3) / den
        vbar = (vp * w[..., None]).reshape(b, h, -1, m, vp.shape[-1]).sum(3) / den
        tbar = (t * w).reshape(b, 1, -1, m).sum(-1) / np.maximum(n, 1)
        s = q64 @ np.swapaxes(kbar, -1, -2) * scale + (tbar + np.log(np.maximum(n, 1)))[:, :, None, :]
        gblock = np.arange(n.shape[-1]) * m // blk
        at = levels[:, :, qblock][..., gblock] == lv  # [B, H, Tq, G]
        logits.append(s)
        values.append(vbar)
        vis.append(at & (n > 0)[:, :, None, :])
    p = softmax(np.concatenate(logits, -1), np.concatenate(vis, -1))
    return p @ np.concatenate(values, 2)


def _topk(pattern: Pattern, q, k, scale):
    return selected_visible(pattern, q, k, scale)


def _routing(pattern: Pattern, q, k, scale):
    return routing_visible(pattern, q, k)


CAPABILITIES = Capabilities(
    "reference",
    normaliser={"softmax": _softmax, "softplus": _softplus, "logit": _logit, "redistribute": _redistribute,
                "relu": _relu, "sigmoid": _sigmoid},
    pattern={kind: Pattern.visible for kind in ("window", "shift", "stride", "grid")},
    selection={"topk": _topk, "pyramid": pyramid_attention, "routing": _routing},
    declined={f: "the reference states the attention weights; the lowerings of this part are tested against "
                 "the original model" for f in FEATURES})


def needed(site: AttentionSite) -> list[Value]:
    vals = [site.q.value, site.k.value]
    vals += [site.q.factor] if site.q.factor is not None and site.q.factor.const is None else []
    vals += [m for m in site.additive if m.const is None]
    if site.bool_mask is not None and site.bool_mask.const is None:
        vals.append(site.bool_mask)
    return vals


def _get(v: Value, probed: dict) -> np.ndarray:
    return v.const if v.const is not None else probed[v.name]


def operand(op: Operand, probed: dict) -> np.ndarray:
    """A probed operand as [B, H, S, D] (its permutation applied, heads unfolded)."""
    x = _get(op.value, probed)
    x = np.transpose(x, op.perm) if op.perm else x
    x = x * _get(op.factor, probed) if op.factor is not None else x  # a per-head score factor folded into Q
    x = x.reshape((-1,) + x.shape[2:]) if op.streams else x  # [B, N, H, S, D] -> [B*N, H, S, D]
    return x.reshape((-1, op.fold) + x.shape[1:]) if op.fold else x


def regrouped(a: np.ndarray, windows: int, batch: int) -> np.ndarray:
    """A term added to scores viewed [B/W, W, H, Tq, Tk] (Swin's shifted-window mask) as a
    term of the 4-D scores [B, ·, ·, ·]: broadcast over the B/W groups, W folded back."""
    a = np.asarray(a).reshape((1,) * (5 - np.ndim(a)) + np.shape(a))
    a = np.broadcast_to(a, (batch // windows, windows) + a.shape[2:])
    return a.reshape((-1,) + a.shape[2:])


def _four_d(m: np.ndarray) -> np.ndarray:
    return m.reshape((1,) * (4 - m.ndim) + m.shape) if m.ndim < 4 else m


def scores(site: AttentionSite, probed: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, visible), S = scale·Q·Kᵀ + additive terms, [B, H, Tq, Tk] in float64."""
    if any(op.packed for op in (site.q, site.k)):
        raise ValueError(f"site {site.id}: Q/K are packed [B, S, H*D]; no per-head probabilities")
    q = operand(site.q, probed).astype(np.float64)
    k = operand(site.k, probed).astype(np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = q @ np.swapaxes(k, -1, -2) * site.scale
    if site.softcap:
        s = np.tanh(s / site.softcap) * site.softcap
    vis = np.ones(s.shape, bool)
    for m in site.additive:
        a = np.asarray(_get(m, probed), dtype=np.float64) * (-1 if m.name in site.negated_terms else 1)
        if m.name in site.folded_terms and a.ndim == 3:
            a = a.reshape((-1, site.heads) + a.shape[1:])
        if m.name in site.regrouped_terms:
            a = regrouped(a, site.regroup, q.shape[0])
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


def probabilities(site: AttentionSite, probed: dict, normaliser: Normaliser | None = None) -> np.ndarray:
    """A site's weights [B, H, Tq, Tk] from its probed values (`normaliser`: the site's own)."""
    s, vis = scores(site, probed)
    return normalise(normaliser or site.normaliser, s, vis)
