"""Attention written out with standard ONNX ops from a site record: dense scores (masked
to a sparse pattern where the band would not pay), then a normaliser: the lowering of
every pattern × normaliser form the banded one does not take.

Layout inside: 5-D [B, Hkv, g, Tq, ·] (g = H / Hkv) so GQA reads each kv head once.
`vis` is the boolean [.., Tq, Tk] of keys each row may see (the site's masks, causal);
every normaliser gives 0 on keys outside it and a zero row where nothing is visible.
Needs opset 18 (ReduceMax/ReduceSum take their axes as an input).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.visible import causal_visible, pattern_visible
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import MASKED
from attn_opt.patterns.site import AttentionSite

MIN = np.float32(np.finfo(np.float32).min)
TINY = np.float32(1e-30)
NormaliserFn = Callable[[SiteEdit, ir.Value, ir.Value], ir.Value]


def f32(e: SiteEdit, x) -> ir.Value:
    return e.const(np.asarray(x, dtype=np.float32))


def row_sum(e: SiteEdit, x: ir.Value) -> ir.Value:
    return e.op("ReduceSum", [x, e.ints(-1)], {"keepdims": 1})


def row_max(e: SiteEdit, x: ir.Value) -> ir.Value:
    return e.op("ReduceMax", [x, e.ints(-1)], {"keepdims": 1})


def safe_div(e: SiteEdit, num: ir.Value, den: ir.Value) -> ir.Value:
    """num / den with 0 where den is 0 (a row that sees no key)."""
    return e.op("Div", [num, e.op("Max", [den, f32(e, TINY)])])


def softmax_visible(e: SiteEdit, s: ir.Value, vis: ir.Value) -> ir.Value:
    ex = e.op("Where", [vis, e.op("Exp", [e.op("Sub", [s, row_max(e, e.op("Where", [vis, s, f32(e, MIN)]))])]),
                        f32(e, 0)])
    return safe_div(e, ex, row_sum(e, ex))


def softcap(e: SiteEdit, site: AttentionSite, s: ir.Value) -> ir.Value:
    """c·tanh(S/c) on scaled scores, where the site soft-caps them (before any mask)."""
    if not site.softcap:
        return s
    c = f32(e, site.softcap)
    return e.op("Mul", [e.op("Tanh", [e.op("Div", [s, c])]), c])


def _mask5(e: SiteEdit, site: AttentionSite, m, masks=None) -> ir.Value:
    """A mask of rank 2 or 4 as 5-D [Bm, hk, hg, Tqm, Tk]. `masks` (stream_heads.Masks):
    `site` holds only some of the heads the term was written for, and maybe only some of
    its keys."""
    x = e.term(m)
    shape = site.mask_shapes.get(m.name) or m.shape
    if masks is not None and masks.keys is not None and shape[-1] != 1:
        x = masks.keys(x)
    if len(shape) == 2:
        return e.op("Unsqueeze", [x, e.ints(0, 1, 2)])
    per_head = shape[1] == (masks.of if masks is not None else site.heads) and shape[1] != 1
    if per_head and masks is not None:
        x = e.op("Gather", [x, e.ints(*masks.heads)], {"axis": 1})
    if per_head and site.heads > 1:
        dims = e.op("Concat", [e.shape_dim(x, 0), e.ints(site.kv_heads, site.heads // site.kv_heads),
                               e.op("Shape", [x], {"start": 2})], {"axis": 0})
        return e.op("Reshape", [x, dims])
    return e.op("Unsqueeze", [x, e.ints(2)])


def scores_and_visibility(e: SiteEdit, site: AttentionSite, q, k, pattern: Pattern | None = None, sink_q=None,
                          masks=None):
    """Scores [B, Hkv, g, Tq, Tk] and the keys each row sees: the site's masks and
    causality, and `pattern`'s pairs where one is given (the masked-dense lowering).
    `sink_q` = (n, f): the first n key columns are scored with the queries f(q, k).
    `masks`: how a part of the site's heads and keys reads its mask terms (`_mask5`)."""
    hkv, g = site.kv_heads, site.heads // site.kv_heads

    def q5(x):
        return e.op("Reshape", [e.op("Mul", [x, f32(e, site.scale)]), e.ints(0, hkv, g, -1, site.head_dim)])

    kt = e.op("Transpose", [e.op("Unsqueeze", [k, e.ints(2)])], {"perm": [0, 1, 2, 4, 3]})
    if sink_q is None:
        s = e.op("MatMul", [q5(q), kt])
    else:
        n, turned = sink_q
        head = e.op("MatMul", [q5(turned(q, k)), e.op("Slice", [kt, e.ints(0), e.ints(n), e.ints(-1)])])
        tail = e.op("MatMul", [q5(q), e.op("Slice", [kt, e.ints(n), e.ints(2 ** 62), e.ints(-1)])])
        s = e.op("Concat", [head, tail], {"axis": -1})
    s = softcap(e, site, s)  # [B, Hkv, g, Tq, Tk]
    vis = filled = c = None
    for m in site.additive:
        m5 = _mask5(e, site, m, masks)
        s = e.op("Add", [s, m5])
        hide = e.op("Greater", [m5, f32(e, MASKED)])
        vis = hide if vis is None else e.op("And", [vis, hide])
        if m.name in site.filled_terms:
            filled = m5 if filled is None else e.op("Add", [filled, m5])
    if site.bool_mask is not None:
        c = _mask5(e, site, site.bool_mask, masks)
        if site.bool_mask.dtype != "bool":
            c = e.op("Cast", [c], {"to": ir.DataType.BOOL})
        c = c if site.bool_keep else e.op("Not", [c])
        vis = c if vis is None else e.op("And", [vis, c])
    tri = None
    if site.causal and (site.rule != "eager" or (not site.additive and site.bool_mask is None)):
        tri = causal_visible(e, q, k)  # a fused op's is_causal (harmless where its mask is causal already)
        vis = tri if vis is None else e.op("And", [vis, tri])
    seen = vis  # the pairs the site's masks keep (None: all)
    hidden = None  # the rows the site's masks hide completely
    if vis is None:
        vis = e.op("Equal", [s, s])  # everything visible (a finite score equals itself)
    else:
        s, vis = _hidden_rows_as_original(e, site, s, vis, c, filled)
        hidden = e.op("Not", [_any(e, seen)])
        if tri is not None:  # a fused op's causality hides with -inf: not in a hidden row's uniform
            vis = e.op("And", [vis, tri])
    if pattern is None:
        return s, vis
    if pattern.selection is not None:  # routing: clusters chosen from Q and K
        from attn_opt.backends.onnx.routing import routing_visible

        kept = routing_visible(e, site, pattern, q, k, seen)
    else:
        kept = pattern_visible(e, pattern, q, k)
    # a hidden row is the original's whatever the pattern (its keys are a padded row's, over
    # past + new on a decoder step, where the pattern's causality would cut off the new ones)
    return s, e.op("And", [vis, kept if hidden is None else e.op("Or", [kept, hidden])])


