"""The attention forms in PyTorch: what the torch.fx lowering calls.

`attention(q, k, v, ...)` computes a site with a sparse pattern (or dense) and a
normaliser, with the same algorithms as the ONNX lowering (backends/onnx/): the
banded form gathers one key band per query block, so its matrix products, and the FLOPs
torch's FlopCounterMode counts, are those of the ONNX graph. Each rewritten site is one
call to this function in the GraphModule; detection reads its record back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attn_opt.patterns.capability import Capabilities
from attn_opt.patterns.form import SOFTMAX, Form, Normaliser, Pattern
from attn_opt.patterns.site import MASKED


# -- normalisers: scores, visible -> probabilities (0 outside, zero rows where nothing is visible)
def _safe_div(num, den):
    return num / den.clamp(min=1e-30)


def softmax(s, vis):
    m = torch.where(vis, s, torch.finfo(s.dtype).min).amax(-1, keepdim=True)
    m = torch.where(vis.any(-1, keepdim=True), m, 0.0)  # a row that sees nothing: no exp(+huge), even in a gradient
    e = torch.where(vis, torch.exp(s - m), 0.0)
    return _safe_div(e, e.sum(-1, keepdim=True))


def normalise(n: Normaliser, s, vis, per_head, n_heads: int, params: dict | None = None):
    """Weights of normaliser `n`; `per_head(values)` shapes per-head values to the scores.
    A trained sink logit may come as a tensor in place of `n.bias` (`bias=` of attention).
    A calibrated normaliser's per-head parameters (patterns/form.py: gain · N(temperature ·
    S + offset) and the kind's own) come from `params` (name -> tensor, the module's
    parameters) where given, else from `n`."""
    if n.calibrated:
        start = n.values(n_heads)
        v = {k: per_head(params[k] if (params or {}).get(k) is not None else start[k]) for k in n.tunable()}
        s = torch.where(vis, s, 0.0) * v["temperature"] + v["offset"]  # hidden scores (-inf) out of the gradient
        return _normalise(n, s, vis, per_head, n_heads, v) * v["gain"]
    return _normalise(n, s, vis, per_head, n_heads, {k: per_head(t) for k, t in (params or {}).items() if t is not None})


def _normalise(n: Normaliser, s, vis, per_head, n_heads: int, v: dict):
    """The kind's formula; `v`: its per-head parameters where calibrated (else from `n`)."""
    return CAPABILITIES.implementation("normaliser", n.kind)(n, s, vis, per_head, n_heads, v)


def _softmax(n, s, vis, per_head, n_heads, v):
    return softmax(s, vis)


def _softplus(n, s, vis, per_head, n_heads, v):
    p = v.get("p", n.p)
    if "kappa" in v:
        cnt = vis.sum(-1, keepdim=True).clamp(min=2).to(s.dtype)
        s = s * (torch.log(cnt) / math.log(n.n_train or 2)) ** v["kappa"]
    elif n.n_train:
        cnt = vis.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
        s = s * (torch.log(cnt) / math.log(n.n_train))
    a = torch.where(vis, F.softplus(s), 0.0)
    a = _safe_div(a, a.sum(-1, keepdim=True))
    if "p" in v or n.p != 1.0:
        a = torch.where(vis, a.clamp(min=1e-30) ** p, 0.0)
        a = _safe_div(a, a.sum(-1, keepdim=True))
    return a


def _logit(n, s, vis, per_head, n_heads, v):
    b = v["bias"] if "bias" in v else per_head(n.per_head_bias(n_heads))
    m = torch.maximum(torch.where(vis, s, torch.finfo(s.dtype).min).amax(-1, keepdim=True), b)
    e = torch.where(vis, torch.exp(s - m), 0.0)
    return _safe_div(e, e.sum(-1, keepdim=True) + torch.exp(b - m))


def _redistribute(n, s, vis, per_head, n_heads, v):
    alpha = v.get("alpha", n.alpha)
    p = softmax(s, vis)
    m = p[..., :n.sinks].sum(-1, keepdim=True)
    rest = 1 - m
    scaled = torch.cat([alpha * p[..., :n.sinks], p[..., n.sinks:] * _safe_div(1 - alpha * m, rest)], -1)
    keep = rest < 1e-6  # a row all on the sinks is left as it is
    if n.heads:
        keep = keep | (per_head([1.0 if h in n.heads else 0.0 for h in range(n_heads)]) == 0)
    return torch.where(keep, p, scaled)


