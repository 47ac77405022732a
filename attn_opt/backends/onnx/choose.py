"""The selection of a content pattern in the graph (patterns/form.py: Selection): mean-pooled
queries and keys per block, block scores, forced blocks, and TopK, giving the key blocks
each query block keeps. The ONNX statement of `patterns/reference.py: selected_blocks`;
its nodes are few (the scores are [nbq, nbk] per kv head, T²/block² pairs), tagged
attn_opt.selection so the report counts their FLOPs apart.

ONNX TopK returns equal values lower index first, so ties go to the lowest block index,
as in the reference and on torch.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.visible import i64
from attn_opt.core.graph import SELECTION_TAG
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import MASKED, AttentionSite


def pad_blocks(e: SiteEdit, x: ir.Value, t: ir.Value, nb: ir.Value, block: int) -> ir.Value:
    """[B, H, T, D] zero-padded to nb·block positions (T, nb: scalar int64)."""
    amount = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [nb, i64(e, block)]), t]), e.ints(0)])
    pads = e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0), amount, e.ints(0)], {"axis": 0})
    return e.op("Pad", [x, pads])


def blocks_of(e: SiteEdit, t: ir.Value, block: int) -> ir.Value:
    """ceil(T / block), scalar int64."""
    return e.op("Div", [e.op("Add", [t, i64(e, block - 1)]), i64(e, block)])


def length(e: SiteEdit, x: ir.Value, axis: int = 2) -> ir.Value:
    return e.op("Squeeze", [e.shape_dim(x, axis), e.ints(0)])


def block_means(e: SiteEdit, x: ir.Value, block: int, heads: int, d: int) -> ir.Value:
    """[B, heads, T, d] -> [B, heads, nb, d]: each block's mean over its tokens in the sequence."""
    t = length(e, x)
    nb = blocks_of(e, t, block)
    xb = e.op("Reshape", [pad_blocks(e, x, t, nb, block), e.ints(0, heads, -1, block, d)])
    sums = e.op("ReduceSum", [xb, e.ints(3)], {"keepdims": 0})
    start = e.op("Mul", [e.op("Range", [i64(e, 0), nb, i64(e, 1)]), i64(e, block)])
    count = e.op("Min", [i64(e, block), e.op("Sub", [t, start])])  # [nb]
    count = e.op("Unsqueeze", [e.op("Cast", [count], {"to": ir.DataType.FLOAT}), e.ints(1)])
    return e.op("Div", [sums, count])


def forced(e: SiteEdit, pattern: Pattern, a: ir.Value, c: ir.Value) -> ir.Value | None:
    """Query block a always keeps key block c (int64, broadcasting): the sinks' blocks and
    the local band (patterns/form.py: Pattern.forced)."""
    parts = []
    if pattern.sink_blocks():
        parts.append(e.op("Less", [c, i64(e, pattern.sink_blocks())]))
    r = pattern.band_blocks()
    if r >= 0:
        d = e.op("Sub", [a, c])
        if pattern.causal:
            parts.append(e.op("And", [e.op("GreaterOrEqual", [d, i64(e, 0)]), e.op("LessOrEqual", [d, i64(e, r)])]))
        else:
            parts.append(e.op("LessOrEqual", [e.op("Abs", [d]), i64(e, r)]))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else e.op("Or", parts)


def mask_sees(e: SiteEdit, s: AttentionSite) -> tuple[ir.Value, int, bool] | None:
    """(sees [Bm, Hm, Tqm, Tk] bool: the pairs every mask of the site keeps, Hm, whether the
    masks differ per query); None without masks."""
    masks = [(m, False) for m in s.additive] + ([(s.bool_mask, True)] if s.bool_mask is not None else [])
    if not masks:
        return None
    sees, heads, per_query = None, 1, False
    for m, is_bool in masks:
        x = e.term(m)
        shape = tuple(s.mask_shapes[m.name])
        if len(shape) == 2:  # [Tq, Tk]
            x, shape = e.op("Unsqueeze", [x, e.ints(0, 1)]), (1, 1) + shape
        if is_bool:
            x = e.op("Cast", [x], {"to": ir.DataType.BOOL}) if m.dtype != "bool" else x
            ok = x if s.bool_keep else e.op("Not", [x])
        else:
            ok = e.op("Greater", [x, e.const(np.float32(MASKED))])
        sees = ok if sees is None else e.op("And", [sees, ok])
        heads, per_query = max(heads, shape[1]), per_query or shape[2] != 1
    return sees, heads, per_query


