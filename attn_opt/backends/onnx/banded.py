"""Banded attention with standard ONNX ops: the lowering of `sparse` that skips work.

Queries are cut into nb blocks of b. Block j gathers one contiguous range of `Lk` keys
(`Gather` on the sequence axis), so Q·Kᵀ is [.., nb, b, Lk] instead of [.., T, T] and
P·V reads only those keys: attention FLOPs scale with T·Lk, not T². Which pairs are
kept is decided in the graph from absolute positions (so dynamic lengths work), and a
row with no visible key is zeroed after the softmax instead of turning into NaN.

Layout inside: 6-D [B, Hkv, g, nb, b, ·] with g = H / Hkv query heads per kv head, so
GQA reads each kv head once.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.explicit import softcap
from attn_opt.backends.onnx.visible import i64 as _i64, window_visible
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import MASKED
from attn_opt.patterns.site import AttentionSite


class _Band:
    """In-graph index arithmetic shared by the parts of one site's rewrite."""

    def __init__(self, e: SiteEdit, q: ir.Value, form: Pattern):
        self.e, self.f = e, form
        b, lk = form.block, form.keys
        i64 = lambda x: e.const(np.int64(x))  # noqa: E731
        self.t = e.op("Squeeze", [e.shape_dim(q, 2), e.ints(0)])  # scalar T
        self.nb = e.op("Div", [e.op("Add", [self.t, i64(b - 1)]), i64(b)])
        self.tp = e.op("Mul", [self.nb, i64(b)])
        j = e.op("Range", [i64(0), self.nb, i64(1)])  # [nb]
        self.i = e.op("Reshape", [e.op("Range", [i64(0), self.tp, i64(1)]), e.ints(-1, b, 1)])  # [nb, b, 1]
        start = self._start(j)  # [nb]
        self.p = e.op("Add", [e.op("Unsqueeze", [start, e.ints(1)]), e.op("Range", [i64(0), i64(lk), i64(1)])])  # [nb, Lk]
        tm1 = e.op("Sub", [self.t, i64(1)])
        self.p_clip = e.op("Max", [e.op("Min", [self.p, tm1]), i64(0)])
        self.p3 = e.op("Unsqueeze", [self.p, e.ints(1)])  # [nb, 1, Lk]
        # positions in the original sequence: the same unless dilation permuted it
        self.perm = self.inverse = None
        self.qpos, self.kpos, self.key_index = self.i, self.p3, self.p_clip
        if form.dilation > 1:
            self._dilate(q, tm1)

    def _dilate(self, q, tm1):
        """Sort positions by (i mod δ, i div δ): each dilated window becomes a contiguous
        band of that order. perm[k] is the original position at sorted place k."""
        e, d = self.e, self.f.dilation
        i64 = lambda x: e.const(np.int64(x))  # noqa: E731
        t1 = e.op("Unsqueeze", [self.t, e.ints(0)])
        pos = e.op("Range", [i64(0), self.t, i64(1)])
        key = e.op("Add", [e.op("Mul", [e.op("Mod", [pos, i64(d)]), self.t]), pos])
        self.perm = e.op("TopK", [key, t1], {"largest": 0, "sorted": 1}, outputs=2)[1]
        self.inverse = e.op("TopK", [self.perm, t1], {"largest": 0, "sorted": 1}, outputs=2)[1]
        self.qpos = e.op("Gather", [self.perm, e.op("Min", [self.i, tm1])])
        self.kpos = e.op("Gather", [self.perm, e.op("Unsqueeze", [self.p_clip, e.ints(1)])])
        self.key_index = e.op("Gather", [self.perm, self.p_clip])  # original key positions, [nb, Lk]

    def _start(self, j):
        e, f = self.e, self.f
        i64 = lambda x: e.const(np.int64(x))  # noqa: E731
        if f.kind == "grid":  # block j is grid row j; it gathers kh rows of keys around it
            (kh, _), (gh, gw) = f.kernel, f.grid
            r = e.op("Sub", [j, i64(kh // 2)])
            if f.shift:
                r = e.op("Max", [e.op("Min", [r, i64(gh - kh)]), i64(0)])
            return e.op("Mul", [r, i64(gw)])
        if f.kind != "stride":
            return e.op("Sub", [e.op("Mul", [j, i64(f.block)]), i64(f.lo)])
        off = f.block - f.window if f.causal else (f.block - f.window) // 2
        s = e.op("Add", [e.op("Mul", [j, i64(f.block)]), i64(off)])
        return e.op("Max", [e.op("Min", [s, e.op("Sub", [self.t, i64(f.window)])]), i64(0)])

    def window_visible(self):
        """[nb, b, Lk] bool: the pattern's pairs among the gathered keys."""
        e, f = self.e, self.f
        valid = e.op("And", [e.op("GreaterOrEqual", [self.p3, _i64(e, 0)]), e.op("Less", [self.p3, self.t])])
        if f.kind == "grid":
            return e.op("And", [valid, self._grid_near(self.qpos, self.kpos)])
        vis = e.op("And", [valid, window_visible(e, f, self.qpos, self.kpos, self.t)])  # original positions
        if f.sinks:  # sink keys are attended through their own key set: not twice
            vis = e.op("And", [vis, e.op("GreaterOrEqual", [self.kpos, _i64(e, f.sinks)])])
        return vis

    def _grid_near(self, i, p):
        """Key p is in query i's kh x kw neighborhood (grid indices, row-major)."""
        e, f = self.e, self.f
        (kh, kw), (gh, gw) = f.kernel, f.grid
        i64 = lambda x: e.const(np.int64(x))  # noqa: E731
        ri, ci = e.op("Div", [i, i64(gw)]), e.op("Mod", [i, i64(gw)])
        pc = e.op("Max", [p, i64(0)])
        rp, cp = e.op("Div", [pc, i64(gw)]), e.op("Mod", [pc, i64(gw)])
        near = []
        for q_, k_, size, extent in ((ri, rp, kh, gh), (ci, cp, kw, gw)):
            if f.shift:
                lo = e.op("Max", [e.op("Min", [e.op("Sub", [q_, i64(size // 2)]), i64(extent - size)]), i64(0)])
                near.append(e.op("And", [e.op("GreaterOrEqual", [k_, lo]), e.op("Less", [k_, e.op("Add", [lo, i64(size)])])]))
            else:
                near.append(e.op("LessOrEqual", [e.op("Abs", [e.op("Sub", [q_, k_])]), i64(size // 2)]))
        return e.op("And", near)

    def sink_visible(self):
        """[nb, b, n] bool for the n sink keys."""
        e, f = self.e, self.f
        i64 = lambda x: e.const(np.int64(x))  # noqa: E731
        ps = e.op("Reshape", [e.op("Range", [i64(0), i64(f.sinks), i64(1)]), e.ints(1, 1, f.sinks)])
        vis = e.op("Less", [ps, self.t])
        if f.causal:
            vis = e.op("And", [vis, e.op("LessOrEqual", [ps, self.qpos])])
        return e.op("Expand", [vis, e.op("Concat", [e.op("Shape", [self.i], {"end": 2}), e.ints(f.sinks)], {"axis": 0})])


def _pad_seq(e: SiteEdit, x: ir.Value, amount: ir.Value, axis: int, rank: int) -> ir.Value:
    """Zero-pad `x` at the end of `axis` by `amount` (1-element int64)."""
    zeros_before = e.ints(*([0] * rank))
    after = [e.ints(0)] * rank
    after[axis] = amount
    pads = e.op("Concat", [zeros_before] + after, {"axis": 0})
    return e.op("Pad", [x, pads])


def _heads_split(s: AttentionSite, mask_heads: int) -> tuple[int, int]:
    g = s.heads // s.kv_heads
    return (s.kv_heads, g) if mask_heads == s.heads else (1, 1)


def _gather_mask(e: SiteEdit, band: _Band, s: AttentionSite, m, sinks: bool):
    """A site mask [Bm, Hm, 1 | T, T] as [Bm, hk, hg, nb|1, 1|b, Lk or n]."""
    f = band.f
    x = e.term(m) if m is not s.bool_mask else e.value(m)
    shape = s.mask_shapes[m.name]  # as run: tells a per-head / per-query mask from a broadcast one
    if len(shape) == 2:  # [Tq, Tk] (nn.MultiheadAttention)
        x = e.op("Unsqueeze", [x, e.ints(0, 1)])
        shape = (1, 1) + tuple(shape)
    hk, hg = _heads_split(s, shape[1])
    per_query = shape[2] != 1 or s.run_shape is None or s.run_shape[2] == 1
    if per_query and band.perm is not None:  # rows follow the queries' sorted order
        x = e.op("Gather", [x, band.perm], {"axis": 2})
    if sinks:
        x = e.op("Slice", [x, e.ints(0), e.ints(f.sinks), e.ints(3)])
        if not per_query:
            return e.op("Reshape", [x, e.ints(0, hk, hg, 1, 1, f.sinks)])
        x = _pad_seq(e, x, e.op("Sub", [e.op("Unsqueeze", [band.tp, e.ints(0)]), e.shape_dim(x, 2)]), 2, 4)
        return e.op("Reshape", [x, e.ints(0, hk, hg, -1, f.block, f.sinks)])
    if not per_query:
        g = e.op("Gather", [x, band.key_index], {"axis": 3})  # [Bm, Hm, 1, nb, Lk]
        g = e.op("Transpose", [g], {"perm": [0, 1, 3, 2, 4]})
        return e.op("Reshape", [g, e.ints(0, hk, hg, -1, 1, f.keys)])
    x = _pad_seq(e, x, e.op("Sub", [e.op("Unsqueeze", [band.tp, e.ints(0)]), e.shape_dim(x, 2)]), 2, 4)
    x5 = e.op("Reshape", [x, e.op("Concat", [e.ints(0, 0, -1, f.block), e.shape_dim(x, 3)], {"axis": 0})])
    idx = e.op("Unsqueeze", [band.key_index, e.ints(0, 1, 3)])  # [1, 1, nb, 1, Lk]
    shp = e.op("Concat", [e.op("Shape", [x5], {"end": 4}), e.ints(f.keys)], {"axis": 0})
    g = e.op("GatherElements", [x5, e.op("Expand", [idx, shp])], {"axis": 4})
    return e.op("Reshape", [g, e.ints(0, hk, hg, -1, f.block, f.keys)])


def _apply_masks(e, band, s, scores, vis, sinks: bool):
    """Add the site's additive terms, and fold every mask into the visibility."""
    for m in s.additive:
        mb = _gather_mask(e, band, s, m, sinks)
        scores = e.op("Add", [scores, mb])
        vis = e.op("And", [vis, e.op("Greater", [mb, e.const(np.float32(MASKED))])])
    if s.bool_mask is not None:
        mb = _gather_mask(e, band, s, s.bool_mask, sinks)
        if s.bool_mask.dtype != "bool":
            mb = e.op("Cast", [mb], {"to": ir.DataType.BOOL})
        vis = e.op("And", [vis, mb if s.bool_keep else e.op("Not", [mb])])
    return scores, vis


def emit_banded(e: SiteEdit, s: AttentionSite, form: Pattern, normalise=None, qkv=None, sink_kv=None) -> ir.Value:
    """The banded form; `normalise(e, scores, visible)` turns scores into probabilities
    (default softmax), zero outside `visible` and on rows that see nothing."""
    if normalise is None:
        from attn_opt.backends.onnx.explicit import softmax_visible as normalise
    q, k, v = qkv or (e.bhsd(s.q), e.bhsd(s.k), e.bhsd(s.v))
    band = _Band(e, q, form)
    hkv, g, b = s.kv_heads, s.heads // s.kv_heads, form.block
    k_full, v_full = sink_kv or (k, v)  # sink keys are the first tokens of the original order
    if band.perm is not None:
        q, k, v = (e.op("Gather", [x, band.perm], {"axis": 2}) for x in (q, k, v))
    qs = e.op("Mul", [q, e.const(np.float32(s.scale))])
    qp = _pad_seq(e, qs, e.op("Sub", [e.op("Unsqueeze", [band.tp, e.ints(0)]), e.shape_dim(q, 2)]), 2, 4)
    q6 = e.op("Reshape", [qp, e.ints(0, hkv, g, -1, b, s.head_dim)])  # [B, Hkv, g, nb, b, D]
    kb = e.op("Unsqueeze", [e.op("Gather", [k, band.p_clip], {"axis": 2}), e.ints(2)])  # [B, Hkv, 1, nb, Lk, D]
    vb = e.op("Unsqueeze", [e.op("Gather", [v, band.p_clip], {"axis": 2}), e.ints(2)])
    scores = softcap(e, s, e.op("MatMul", [q6, e.op("Transpose", [kb], {"perm": [0, 1, 2, 3, 5, 4]})]))
    scores, vis = _apply_masks(e, band, s, scores, band.window_visible(), sinks=False)
    parts = [(scores, vis, vb)]
    if form.sinks:
        ks = e.op("Slice", [k_full, e.ints(0), e.ints(form.sinks), e.ints(2)])
        vs = e.op("Unsqueeze", [e.op("Slice", [v_full, e.ints(0), e.ints(form.sinks), e.ints(2)]), e.ints(2, 3)])
        ss = softcap(e, s, e.op("MatMul", [q6, e.op("Unsqueeze", [e.op("Transpose", [ks], {"perm": [0, 1, 3, 2]}),
                                                                e.ints(2, 3)])]))
        ss, svis = _apply_masks(e, band, s, ss, band.sink_visible(), sinks=True)
        parts.append((ss, svis, vs))
    full = [(sc, e.op("Expand", [vis_, e.op("Shape", [sc])]), vals) for sc, vis_, vals in parts]
    cat = (lambda xs: e.op("Concat", xs, {"axis": -1}) if len(xs) > 1 else xs[0])  # noqa: E731
    probs = normalise(e, cat([sc for sc, _, _ in full]), cat([vis_ for _, vis_, _ in full]))
    out = None
    offset = 0
    for sc, vis_, vals in parts:
        width = form.keys if vals is vb else form.sinks
        p = e.op("Slice", [probs, e.ints(offset), e.ints(offset + width), e.ints(-1)]) if len(parts) > 1 else probs
        o = e.op("MatMul", [p, vals])
        out = o if out is None else e.op("Add", [out, o])
        offset += width
    shape = e.op("Concat", [e.shape_dim(q, 0), e.ints(s.heads), e.op("Unsqueeze", [band.tp, e.ints(0)]),
                            e.shape_dim(v, 3)], {"axis": 0})
    o4 = e.op("Reshape", [out, shape])  # [B, H, Tp, Dv]
    out = e.op("Slice", [o4, e.ints(0), e.op("Unsqueeze", [band.t, e.ints(0)]), e.ints(2)])
    return out if band.inverse is None else e.op("Gather", [out, band.inverse], {"axis": 2})