def _relu(n, s, vis, per_head, n_heads, v):
    cnt = vis.sum(-1, keepdim=True).to(s.dtype)
    return _safe_div(torch.where(vis, torch.relu(s), 0.0), cnt)


def _sigmoid(n, s, vis, per_head, n_heads, v):
    if n.bias is None:  # b = −log n_i
        b = -torch.log(vis.sum(-1, keepdim=True).clamp(min=1).to(s.dtype))
    else:
        b = per_head(n.per_head_bias(n_heads))
    return torch.where(vis, torch.sigmoid(s + b), 0.0)


def _four(m: torch.Tensor) -> torch.Tensor:
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m


def _masks(additive, bool_mask, bool_keep, filled=()):
    """(bias, keep, after): the summed additive terms, the boolean 'attend here', and the
    sum of the terms (indices `filled`) added after the boolean mask's fill; 4-D or None."""
    bias = after = None
    for i, t in enumerate(additive):
        bias = _four(t) if bias is None else bias + _four(t)
        if i in filled:
            after = _four(t) if after is None else after + _four(t)
    keep = None
    if bool_mask is not None:
        keep = _four(bool_mask.bool())
        keep = keep if bool_keep else ~keep
    return bias, keep, after


def as_original(s, vis, additive: bool, keep, fill, after=None):
    """Rows hidden completely by *finite* values see, as in the original, every key whose
    score is not -inf, with the original's scores: a key the boolean mask hides carries
    its fill plus the terms added after it (`after`; -inf where that overflows in the
    model's dtype). Rows with no such key keep none (zeros). backends/onnx/explicit.py
    does the same."""
    finite = fill is not None and math.isfinite(fill)
    if not additive and not finite:
        return s, vis
    dead = torch.isinf(s)
    if keep is not None and finite:
        hidden = torch.as_tensor(fill, dtype=s.dtype, device=s.device)
        hidden = hidden if after is None else hidden + after.to(s.dtype)
        dead = torch.where(keep, dead, torch.isinf(hidden))
        s = torch.where(keep, s, hidden)
    alive = ~dead
    uniform = ~vis.any(-1, keepdim=True) & alive.any(-1, keepdim=True)
    return s, vis | (uniform & alive)


def _heads5(x, h, hkv):
    """[Bm, Hm, a, b] -> [Bm, hk, hg, a, b] to broadcast over the grouped layout."""
    g = h // hkv
    return x.reshape(x.shape[0], hkv, g, *x.shape[2:]) if x.shape[1] == h and h > 1 else x.unsqueeze(2)


def _softcap(s, c):
    """c·tanh(S/c) on scaled scores (before masks), where the site soft-caps them."""
    return s if not c else torch.tanh(s / c) * c