def _any(e: SiteEdit, x) -> ir.Value:
    """Row-wise any of a boolean [.., Tk] (keeping the axis)."""
    return e.op("Greater", [e.op("ReduceMax", [e.op("Cast", [x], {"to": ir.DataType.FLOAT}), e.ints(-1)],
                                 {"keepdims": 1}), f32(e, 0)])


def _hidden_rows_as_original(e: SiteEdit, site: AttentionSite, s, vis, keep=None, filled=None):
    """A row whose keys are all hidden by *finite* values gets, in the original, a softmax
    over the scores those values carry (equal scores: uniform weights) on every key whose
    score is not -inf. Such rows see exactly those keys here, with the original's scores:
    a key the boolean mask hides carries its fill plus the terms added after it
    (`filled`), which is -inf where that overflows in the site's dtype (a where-then-add
    double mask hides such keys for good). Rows with no such key (NaN in the original)
    keep none and give zeros."""
    fill = site.mask_value
    finite_fill = fill is not None and np.isfinite(fill)
    if site.zero_hidden_rows or (not site.additive and not finite_fill):  # zeros there, as the normalisers give
        return s, vis
    dead = e.is_inf(e.back(s))  # back in the site's dtype: what overflows there
    if keep is not None and finite_fill:
        hidden = f32(e, fill) if filled is None else e.op("Add", [f32(e, fill), filled])
        dead = e.op("Or", [e.op("And", [keep, dead]),  # (Where has no bool kernel in ONNX Runtime)
                           e.op("And", [e.op("Not", [keep]), e.is_inf(e.back(hidden))])])
        s = e.op("Where", [keep, s, hidden])
    alive = e.op("Not", [dead])
    uniform = e.op("And", [e.op("Not", [_any(e, vis)]), _any(e, alive)])
    return s, e.op("Or", [vis, e.op("And", [uniform, alive])])


def emit_explicit(e: SiteEdit, site: AttentionSite, normalise: NormaliserFn, qkv=None,
                  pattern: Pattern | None = None, sink_q=None, masks=None) -> ir.Value:
    """The dense scores, masked to `pattern` where one is given, then `normalise`."""
    q, k, v = qkv or (e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v))
    s, vis = scores_and_visibility(e, site, q, k, pattern, sink_q, masks)
    p = normalise(e, s, vis)
    o = e.op("MatMul", [p, e.op("Unsqueeze", [v, e.ints(2)])])  # [B, Hkv, g, Tq, Dv]
    shape = e.op("Concat", [e.shape_dim(q, 0), e.ints(site.heads), e.shape_dim(q, 2), e.shape_dim(v, 3)], {"axis": 0})
    return e.op("Reshape", [o, shape])


def emit_scores_probs(e: SiteEdit, site: AttentionSite, q: ir.Value | None = None, k: ir.Value | None = None) -> ir.Value:
    """Softmax probabilities [B, H, Tq, Tk]; Q/K may be replaced (collapsed products)."""
    q = q if q is not None else e.bhsd(site.q)
    k = k if k is not None else e.bhsd(site.k)
    s, vis = scores_and_visibility(e, site, q, k)
    p5 = softmax_visible(e, s, vis)
    shape = e.op("Concat", [e.shape_dim(q, 0), e.ints(site.heads), e.op("Shape", [p5], {"start": 3})], {"axis": 0})
    return e.op("Reshape", [p5, shape])