def seen_blocks(e: SiteEdit, s: AttentionSite, q: ir.Value, k: ir.Value, block: int) -> ir.Value | None:
    """[Bm, Hkv|1, nbq|1, nbk] bool: the (query block, key block) pairs holding a pair the
    site's masks keep (a KV group: any of its heads); None without masks. The ONNX
    statement of `patterns/reference.py: seen_blocks`."""
    seen = mask_sees(e, s)
    if seen is None:
        return None
    sees, heads, per_query = seen
    sees = e.op("Cast", [sees], {"to": ir.DataType.FLOAT})  # [Bm, Hm, Tqm, Tk]
    tk = length(e, k)
    nbk = blocks_of(e, tk, block)
    cols = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [nbk, i64(e, block)]), tk]), e.ints(0)])
    if per_query:
        tq = length(e, q)
        rows = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [blocks_of(e, tq, block), i64(e, block)]), tq]), e.ints(0)])
        sees = e.op("Pad", [sees, e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0), rows, cols], {"axis": 0})])
        shape = e.op("Concat", [e.ints(0, 0, -1, block), e.shape_dim(sees, 3)], {"axis": 0})
        sees = e.op("ReduceMax", [e.op("Reshape", [sees, shape]), e.ints(3)], {"keepdims": 0})
    else:
        sees = e.op("Pad", [sees, e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0, 0), cols], {"axis": 0})])
    sees = e.op("ReduceMax", [e.op("Reshape", [sees, e.ints(0, 0, 0, -1, block)]), e.ints(4)], {"keepdims": 0})
    if heads == s.heads and s.heads > s.kv_heads:
        shape = e.op("Concat", [e.shape_dim(sees, 0), e.ints(s.kv_heads, -1), e.op("Shape", [sees], {"start": 2})],
                     {"axis": 0})
        sees = e.op("ReduceMax", [e.op("Reshape", [sees, shape]), e.ints(2)], {"keepdims": 0})
    return e.op("Greater", [sees, e.const(np.float32(0))])