def _explicit(q, k, v, bias, keep, scale, causal, norm, fill=None, softcap=None, pattern: Pattern | None = None,
              after=None, visible=None):
    """Dense scores (masked to `pattern`'s pairs, or to `visible` [B, H, Tq, Tk], where one
    is given), then `norm`."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    q5 = (q * scale).reshape(b, hkv, h // hkv, tq, d)
    s = _softcap(q5 @ k.unsqueeze(2).transpose(-1, -2), softcap)  # [B, Hkv, g, Tq, Tk]
    vis = torch.ones((1,) * 5, dtype=torch.bool, device=q.device)
    if bias is not None:
        b5 = _heads5(bias, h, hkv)
        s = s + b5
        vis = vis & (b5 > MASKED)
    if keep is not None:
        vis = vis & _heads5(keep, h, hkv)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        vis = vis & (torch.arange(tk, device=q.device)[None, :] <= i)
    hidden = ~vis.expand(s.shape).any(-1, keepdim=True)  # the rows the site's masks hide completely
    s, vis = as_original(s, vis.expand(s.shape), bias is not None, None if keep is None else _heads5(keep, h, hkv),
                         fill, None if after is None else _heads5(after, h, hkv))
    # a hidden row is the original's whatever the pattern (backends/onnx/explicit.py)
    if pattern is not None:
        vis = vis & (pattern_visible(pattern, tq, tk, q.device) | hidden)
    if visible is not None:
        vis = vis & (_heads5(visible, h, hkv) | hidden)
    p = norm(s, vis, 5)
    return (p @ v.unsqueeze(2)).reshape(b, h, tq, v.shape[-1])


def window_visible(f: Pattern, i, p, t: int):
    """The pairs pattern `f`'s window keeps (sinks aside) for query positions `i` and key
    positions `p` (broadcasting), at length t: the torch statement of
    `Pattern.window_visible`, for the banded and the masked-dense lowerings."""
    d = i - p
    if f.kind in ("stride", "shift"):
        if f.kind == "stride":
            first = i // f.block * f.block + (f.block - f.window if f.causal else (f.block - f.window) // 2)
        else:
            first = i - f.window // 2
        start = first.clamp(max=t - f.span).clamp(min=0)
        vis = (p >= start) & (p < start + f.span)
    elif f.kind == "window" and f.causal:
        vis = d < f.window * f.dilation
    elif f.kind == "window":
        vis = d.abs() <= f.window // 2 * f.dilation
    else:
        raise ValueError(f"window_visible: {f.kind} is not a window")
    if f.dilation > 1:
        vis = vis & (d % f.dilation == 0)
    return vis & (d >= 0) if f.causal else vis


def pattern_visible(f: Pattern, tq: int, tk: int, device):
    """[Tq, Tk]: the pairs `f` keeps on the full score matrix (queries the last Tq of Tk
    positions), sinks included: the masked-dense lowering."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    p = torch.arange(tk, device=device)[None, :]
    vis = window_visible(f, i, p, tk)
    if f.sinks:
        vis = vis | ((p < f.sinks) & ((p <= i) if f.causal else True))
    return vis


