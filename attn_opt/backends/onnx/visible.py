"""Which (query, key) pairs a pattern keeps, computed in the graph: the one ONNX statement
of `Pattern.window_visible` (patterns/form.py), shared by the banded and the
masked-dense lowerings and tested against the NumPy reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.patterns.form import Pattern


def i64(e: SiteEdit, x: int) -> ir.Value:
    return e.const(np.int64(x))


def window_visible(e: SiteEdit, f: Pattern, i: ir.Value, p: ir.Value, t: ir.Value) -> ir.Value:
    """The pairs pattern `f`'s window keeps (sinks aside), in the graph: query positions
    `i` and key positions `p` (int64, broadcasting), sequence length `t` (scalar). The
    ONNX statement of `Pattern.window_visible`, for the banded and the masked-dense
    lowerings."""
    op = e.op
    d = op("Sub", [i, p])
    if f.kind in ("stride", "shift"):
        if f.kind == "stride":
            off = f.block - f.window if f.causal else (f.block - f.window) // 2
            first = op("Add", [op("Mul", [op("Div", [i, i64(e, f.block)]), i64(e, f.block)]), i64(e, off)])
        else:
            first = op("Sub", [i, i64(e, f.window // 2)])
        start = op("Max", [op("Min", [first, op("Sub", [t, i64(e, f.span)])]), i64(e, 0)])
        vis = op("And", [op("GreaterOrEqual", [p, start]), op("Less", [p, op("Add", [start, i64(e, f.span)])])])
    elif f.causal:
        vis = op("Less", [d, i64(e, f.window * f.dilation)])
    else:
        vis = op("LessOrEqual", [op("Abs", [d]), i64(e, f.window // 2 * f.dilation)])
    if f.dilation > 1:  # only keys in the query's residue class
        vis = op("And", [vis, op("Equal", [op("Mod", [d, i64(e, f.dilation)]), i64(e, 0)])])
    if f.causal:
        vis = op("And", [vis, op("GreaterOrEqual", [d, i64(e, 0)])])
    return vis


def positions(e: SiteEdit, q: ir.Value, k: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(query positions [Tq, 1], key positions [Tk], Tk): the queries are the last Tq of
    Tk positions (a decoder step's new tokens after its cache)."""
    tq = e.op("Squeeze", [e.shape_dim(q, 2), e.ints(0)])
    tk = e.op("Squeeze", [e.shape_dim(k, 2), e.ints(0)])
    i = e.op("Unsqueeze", [e.op("Add", [e.op("Range", [i64(e, 0), tq, i64(e, 1)]), e.op("Sub", [tk, tq])]),
                           e.ints(1)])
    return i, e.op("Range", [i64(e, 0), tk, i64(e, 1)]), tk


def causal_visible(e: SiteEdit, q: ir.Value, k: ir.Value) -> ir.Value:
    """[Tq, Tk] bool: each query sees the keys up to its own position."""
    i, p, _ = positions(e, q, k)
    return e.op("LessOrEqual", [p, i])


def pattern_visible(e: SiteEdit, f: Pattern, q: ir.Value, k: ir.Value) -> ir.Value:
    """[Tq, Tk] bool: the pairs `f` keeps on the full score matrix (queries are the last
    Tq of Tk positions), sinks included: the masked-dense lowering."""
    i, p, tk = positions(e, q, k)
    vis = window_visible(e, f, i, p, tk)
    if f.sinks:
        sink = e.op("Less", [p, i64(e, f.sinks)])
        if f.causal:
            sink = e.op("And", [sink, e.op("LessOrEqual", [p, i])])
        vis = e.op("Or", [vis, sink])
    return vis
