"""Attention over the key blocks a content pattern chose (choose.py), with standard ONNX ops.

Keys and values are cut into blocks of b and each query block gathers only its C kept
blocks (GatherND over [B, Hkv] batches), so Q·Kᵀ is [.., nbq, b, C·b] and P·V reads C·b
keys per query: attention FLOPs are T·C·b, not T². Which gathered pairs are visible is
decided in the graph from absolute positions (the sequence's end, causality, the site's
masks gathered at the same key positions); a row its masks hide completely is treated as
the original treats it (explicit.py: uniform over the gathered keys whose score is finite,
zeros where none is), so keeping every block is exact on every input set.

A pyramid (PSA) adds, per pooled level l, the next-ranked blocks' keys and values
mean-pooled in groups of 2^l over their visible keys (per-key masks), each pooled logit
with + mean term + log n; one softmax over all of a row's keys.

Layout inside: 6-D [B, Hkv, g, nbq, b, ·] with g = H / Hkv, so one selection serves a KV
group and GQA reads each kv head once.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.choose import blocks_of, choose_blocks, length, mask_sees, pad_blocks
from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.explicit import _hidden_rows_as_original, softcap
from attn_opt.backends.onnx.visible import i64
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import MASKED, AttentionSite


def _gather_mask(e: SiteEdit, s: AttentionSite, m, q, kclip6, nbq1, block: int) -> ir.Value:
    """A site mask (rank 2 or 4) at the gathered key positions, [B, Hkv, hg, nbq, b|1, C·b]."""
    x = e.term(m)
    shape = tuple(s.mask_shapes[m.name])  # as run: tells a per-head / per-query mask from a broadcast one
    if len(shape) == 2:  # [Tq, Tk] (nn.MultiheadAttention)
        x = e.op("Unsqueeze", [x, e.ints(0, 1)])
        shape = (1, 1) + shape
    hkv, g = s.kv_heads, s.heads // s.kv_heads
    per_query = shape[2] != 1 or s.run_shape is None or s.run_shape[2] == 1
    if shape[1] == s.heads and s.heads > 1:
        x5 = e.op("Reshape", [x, e.op("Concat", [e.shape_dim(x, 0), e.ints(hkv, g), e.op("Shape", [x], {"start": 2})],
                                      {"axis": 0})])
    else:
        x5 = e.op("Unsqueeze", [x, e.ints(2)])
    x5 = e.op("Expand", [x5, e.op("Concat", [e.shape_dim(q, 0), e.ints(hkv, 1, 1, 1)], {"axis": 0})])
    if per_query:  # rows cut into query blocks, each gathering its own key positions
        tq = length(e, q)
        amount = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [e.op("Squeeze", [nbq1, e.ints(0)]), i64(e, block)]), tq]),
                                    e.ints(0)])
        x5 = e.op("Pad", [x5, e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0, 0, 0), amount, e.ints(0)], {"axis": 0})])
        x6 = e.op("Reshape", [x5, e.op("Concat", [e.ints(0, 0, 0), nbq1, e.ints(block), e.shape_dim(x5, 4)],
                                       {"axis": 0})])
        idx = e.op("Expand", [kclip6, e.op("Concat", [e.op("Shape", [x6], {"end": 5}), e.op("Shape", [kclip6], {"start": 5})],
                                                       {"axis": 0})])
        return e.op("GatherElements", [x6, idx], {"axis": 5})
    flat = e.op("Reshape", [kclip6, e.ints(0, 0, 1, 1, -1)])  # [B, Hkv, 1, 1, nbq·C·b]
    idx = e.op("Expand", [flat, e.op("Concat", [e.op("Shape", [x5], {"end": 4}), e.op("Shape", [flat], {"start": 4})],
                                               {"axis": 0})])
    got = e.op("GatherElements", [x5, idx], {"axis": 4})
    return e.op("Reshape", [got, e.op("Concat", [e.ints(0, 0, 0), nbq1, e.ints(1, -1)], {"axis": 0})])


def _hidden_rows(e: SiteEdit, s: AttentionSite, q, nbq1, block: int) -> ir.Value | None:
    """[B|1, Hkv|1, hg, nbq|1, b|1, 1] bool: the rows the site's masks hide over every key
    (None: no mask)."""
    seen = mask_sees(e, s)
    if seen is None:
        return None
    sees, heads, per_query = seen
    per_query = per_query or s.run_shape is None or s.run_shape[2] == 1
    any_key = e.op("ReduceMax", [e.op("Cast", [sees], {"to": ir.DataType.FLOAT}), e.ints(-1)], {"keepdims": 1})
    hidden = e.op("Equal", [any_key, e.const(np.float32(0))])  # [Bm, Hm, Tqm, 1]
    hkv, g = s.kv_heads, s.heads // s.kv_heads
    if heads == s.heads and s.heads > 1:
        hidden = e.op("Reshape", [hidden, e.op("Concat", [e.shape_dim(hidden, 0), e.ints(hkv, g),
                                                          e.op("Shape", [hidden], {"start": 2})], {"axis": 0})])
    else:
        hidden = e.op("Unsqueeze", [hidden, e.ints(2)])
    if not per_query:
        return e.op("Unsqueeze", [hidden, e.ints(4)])  # [Bm, ., ., 1, 1, 1]
    tq = length(e, q)
    amount = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [e.op("Squeeze", [nbq1, e.ints(0)]), i64(e, block)]), tq]),
                                e.ints(0)])
    hidden = e.op("Pad", [e.op("Cast", [hidden], {"to": ir.DataType.FLOAT}),
                          e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0, 0, 0), amount, e.ints(0)], {"axis": 0})])
    hidden = e.op("Reshape", [hidden, e.op("Concat", [e.ints(0, 0, 0), nbq1, e.ints(block, 1)], {"axis": 0})])
    return e.op("Greater", [hidden, e.const(np.float32(0))])


def _key_weights(e: SiteEdit, s: AttentionSite, tk, tp) -> tuple[ir.Value, ir.Value]:
    """(w, t), [Bm, 1, Tp] float: 1 where a key is inside the sequence and the site's
    per-key masks keep it; the sum of its additive terms (0 where hidden)."""
    pos = e.op("Range", [i64(e, 0), tp, i64(e, 1)])
    w = e.op("Cast", [e.op("Reshape", [e.op("Less", [pos, tk]), e.ints(1, 1, -1)])], {"to": ir.DataType.FLOAT})
    t = None
    pad = e.op("Unsqueeze", [e.op("Sub", [tp, tk]), e.ints(0)])

    def per_key(x):  # [Bm, 1, 1, Tk] -> [Bm, 1, Tp]
        x = e.op("Reshape", [x, e.ints(0, 1, -1)])
        return e.op("Pad", [x, e.op("Concat", [e.ints(0, 0, 0, 0, 0), pad], {"axis": 0})])

    for m in s.additive:
        x = per_key(e.term(m))
        kept = e.op("Greater", [x, e.const(np.float32(MASKED))])
        term = e.op("Where", [kept, x, e.const(np.float32(0))])
        t = term if t is None else e.op("Add", [t, term])
        w = e.op("Mul", [w, e.op("Cast", [kept], {"to": ir.DataType.FLOAT})])
    if s.bool_mask is not None:
        x = per_key(e.op("Cast", [e.value(s.bool_mask)], {"to": ir.DataType.FLOAT}))
        if not s.bool_keep:
            x = e.op("Sub", [e.const(np.float32(1)), x])
        w = e.op("Mul", [w, x])
    return w, (t if t is not None else e.const(np.zeros((1, 1, 1), np.float32)))


def _pooled(e: SiteEdit, s: AttentionSite, q6, k, v, w, t, idx, nbk, nbq1, block: int, level: int):
    """Level `level` of a pyramid: the chosen blocks' keys and values mean-pooled in groups
    of 2^level over their visible keys, each pooled logit + mean term + log n. Returns
    (scores [.., nbq, b, C·b/m], visible, values [B, Hkv, 1, nbq, C·b/m, Dv])."""
    m, hkv = 2 ** level, s.kv_heads
    n = e.op("ReduceSum", [e.op("Reshape", [w, e.ints(0, 1, -1, m)]), e.ints(3)], {"keepdims": 0})  # [Bm, 1, G]
    den = e.op("Max", [n, e.const(np.float32(1))])
    flat = e.op("Unsqueeze", [e.op("Reshape", [idx, e.ints(0, 0, -1)]), e.ints(3)])
    w4 = e.op("Unsqueeze", [w, e.ints(3)])

    def pool(x, dx):  # [B, Hkv, Tp, dx] -> the chosen blocks' pooled keys, [B, Hkv, 1, nbq, C·b/m, dx]
        sums = e.op("ReduceSum", [e.op("Reshape", [e.op("Mul", [x, w4]), e.op("Concat", [e.ints(0, hkv, -1, m), dx],
                                                                                {"axis": 0})]), e.ints(3)],
                    {"keepdims": 0})
        mean = e.op("Div", [sums, e.op("Unsqueeze", [den, e.ints(3)])])  # [B, Hkv, G, dx]
        blocks = e.op("Reshape", [mean, e.op("Concat", [e.ints(0, hkv, -1, block // m), dx], {"axis": 0})])
        got = e.op("GatherND", [blocks, flat], {"batch_dims": 2})
        return e.op("Reshape", [got, e.op("Concat", [e.ints(0, hkv, 1), nbq1, e.ints(-1), dx], {"axis": 0})])

    def per_group(x):  # [Bm, 1, G] -> [B, Hkv, 1, nbq, 1, C·b/m] at the chosen blocks
        x = e.op("Expand", [x, e.op("Concat", [e.shape_dim(q6, 0), e.ints(hkv, 1)], {"axis": 0})])
        got = e.op("GatherND", [e.op("Reshape", [x, e.ints(0, hkv, -1, block // m)]), flat], {"batch_dims": 2})
        return e.op("Reshape", [got, e.op("Concat", [e.ints(0, hkv, 1), nbq1, e.ints(1, -1)], {"axis": 0})])

    kbar, vbar = pool(k, e.ints(s.head_dim)), pool(v, e.shape_dim(v, 3))
    tbar = e.op("Div", [e.op("ReduceSum", [e.op("Reshape", [e.op("Mul", [t, w]), e.ints(0, 1, -1, m)]), e.ints(3)],
                                                                 {"keepdims": 0}), den])
    bias = per_group(e.op("Add", [tbar, e.op("Log", [den])]))
    vis = e.op("Greater", [per_group(n), e.const(np.float32(0))])
    scores = e.op("Add", [e.op("MatMul", [q6, e.op("Transpose", [kbar], {"perm": [0, 1, 2, 3, 5, 4]})]), bias])
    return scores, vis, vbar


def emit_gathered(e: SiteEdit, s: AttentionSite, pattern: Pattern, normalise, qkv=None) -> ir.Value:
    """The content pattern's attention [B, H, Tq, Dv]; `normalise(e, scores, visible)` on
    6-D scores (zero outside `visible`, zero rows where nothing is visible)."""
    q, k, v = qkv or (e.bhsd(s.q), e.bhsd(s.k), e.bhsd(s.v))
    hkv, g, b, d = s.kv_heads, s.heads // s.kv_heads, pattern.block, s.head_dim
    ranked, _ = choose_blocks(e, pattern, q, k, s.heads, hkv, d, s.scale, s)  # [B, Hkv, nbq, C (+ pooled levels)]
    nominal = pattern.selection.topk + pattern.forced_count()
    idx = e.op("Slice", [ranked, e.ints(0), e.ints(nominal), e.ints(3)])  # level 0: full keys
    tq, tk = length(e, q), length(e, k)
    nbq, nbk = blocks_of(e, tq, b), blocks_of(e, tk, b)
    nbq1 = e.op("Unsqueeze", [nbq, e.ints(0)])
    flat = e.op("Unsqueeze", [e.op("Reshape", [idx, e.ints(0, 0, -1)]), e.ints(3)])  # [B, Hkv, nbq·C, 1]
    kpad, vpad = pad_blocks(e, k, tk, nbk, b), pad_blocks(e, v, tk, nbk, b)

    def gather(xp, dx):  # [B, Hkv, Tp, dx] -> the kept blocks, [B, Hkv, 1, nbq, C·b, dx]
        xb = e.op("Reshape", [xp, e.op("Concat", [e.ints(0, hkv, -1, b), dx], {"axis": 0})])
        got = e.op("GatherND", [xb, flat], {"batch_dims": 2})  # [B, Hkv, nbq·C, b, dx]
        return e.op("Reshape", [got, e.op("Concat", [e.ints(0, hkv, 1), nbq1, e.ints(-1), dx], {"axis": 0})])

    kg, vg = gather(kpad, e.ints(d)), gather(vpad, e.shape_dim(v, 3))
    qs = pad_blocks(e, e.op("Mul", [q, e.const(np.float32(s.scale))]), tq, nbq, b)
    q6 = e.op("Reshape", [qs, e.ints(0, hkv, g, -1, b, d)])  # [B, Hkv, g, nbq, b, d]
    scores = softcap(e, s, e.op("MatMul", [q6, e.op("Transpose", [kg], {"perm": [0, 1, 2, 3, 5, 4]})]))
    kpos = e.op("Add", [e.op("Mul", [e.op("Unsqueeze", [idx, e.ints(4)]), i64(e, b)]),
                        e.op("Range", [i64(e, 0), i64(e, b), i64(e, 1)])])  # [B, Hkv, nbq, C, b]
    kpos6 = e.op("Unsqueeze", [e.op("Reshape", [kpos, e.ints(0, 0, 0, -1)]), e.ints(2, 4)])  # [B, Hkv, 1, nbq, 1, C·b]
    vis = inside = e.op("Less", [kpos6, tk])  # gathered keys in the sequence
    if pattern.causal:  # queries are the last Tq of Tk positions
        qpos = e.op("Reshape", [e.op("Range", [e.op("Sub", [tk, tq]), e.op("Add", [e.op("Sub", [tk, tq]),
                                                                                   e.op("Mul", [nbq, i64(e, b)])]),
                                               i64(e, 1)]), e.ints(-1, b, 1)])  # [nbq, b, 1]
        vis = e.op("And", [vis, e.op("LessOrEqual", [kpos6, qpos])])
        if s.causal and s.rule != "eager":  # a fused op's causality hides with -inf, in hidden rows too
            inside = vis  # (an eager site's is in its masks' finite values: a hidden row sees past it)
    kclip6 = e.op("Min", [kpos6, e.op("Sub", [tk, i64(e, 1)])])
    keep, filled = None, None
    for m in s.additive:
        mb = _gather_mask(e, s, m, q, kclip6, nbq1, b)
        scores = e.op("Add", [scores, mb])
        if m.name in s.filled_terms:  # added after the boolean mask's fill
            filled = mb if filled is None else e.op("Add", [filled, mb])
        vis = e.op("And", [vis, e.op("Greater", [mb, e.const(np.float32(MASKED))])])
    if s.bool_mask is not None:
        mb = _gather_mask(e, s, s.bool_mask, q, kclip6, nbq1, b)
        if s.bool_mask.dtype != "bool":
            mb = e.op("Cast", [mb], {"to": ir.DataType.BOOL})
        keep = mb if s.bool_keep else e.op("Not", [mb])
        vis = e.op("And", [vis, keep])
    hidden = _hidden_rows(e, s, q, nbq1, b)
    if hidden is not None:  # a row its masks hide completely (over every key): as the original, over the gathered keys
        scores = e.op("Where", [inside, scores, e.const(np.float32(-np.inf))])
        vis = e.op("Expand", [vis, e.op("Shape", [scores])])
        scores, fallback = _hidden_rows_as_original(e, s, scores, vis, keep, filled)
        vis = e.op("Or", [e.op("And", [hidden, fallback]), e.op("And", [e.op("Not", [hidden]), vis])])  # no bool Where in ORT
    parts = [(scores, vis, vg)]
    if pattern.selection.pyramid:  # the next ranks, pooled (per-key masks only: the pass checks)
        w, t = _key_weights(e, s, tk, e.op("Mul", [nbk, i64(e, b)]))
        start = nominal
        for level in range(1, pattern.selection.pyramid + 1):
            end = start + pattern.selection.topk * 2 ** level
            ids = e.op("Slice", [ranked, e.ints(start), e.ints(end), e.ints(3)])
            parts.append(_pooled(e, s, q6, kpad, vpad, w, t, ids, nbk, nbq1, b, level))
            start = end
    cat = (lambda xs, axis: e.op("Concat", xs, {"axis": axis}) if len(xs) > 1 else xs[0])  # noqa: E731
    scores = cat([sc for sc, _, _ in parts], -1)
    vis = cat([e.op("Expand", [vi, e.op("Shape", [sc])]) for sc, vi, _ in parts], -1)
    out = e.op("MatMul", [normalise(e, scores, vis), cat([va for _, _, va in parts], 4)])  # [B, Hkv, g, nbq, b, Dv]
    out = e.op("Reshape", [out, e.op("Concat", [e.shape_dim(q, 0), e.ints(s.heads, -1), e.shape_dim(v, 3)],
                                     {"axis": 0})])
    return e.op("Slice", [out, e.ints(0), e.op("Unsqueeze", [tq, e.ints(0)]), e.ints(2)])