class _Band:
    """Query blocks and the key band each gathers (see backends/onnx/banded.py)."""

    def __init__(self, form, t: int, device):
        self.f, self.t = form, t
        b, lk = form.block, form.keys
        self.nb = -(-t // b)
        self.tp = self.nb * b
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        j = ar(self.nb)
        self.i = ar(self.tp).reshape(self.nb, b, 1)
        self.p = self._start(j)[:, None] + ar(lk)[None, :]  # [nb, Lk]
        self.p_clip = self.p.clamp(0, t - 1)
        self.qpos, self.kpos, self.key_index = self.i, self.p[:, None, :], self.p_clip
        self.perm = self.inverse = None
        if form.dilation > 1:  # residue classes made contiguous
            pos = ar(t)
            self.perm = torch.argsort((pos % form.dilation) * t + pos, stable=True)
            self.inverse = torch.argsort(self.perm)
            self.qpos = self.perm[self.i.clamp(max=t - 1)]
            self.key_index = self.perm[self.p_clip]
            self.kpos = self.key_index[:, None, :]

    def _start(self, j):
        f = self.f
        if f.kind == "grid":
            (kh, _), (gh, gw) = f.kernel, f.grid
            r = j - kh // 2
            return (r.clamp(0, gh - kh) if f.shift else r) * gw
        if f.kind != "stride":
            return j * f.block - f.lo
        off = f.block - f.window if f.causal else (f.block - f.window) // 2
        return torch.minimum(j * f.block + off, torch.tensor(self.t - f.window)).clamp(min=0)

    def window_visible(self):
        f, i, p = self.f, self.qpos, self.kpos
        valid = (self.p[:, None, :] >= 0) & (self.p[:, None, :] < self.t)
        if f.kind == "grid":
            (kh, kw), (gh, gw) = f.kernel, f.grid
            pc = p.clamp(min=0)
            near = []
            for a, c, size, extent in ((i // gw, pc // gw, kh, gh), (i % gw, pc % gw, kw, gw)):
                if f.shift:
                    lo = (a - size // 2).clamp(max=extent - size).clamp(min=0)
                    near.append((c >= lo) & (c < lo + size))
                else:
                    near.append((a - c).abs() <= size // 2)
            return valid & near[0] & near[1]
        vis = valid & window_visible(f, i, p, self.t)
        return vis & (p >= f.sinks) if f.sinks else vis  # sink keys come through their own key set

    def sink_visible(self):
        ps = torch.arange(self.f.sinks, device=self.i.device).reshape(1, 1, -1)
        vis = ps < self.t
        if self.f.causal:
            vis = vis & (ps <= self.qpos)
        return vis.expand(self.nb, self.f.block, self.f.sinks)

    def gather_mask(self, x, h, hkv, sinks: bool):
        """A 4-D mask as [Bm, hk, hg, nb|1, 1|b, Lk or n]."""
        f, nb, b = self.f, self.nb, self.f.block
        hk, hg = (hkv, h // hkv) if x.shape[1] == h and h > 1 else (1, 1)
        per_query = x.shape[2] != 1
        if per_query and self.perm is not None:
            x = x[:, :, self.perm]
        if per_query:
            x = F.pad(x, (0, 0, 0, self.tp - x.shape[2]))
        if sinks:
            x = x[..., : f.sinks]
            return x.reshape(x.shape[0], hk, hg, nb if per_query else 1, b if per_query else 1, f.sinks)
        if not per_query:
            g = x[..., self.key_index]  # [Bm, Hm, 1, nb, Lk]
            return g.permute(0, 1, 3, 2, 4).reshape(x.shape[0], hk, hg, nb, 1, f.keys)
        x5 = x.reshape(x.shape[0], x.shape[1], nb, b, x.shape[-1])
        idx = self.key_index[None, None, :, None, :].expand(x5.shape[0], x5.shape[1], nb, b, f.keys)
        return torch.gather(x5, 4, idx).reshape(x.shape[0], hk, hg, nb, b, f.keys)


def _banded(q, k, v, bias, keep, scale, form, norm, sink_kv=None, softcap=None):
    bsz, h, t, d = q.shape
    hkv = k.shape[1]
    band = _Band(form, t, q.device)
    k_full, v_full = sink_kv or (k, v)
    if band.perm is not None:
        q, k, v = q[:, :, band.perm], k[:, :, band.perm], v[:, :, band.perm]
    q6 = F.pad(q * scale, (0, 0, 0, band.tp - t)).reshape(bsz, hkv, h // hkv, band.nb, form.block, d)
    kb, vb = k[:, :, band.p_clip].unsqueeze(2), v[:, :, band.p_clip].unsqueeze(2)  # [B, Hkv, 1, nb, Lk, ·], sorted order

    def masked(s, vis, sinks):
        s = _softcap(s, softcap)
        if bias is not None:
            mb = band.gather_mask(bias, h, hkv, sinks)
            s, vis = s + mb, vis & (mb > MASKED)
        if keep is not None:
            vis = vis & band.gather_mask(keep, h, hkv, sinks)
        return s, vis.expand(s.shape)

    parts = [masked(q6 @ kb.transpose(-1, -2), band.window_visible(), False) + (vb,)]
    if form.sinks:
        ks = k_full[:, :, : form.sinks].transpose(-1, -2)[:, :, None, None]
        vs = v_full[:, :, : form.sinks][:, :, None, None]
        parts.append(masked(q6 @ ks, band.sink_visible(), True) + (vs,))
    p = norm(torch.cat([s for s, _, _ in parts], -1), torch.cat([m for _, m, _ in parts], -1), 6)
    out, off = 0, 0
    for s, _, vals in parts:
        out = out + p[..., off: off + s.shape[-1]] @ vals
        off += s.shape[-1]
    out = out.reshape(bsz, h, band.tp, v.shape[-1])[:, :, :t]
    return out if band.inverse is None else out[:, :, band.inverse]


def kernel_key_bias(q, additive, bool_mask, bool_keep) -> tuple[torch.Tensor | None, str | None]:
    """The site's masks as the Triton kernel's per-key bias [B, Tk] (None: no mask), or
    (None, why) where they are not one per-key padding mask."""
    terms = list(additive)
    if bool_mask is not None:
        keep = bool_mask.bool() if bool_keep else ~bool_mask.bool()
        terms.append(torch.where(keep, 0.0, torch.finfo(torch.float32).min))
    if len(terms) > 1:
        return None, "more than one mask term"
    if not terms:
        return None, None
    m = _four(terms[0])
    if m.shape[1] != 1 or m.shape[2] != 1:
        return None, "a mask that is not one per-key padding mask"
    return m.reshape(m.shape[0], m.shape[-1]).expand(q.shape[0], -1).float(), None


def kernel_reason(q, k, v, additive, bool_mask, bool_keep, causal, form: Form, softcap=None) -> str | None:
    """Why the Triton kernel cannot compute this site (None: it can)."""
    from attn_opt.backends.triton.launcher import reason

    if softcap:
        return "a soft-cap"
    key_bias, why = kernel_key_bias(q, additive, bool_mask, bool_keep)
    return why or reason(q, k, v, causal, form, key_bias)


def attention(q, k, v, additive=(), bool_mask=None, *, bool_keep=True, scale, causal=False,
              pattern: Pattern | None = None, normaliser: Normaliser = SOFTMAX, bias=None,
              use_triton: bool | None = None, fill=None, softcap=None, banded: bool = True, filled=(),
              params: dict | None = None):
    """One attention site in a given form; q [B, H, Tq, D], k/v [B, Hkv, Tk, ·]; `pattern`
    and `normaliser` the form's own objects, `bias` a trained sink logit (an nn.Parameter).
    CUDA tensors go to the Triton kernel where it covers the form (`use_triton` overrides
    the choice). A pattern is computed banded, or with banded=False as dense scores masked
    to it (chosen by cost at the site's shape, patterns/form.py: banded_pays)."""
    n = normaliser
    h, hkv = q.shape[1], k.shape[1]
    if q.is_cuda if use_triton is None else use_triton:
        form = Form(pattern=pattern, normaliser=n)
        if kernel_reason(q, k, v, additive, bool_mask, bool_keep, causal, form, softcap) is None:
            from attn_opt.backends.triton.launcher import attention as kernel

            key_bias, _ = kernel_key_bias(q, additive, bool_mask, bool_keep)
            return kernel(q, k, v, pattern=pattern, normaliser=n, scale=scale, causal=causal, key_bias=key_bias,
                          sink_logit=bias)

    def per_head(values, ndim=5, groups=(hkv, h // hkv)):
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=q.dtype, device=q.device)
        return t.to(q.dtype).reshape((1, *groups) + (1,) * (ndim - 3))

    params = dict(params or {})  # calibrated nn.Parameters, if any
    if bias is not None and n.kind == "logit" and not n.calibrated:
        params["bias"] = bias  # a trained sink logit

    def norm(s, vis, ndim, heads=None):
        """`heads`: the scores hold only these heads (one part of a dense-heads split, each
        head its own KV): per-head values and parameters taken at them."""
        if heads is None:
            return normalise(n, s, vis, lambda vals: per_head(vals, ndim), h, params)
        at = torch.tensor(heads, device=q.device)
        return normalise(n.of_heads(heads, h), s, vis, lambda vals: per_head(vals, ndim, (len(heads), 1)), len(heads),
                         {k: t[at] for k, t in params.items() if t is not None})

    masks = _masks(additive, bool_mask, bool_keep, filled)
    if pattern is None:
        return _explicit(q, k, v, masks[0], masks[1], scale, causal, norm, fill, softcap, after=masks[2])
    lower = CAPABILITIES.implementation(pattern.table, pattern.kind)
    return lower(q, k, v, masks, scale, causal, pattern, norm, fill, softcap, banded)


def _grid(q, k, v, masks, scale, causal, form: Pattern, norm, fill, softcap, banded):
    s = form.sinks
    grid = _banded(q[:, :, s:], k[:, :, s:], v[:, :, s:], None, None, scale, form, norm, sink_kv=(k, v),
                   softcap=softcap)
    return torch.cat([_explicit(q[:, :, :s], k, v, None, None, scale, False, norm, softcap=softcap), grid],
                     2) if s else grid


def _windowed(q, k, v, masks, scale, causal, form: Pattern, norm, fill, softcap, banded):
    """A window (plain, shifted or strided), its `dense_heads` through the dense form."""
    mask_bias, keep, after = masks

    def sparse(q_, k_, v_, f, nf):
        if banded:
            return _banded(q_, k_, v_, mask_bias, keep, scale, f, nf, softcap=softcap)
        return _explicit(q_, k_, v_, mask_bias, keep, scale, causal, nf, fill, softcap, pattern=f, after=after)

    if not form.dense_heads:
        return sparse(q, k, v, form, norm)
    h = q.shape[1]
    dense = sorted(form.dense_heads)
    rest = [x for x in range(h) if x not in dense]

    def part(heads):  # the normaliser on those heads only (per-head values taken at them)
        return lambda s, vis, ndim: norm(s, vis, ndim, heads)

    outs = [_explicit(q[:, dense], k[:, dense], v[:, dense], mask_bias, keep, scale, causal, part(dense), fill,
                      softcap, after=after)]
    if rest:
        outs.append(sparse(q[:, rest], k[:, rest], v[:, rest], form.sparse_heads(), part(rest)))
    order = dense + rest
    return torch.cat(outs, 1)[:, [order.index(x) for x in range(h)]]


def _content(q, k, v, masks, scale, causal, form: Pattern, norm, fill, softcap, banded):
    """A content pattern (top-k, pyramid): backends/torch/gathered.py."""
    from attn_opt.backends.torch.gathered import gathered

    return gathered(q, k, v, masks, scale, causal, form, norm, fill, softcap)


def _routing(q, k, v, masks, scale, causal, form: Pattern, norm, fill, softcap, banded):
    """Routing attention: dense scores masked to the clusters (backends/torch/routing.py)."""
    from attn_opt.backends.torch.routing import routing_visible

    bias, keep, after = masks
    sees = None
    if bias is not None or keep is not None:
        sees = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
        sees = sees & (_four(bias) > MASKED) if bias is not None else sees
        sees = sees & _four(keep) if keep is not None else sees
    vis = routing_visible(form, q, k, sees)
    return _explicit(q, k, v, bias, keep, scale, causal, norm, fill, softcap, after=after, visible=vis)


def collapsed(xq, xk, w_qk, v, additive=(), bool_mask=None, *, bool_keep=True, scale, causal, heads,
              xv=None, w_vo=None, o_bias=None, fill=None, softcap=None, filled=()):
    """mlpfree on torch: scores_h = scale · X̃q W_qk,h X̃kᵀ (X̃ = [X, 1]); the output is P V as
    [B, H, Tq, dv], or with w_vo the output projection's result Σ_h P_h X̃v W_vo,h (+ bias)."""
    def aug(x):
        return torch.cat([x, torch.ones_like(x[..., :1])], -1)

    b = xq.shape[0]
    if w_qk is not None:
        tq, dm = xq.shape[1], w_qk.shape[0]
        q = (aug(xq) @ w_qk).reshape(b, tq, heads, dm).transpose(1, 2)  # [B, H, Tq, D+1]
        k = aug(xk).unsqueeze(1)  # one shared "head"
    else:
        q, k = xq, xk  # already [B, H, T, d] and [B, Hkv, T, d]
        tq = q.shape[2]
    mask_bias, keep, after = _masks(additive, bool_mask, bool_keep, filled)
    s = (q * scale) @ k.transpose(-1, -2) if k.shape[1] == q.shape[1] or k.shape[1] == 1 else None
    if s is None:
        s = ((q * scale).reshape(b, k.shape[1], -1, tq, q.shape[-1]) @ k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    s = _softcap(s, softcap)
    vis = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=s.device)
    if mask_bias is not None:
        s, vis = s + mask_bias, vis & (mask_bias > MASKED)
    if keep is not None:
        vis = vis & keep
    if causal:
        tk = s.shape[-1]
        vis = vis & (torch.arange(tk, device=s.device)[None, :] <= torch.arange(tq, device=s.device)[:, None] + tk - tq)
    s, vis = as_original(s, vis.expand(s.shape), mask_bias is not None, keep, fill, after)
    p = softmax(s, vis)  # [B, H, Tq, Tk]
    if w_vo is None:
        return p @ v.repeat_interleave(heads // v.shape[1], 1)
    d_model = w_vo.shape[1] // heads
    vh = (aug(xv) @ w_vo).reshape(b, xv.shape[1], heads, d_model).transpose(1, 2)
    out = (p @ vh).sum(1)
    return out if o_bias is None else out + o_bias


def cap_cache(x, sinks: int, window: int):
    """A step's present cache [B, H, T, d] kept to its first `sinks` positions and its last
    `window` ones (all of them while T <= sinks + window): stream's cap, as
    backends/onnx/lower.py: cap_cache writes it."""
    t = x.shape[2]
    return torch.cat([x[:, :, :sinks], x[:, :, max(sinks, t - window):]], dim=2)


CAPABILITIES = Capabilities(
    "torch",
    normaliser={"softmax": _softmax, "softplus": _softplus, "logit": _logit, "redistribute": _redistribute,
                "relu": _relu, "sigmoid": _sigmoid},
    pattern={"window": _windowed, "shift": _windowed, "stride": _windowed, "grid": _grid},
    selection={"topk": _content, "pyramid": _content, "routing": _routing})
