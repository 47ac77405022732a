"""Routing attention in standard ONNX (patterns/form.py: Selection, routing): the k-means
centroids (unrolled Lloyd steps: MatMul, ArgMax, one-hot sums), each centroid's cluster
by TopK (ties to the lowest index, as the reference), each query's nearest centroid, and
the pairs they keep as a boolean [B, Hkv, g, Tq, Tk] for the masked-dense lowering
(explicit.py). The ONNX statement of patterns/reference.py: routing_clusters; it saves no
FLOPs yet (the report says so)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.visible import i64
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import AttentionSite


def _unit(e: SiteEdit, x: ir.Value) -> ir.Value:
    norm = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [x, x]), e.ints(-1)], {"keepdims": 1})])
    return e.op("Div", [x, e.op("Max", [norm, e.const(np.float32(1e-12))])])


def _t(e: SiteEdit, x: ir.Value) -> ir.Value:
    return e.op("Transpose", [x], {"perm": [0, 1, 3, 2]})


def routing_visible(e: SiteEdit, s: AttentionSite, pattern: Pattern, q, k, seen) -> ir.Value:
    """[B, Hkv, g, Tq, Tk] bool: the pairs the routing pattern keeps; q [B, H, Tq, d], k
    [B, Hkv, Tk, d]; `seen` [Bm, hk, hg, Tqm, Tk] bool (the site's masks) or None."""
    sel, hkv, g, d = pattern.selection, s.kv_heads, s.heads // s.kv_heads, s.head_dim
    c = sel.clusters
    f = lambda x: e.op("Cast", [x], {"to": ir.DataType.FLOAT})  # noqa: E731
    qn = e.op("Reshape", [_unit(e, f(q)), e.ints(0, hkv, -1, d)])  # [B, Hkv, g·Tq, d]
    kn = _unit(e, f(k))  # [B, Hkv, Tk, d]
    tk = e.op("Squeeze", [e.shape_dim(k, 2), e.ints(0)])
    tq = e.op("Squeeze", [e.shape_dim(q, 2), e.ints(0)])
    kshape = e.op("Shape", [kn], {"end": 3})
    if seen is None:
        live = e.op("Expand", [e.const(np.ones((1, 1, 1), bool)), kshape])
    else:  # keys some query (of any head) may see: [Bm, 1, Tk]
        live = e.op("Greater", [e.op("ReduceMax", [f(seen), e.ints(1, 2, 3)], {"keepdims": 0}), e.const(np.float32(0))])
        live = e.op("Unsqueeze", [live, e.ints(1)])
    w = e.op("Expand", [f(live), kshape])  # [B, Hkv, Tk]
    run = e.op("Div", [e.op("Mul", [e.op("Range", [i64(e, 0), tk, i64(e, 1)]), i64(e, c)]), tk])
    cs = e.op("Range", [i64(e, 0), i64(e, c), i64(e, 1)])
    onehot = f(e.op("Equal", [e.op("Unsqueeze", [run, e.ints(1)]), cs]))  # [Tk, C]
    mu = _unit(e, e.op("MatMul", [_t(e, e.op("Mul", [onehot, e.op("Unsqueeze", [w, e.ints(3)])])), kn]))  # [B, Hkv, C, d]
    pts = e.op("Concat", [qn, kn], {"axis": 2})
    ones = e.op("Expand", [e.const(np.ones((1, 1, 1), np.float32)), e.op("Shape", [qn], {"end": 3})])
    wp = e.op("Unsqueeze", [e.op("Concat", [ones, w], {"axis": 2}), e.ints(3)])  # [B, Hkv, N, 1]
    for _ in range(sel.iterations):
        near = e.op("ArgMax", [e.op("MatMul", [pts, _t(e, mu)])], {"axis": -1, "keepdims": 1})  # [B, Hkv, N, 1]
        m = e.op("Mul", [f(e.op("Equal", [near, cs])), wp])  # [B, Hkv, N, C]
        mass = e.op("Unsqueeze", [e.op("ReduceSum", [m, e.ints(2)], {"keepdims": 0}), e.ints(3)])  # [B, Hkv, C, 1]
        mu = e.op("Where", [e.op("Greater", [mass, e.const(np.float32(0))]),
                            _unit(e, e.op("MatMul", [_t(e, m), pts])), mu])
    n = e.op("Min", [tk, i64(e, sel.size)]) if sel.size else e.op("Div", [e.op("Add", [tk, i64(e, c - 1)]), i64(e, c)])
    sim = e.op("Where", [e.op("Unsqueeze", [live, e.ints(2)]), e.op("MatMul", [mu, _t(e, kn)]),
                         e.const(np.float32(-np.inf))])  # [B, Hkv, C, Tk]
    idx = e.op("TopK", [sim, e.op("Unsqueeze", [n, e.ints(0)])], {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)[1]
    zeros = e.op("Expand", [e.const(np.zeros((1, 1, 1, 1), np.float32)), e.op("Shape", [sim])])
    ones4 = e.op("Expand", [e.const(np.ones((1, 1, 1, 1), np.float32)), e.op("Shape", [idx])])
    members = e.op("ScatterElements", [zeros, idx, ones4], {"axis": -1})  # [B, Hkv, C, Tk]
    near = e.op("ArgMax", [e.op("MatMul", [qn, _t(e, mu)])], {"axis": -1, "keepdims": 1})  # [B, Hkv, g·Tq, 1]
    near = f(e.op("Equal", [e.op("Reshape", [near, e.ints(0, hkv, g, -1, 1)]), cs]))  # [B, Hkv, g, Tq, C]
    vis = e.op("Greater", [e.op("MatMul", [near, e.op("Unsqueeze", [members, e.ints(2)])]), e.const(np.float32(0))])
    i = e.op("Unsqueeze", [e.op("Range", [e.op("Sub", [tk, tq]), tk, i64(e, 1)]), e.ints(1)])  # [Tq, 1]
    j = e.op("Unsqueeze", [e.op("Range", [i64(e, 0), tk, i64(e, 1)]), e.ints(0)])  # [1, Tk]
    dist = e.op("Sub", [i, j])
    if pattern.window > 0:
        if pattern.causal:
            band = e.op("And", [e.op("GreaterOrEqual", [dist, i64(e, 0)]), e.op("Less", [dist, i64(e, pattern.window)])])
        else:
            band = e.op("LessOrEqual", [e.op("Abs", [dist]), i64(e, pattern.window // 2)])
        vis = e.op("Or", [vis, band])
    if pattern.causal:
        vis = e.op("And", [vis, e.op("GreaterOrEqual", [dist, i64(e, 0)])])
    return vis
