"""Content patterns in PyTorch (patterns/form.py: Selection), as the ONNX lowering computes
them (backends/onnx/choose.py, gathered.py): mean-pooled block scores and a stable sort
choose each query block's key blocks; only those are gathered and attended, and a
pyramid's next-ranked blocks are attended pooled. forms.py's capability table calls
`gathered`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_opt.backends.torch.forms import _four, _heads5, _softcap, as_original
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import MASKED


def _block_means(x, block: int):
    """[B, H, T, D] -> [B, H, nb, D]: each block's mean over its tokens in the sequence."""
    b, h, t, d = x.shape
    nb = -(-t // block)
    sums = F.pad(x, (0, 0, 0, nb * block - t)).reshape(b, h, nb, block, d).sum(3)
    count = (t - torch.arange(nb, device=x.device) * block).clamp(max=block).to(x.dtype)
    return sums / count[:, None]


def forced_blocks(f: Pattern, a, c):
    """Query block a always keeps key block c: the torch statement of `Pattern.forced`."""
    out = c < f.sink_blocks()
    r = f.band_blocks()
    if r >= 0:
        out = out | (((a - c >= 0) & (a - c <= r)) if f.causal else ((a - c).abs() <= r))
    return out


def seen_blocks(sees, block: int, kv_heads: int):
    """[Bm, Hkv|1, nbq|1, nbk] bool from `sees` [Bm, Hm, Tqm, Tk] (the pairs the site's
    masks keep): as patterns/reference.py: seen_blocks."""
    b, h, tq, tk = sees.shape
    nbq, bq = (-(-tq // block), block) if tq > 1 else (1, 1)
    nbk = -(-tk // block)
    x = F.pad(sees.float(), (0, nbk * block - tk, 0, nbq * bq - tq)).reshape(b, h, nbq, bq, nbk, block)
    x = x.amax((3, 5)) > 0
    return x.reshape(b, kv_heads, h // kv_heads, nbq, nbk).any(2) if h > 1 else x


def choose_blocks(f: Pattern, q, k, scale: float, sees=None):
    """The key blocks each query block keeps, [B, Hkv, nbq, C]: forced blocks first, then
    by mean-pooled score (a block the site's masks hide from the whole query block, per
    `sees` [Bm, Hm, Tqm, Tk], below the others), ties to the lowest index (a stable sort;
    torch.topk does not promise an order among equals). See patterns/reference.py:
    selected_blocks."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qm = _block_means(q.float(), f.block).reshape(b, hkv, h // hkv, -1, d).sum(2) * scale
    km = _block_means(k.float(), f.block)
    score = qm @ km.transpose(-1, -2)  # [B, Hkv, nbq, nbk]
    seen_b = None if sees is None else seen_blocks(sees, f.block, hkv)
    if seen_b is not None:
        score = torch.where(seen_b, score, -torch.inf)
    a = torch.arange(score.shape[2], device=q.device)[:, None]
    c = torch.arange(score.shape[3], device=q.device)[None, :]
    if f.causal:  # a query block stands at the key block of its last query (a step: the cache's end)
        a = (((a + 1) * f.block).clamp(max=q.shape[2]) - 1 + k.shape[2] - q.shape[2]) // f.block
    cand = None
    for level in range(f.selection.levels - 1, 0, -1):  # HiP: coarse groups of 2^level blocks first
        m = 2 ** level
        sl = qm @ _block_means(k.float(), f.block * m).transpose(-1, -2)  # [B, Hkv, nbq, n_l]
        g = torch.arange(sl.shape[-1], device=q.device)[None, :]
        if seen_b is not None:
            grouped = F.pad(seen_b.float(), (0, sl.shape[-1] * m - seen_b.shape[-1]))
            sl = torch.where(grouped.reshape(*seen_b.shape[:-1], -1, m).amax(-1) > 0, sl, -torch.inf)
        if f.causal:
            sl = torch.where(g * m > a, -torch.inf, sl)
        if cand is not None:
            sl = torch.where(cand, sl, -torch.inf)
        top = torch.sort(sl, dim=-1, descending=True, stable=True).indices[..., :min(f.selection.topk, sl.shape[-1])]
        kept = torch.zeros(sl.shape, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        cand = kept[..., torch.arange(-(-score.shape[-1] // (m // 2)), device=q.device) // 2]
    if cand is not None:
        score = torch.where(cand, score, -torch.inf)
    rank = torch.where(forced_blocks(f, a, c), torch.inf, score)
    if f.causal:
        rank = torch.where(c > a, -torch.inf, rank)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    return order[..., :sum(f.level_counts(score.shape[3]))]


def gathered(q, k, v, masks, scale, causal, form: Pattern, norm, fill, softcap):
    """A content pattern: only the chosen key blocks gathered and attended (as
    backends/onnx/gathered.py)."""
    bias, keep, after = masks
    bsz, h, tq, d = q.shape
    hkv, tk, blk = k.shape[1], k.shape[2], form.block
    nbk = -(-tk // blk)
    sees = None  # the pairs the site's masks keep, [Bm, Hm, Tqm, Tk]
    if bias is not None or keep is not None:
        sees = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
        sees = sees & (_four(bias) > MASKED) if bias is not None else sees
        sees = sees & _four(keep) if keep is not None else sees
    ranked = choose_blocks(form, q, k, scale, sees)  # [B, Hkv, nbq, C (+ pooled levels)]
    idx = ranked[..., :form.kept_blocks(nbk)]
    nbq = idx.shape[2]
    bi = torch.arange(bsz, device=q.device)[:, None, None, None]
    hi = torch.arange(hkv, device=q.device)[None, :, None, None]

    def gather(x):  # [B, Hkv, Tk, dx] -> [B, Hkv, 1, nbq, C·b, dx]
        xb = F.pad(x, (0, 0, 0, nbk * blk - tk)).reshape(bsz, hkv, nbk, blk, x.shape[-1])
        return xb[bi, hi, idx].reshape(bsz, hkv, 1, nbq, -1, x.shape[-1])

    kg, vg = gather(k), gather(v)
    q6 = F.pad(q * scale, (0, 0, 0, nbq * blk - tq)).reshape(bsz, hkv, h // hkv, nbq, blk, d)
    s = _softcap(q6 @ kg.transpose(-1, -2), softcap)  # [B, Hkv, g, nbq, b, C·b]
    kpos = (idx[..., None] * blk + torch.arange(blk, device=q.device)).reshape(bsz, hkv, nbq, -1)[:, :, None, :, None]
    vis = inside = kpos < tk  # gathered keys in the sequence (a hidden row sees past causality, as in the original)
    if form.causal:  # queries are the last Tq of Tk positions
        vis = vis & (kpos <= torch.arange(nbq * blk, device=q.device).reshape(nbq, blk, 1) + (tk - tq))
    kclip = kpos.clamp(max=tk - 1)

    def gather_mask(x):  # a 4-D mask at the gathered positions, [B, Hkv, hg, nbq, b|1, C·b]
        x5 = _heads5(_four(x), h, hkv)
        x5 = x5.expand(bsz, hkv, *x5.shape[2:])
        if x5.shape[3] != 1:  # per query
            x6 = F.pad(x5, (0, 0, 0, nbq * blk - x5.shape[3])).reshape(bsz, hkv, x5.shape[2], nbq, blk, -1)
            return torch.gather(x6, 5, kclip.expand(*x6.shape[:5], kclip.shape[-1]))
        flat = kclip.reshape(bsz, hkv, 1, 1, -1)
        return torch.gather(x5, 4, flat.expand(*x5.shape[:4], flat.shape[-1])).reshape(bsz, hkv, x5.shape[2], nbq, 1, -1)

    kept = None
    if bias is not None:
        mb = gather_mask(bias)
        s, vis = s + mb, vis & (mb > MASKED)
    if keep is not None:
        kept = gather_mask(keep)
        vis = vis & kept
    vis = vis.expand(s.shape)
    if bias is not None or keep is not None:  # a row its masks hide completely (over every key): as the original
        hidden = _heads5(~sees.any(-1, keepdim=True), h, hkv)  # [Bm, hk, hg, Tqm, 1]
        if hidden.shape[3] != 1:
            hidden = F.pad(hidden, (0, 0, 0, nbq * blk - hidden.shape[3])).reshape(*hidden.shape[:3], nbq, blk, 1)
        else:
            hidden = hidden.unsqueeze(4)
        s, fallback = as_original(torch.where(inside, s, -torch.inf), vis, bias is not None, kept, fill,
                                  None if after is None else gather_mask(after))
        vis = torch.where(hidden, fallback, vis)
    parts = [(s, vis, vg)]
    if form.selection.pyramid:
        parts += _pooled_levels(form, q6, k, v, bias, keep, ranked, nbk)
    s, vis, vals = (torch.cat(x, dim) for x, dim in zip(zip(*parts), (-1, -1, 4)))
    out = norm(s, vis, 6) @ vals  # [B, Hkv, g, nbq, b, Dv]
    return out.reshape(bsz, h, nbq * blk, v.shape[-1])[:, :, :tq]


def _pooled_levels(form: Pattern, q6, k, v, bias, keep, ranked, nbk: int):
    """A pyramid's pooled levels (as backends/onnx/gathered.py: _pooled): per level l, the
    next-ranked blocks' keys and values mean-pooled by 2^l over their visible keys (per-key
    masks), each pooled logit + mean term + log n."""
    bsz, hkv, tk, blk = k.shape[0], k.shape[1], k.shape[2], form.block
    tp = nbk * blk
    w = (torch.arange(tp, device=k.device) < tk).to(k.dtype).reshape(1, 1, tp)
    t = torch.zeros((1, 1, tp), dtype=k.dtype, device=k.device)
    if bias is not None:
        x = F.pad(bias.reshape(bias.shape[0], 1, -1).to(k.dtype), (0, tp - tk))
        t, w = torch.where(x > MASKED, x, 0.0), w * (x > MASKED)
    if keep is not None:
        w = w * F.pad(keep.reshape(keep.shape[0], 1, -1).to(k.dtype), (0, tp - tk))
    kp, vp = (F.pad(x, (0, 0, 0, tp - tk)) for x in (k, v))
    bi = torch.arange(bsz, device=k.device)[:, None, None, None]
    hi = torch.arange(hkv, device=k.device)[None, :, None, None]
    nominal = form.selection.topk + form.forced_count()
    parts, start = [], nominal
    for level in range(1, form.selection.pyramid + 1):
        m, end = 2 ** level, nominal + sum(form.selection.topk * 2 ** lv for lv in range(1, level + 1))
        ids = ranked[..., min(start, ranked.shape[-1]):end]  # [B, Hkv, nbq, C_l]
        start = end
        n = w.reshape(w.shape[0], 1, -1, m).sum(-1)  # [Bm, 1, G]
        den = n.clamp(min=1)

        def pool(x):  # -> [B, Hkv, 1, nbq, C_l·b/m, dx] at the chosen blocks
            mean = (x * w[..., None]).reshape(bsz, hkv, -1, m, x.shape[-1]).sum(3) / den[..., None]
            return mean.reshape(bsz, hkv, nbk, blk // m, -1)[bi, hi, ids].reshape(bsz, hkv, 1, ids.shape[2], -1,
                                                                                   x.shape[-1])

        def per_group(x):  # [Bm, 1, G] -> [B, Hkv, 1, nbq, 1, C_l·b/m]
            x = x.expand(bsz, hkv, -1).reshape(bsz, hkv, nbk, blk // m)
            return x[bi, hi, ids].reshape(bsz, hkv, 1, ids.shape[2], 1, -1)

        kbar, vbar = pool(kp), pool(vp)
        tw = t * w
        logit = tw.reshape(tw.shape[0], 1, -1, m).sum(-1) / den
        s = q6 @ kbar.transpose(-1, -2) + per_group(logit + torch.log(den))
        parts.append((s, (per_group(n) > 0).expand(s.shape), vbar))
    return parts