def _coarse_to_fine(e: SiteEdit, pattern: Pattern, qs, k, kv_heads: int, d: int, a, seen, nbk) -> ir.Value | None:
    """HiP's levels > 1: [B, Hkv, nbq, nbk] bool, the blocks left after the search from
    groups of 2^(levels-1) blocks down (topk groups kept per level, each split in two);
    patterns/reference.py: selected_blocks states it. None at levels = 1."""
    cand, ninf = None, e.const(np.float32(-np.inf))
    for level in range(pattern.selection.levels - 1, 0, -1):
        m = 2 ** level
        km = block_means(e, k, pattern.block * m, kv_heads, d)
        s = e.op("MatMul", [qs, e.op("Transpose", [km], {"perm": [0, 1, 3, 2]})])  # [B, Hkv, nbq, n_l]
        n = length(e, s, 3)
        if seen is not None:  # a group some block of which the masks leave
            amount = e.op("Unsqueeze", [e.op("Sub", [e.op("Mul", [n, i64(e, m)]), nbk]), e.ints(0)])
            x = e.op("Pad", [e.op("Cast", [seen], {"to": ir.DataType.FLOAT}),
                             e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0, 0), amount], {"axis": 0})])
            x = e.op("ReduceMax", [e.op("Reshape", [x, e.ints(0, 0, 0, -1, m)]), e.ints(4)], {"keepdims": 0})
            s = e.op("Where", [e.op("Greater", [x, e.const(np.float32(0))]), s, ninf])
        if pattern.causal:
            g = e.op("Unsqueeze", [e.op("Range", [i64(e, 0), n, i64(e, 1)]), e.ints(0)])
            s = e.op("Where", [e.op("Greater", [e.op("Mul", [g, i64(e, m)]), a]), ninf, s])
        if cand is not None:
            s = e.op("Where", [cand, s, ninf])
        top = e.op("TopK", [s, e.op("Min", [e.op("Unsqueeze", [n, e.ints(0)]), e.ints(pattern.selection.topk)])],
                   {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)[1]
        zeros = e.op("Expand", [e.const(np.zeros((1, 1, 1, 1), np.float32)), e.op("Shape", [s])])
        ones = e.op("Expand", [e.const(np.ones((1, 1, 1, 1), np.float32)), e.op("Shape", [top])])
        kept = e.op("Greater", [e.op("ScatterElements", [zeros, top, ones], {"axis": -1}), e.const(np.float32(0))])
        half = m // 2
        below = e.op("Div", [e.op("Add", [nbk, i64(e, half - 1)]), i64(e, half)])
        cand = e.op("Gather", [kept, e.op("Div", [e.op("Range", [i64(e, 0), below, i64(e, 1)]), i64(e, 2)])], {"axis": 3})
    return cand


def choose_blocks(e: SiteEdit, pattern: Pattern, q: ir.Value, k: ir.Value, heads: int, kv_heads: int, d: int,
                  scale: float, site: AttentionSite | None = None) -> tuple[ir.Value, ir.Value]:
    """(indices [B, Hkv, nbq, C] int64, C as a 1-element int64): the key blocks each query
    block keeps, best first (a pyramid: its pooled levels' blocks after the full ones); q [B, H, Tq, d], k [B, Hkv, Tk, d].
    With `site`, a block its masks hide from the whole query block ranks below the others."""
    b, first = pattern.block, len(e.nodes)
    qm = block_means(e, q, b, heads, d)  # [B, H, nbq, D]
    qm = e.op("ReduceSum", [e.op("Reshape", [qm, e.ints(0, kv_heads, heads // kv_heads, -1, d)]), e.ints(2)],
              {"keepdims": 0})
    km = block_means(e, k, b, kv_heads, d)  # [B, Hkv, nbk, D]
    qs = e.op("Mul", [qm, e.const(np.float32(scale))])
    score = e.op("MatMul", [qs, e.op("Transpose", [km], {"perm": [0, 1, 3, 2]})])  # [B, Hkv, nbq, nbk]
    nbq, nbk = length(e, score, 2), length(e, score, 3)
    a = e.op("Unsqueeze", [e.op("Range", [i64(e, 0), nbq, i64(e, 1)]), e.ints(1)])
    c = e.op("Unsqueeze", [e.op("Range", [i64(e, 0), nbk, i64(e, 1)]), e.ints(0)])
    if pattern.causal:  # a query block stands at the key block of its last query (a step: the cache's end)
        tq, tk = length(e, q), length(e, k)
        last = e.op("Min", [e.op("Mul", [e.op("Add", [a, i64(e, 1)]), i64(e, b)]), tq])
        a = e.op("Div", [e.op("Add", [e.op("Sub", [last, i64(e, 1)]), e.op("Sub", [tk, tq])]), i64(e, b)])
    rank = score
    seen = None if site is None else seen_blocks(e, site, q, k, b)
    if seen is not None:
        rank = e.op("Where", [seen, rank, e.const(np.float32(-np.inf))])
    cand = _coarse_to_fine(e, pattern, qs, k, kv_heads, d, a, seen, nbk)
    if cand is not None:
        rank = e.op("Where", [cand, rank, e.const(np.float32(-np.inf))])
    f = forced(e, pattern, a, c)
    if f is not None:
        rank = e.op("Where", [f, e.const(np.float32(np.inf)), rank])
    if pattern.causal:
        rank = e.op("Where", [e.op("Greater", [c, a]), e.const(np.float32(-np.inf)), rank])
    sel = pattern.selection
    ranked = sel.topk + pattern.forced_count() + sum(sel.topk * 2 ** lv for lv in range(1, sel.pyramid + 1))
    kept = e.op("Min", [e.op("Unsqueeze", [nbk, e.ints(0)]), e.ints(ranked)])
    idx = e.op("TopK", [rank, kept], {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)[1]
    for node in e.nodes[first:]:  # counted apart in the report (core/ir/onnx_flops.py)
        node.metadata_props[SELECTION_TAG] = "1"
    return idx, kept
