"""Lower a site's `Form` (patterns/form.py) to ONNX.

`lower(edit, form)` is the one entry: a fused op (fused.py), a gate epilogue, collapsed
weights (collapse.py), or a pattern × normaliser form. The last is computed banded
(banded.py: only the key blocks the pattern reaches) where that counts fewer score pairs
than dense at the site's length, else as dense scores masked to the pattern
(explicit.py); either way its output node carries the site's record (metadata
"attn_opt.form"), so detection reads it back as the site for the next pass and forms
compose on one site.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx import collapse
from attn_opt.backends.onnx.banded import emit_banded
from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.explicit import (MIN, emit_explicit, f32, row_max, row_sum, safe_div,
                                             softmax_visible)
from attn_opt.backends.onnx.fused import emit_fused
from attn_opt.patterns.form import Form, Gate, Normaliser, Pattern, StreamCache, banded_pays
from attn_opt.patterns.record import form_record
from attn_opt.patterns.site import AttentionSite
from attn_opt.rewriter.graph import FORM_KEY

OPSET = {"fused": 23, "form": 18, "collapse": 18}  # Attention; ReduceMax/ReduceSum with axes as an input


def opset_for(produces: str) -> int | None:
    """The opset the lowering of this kind of form needs (the model is converted up)."""
    return OPSET.get(produces)


def lower(e: SiteEdit, form: Form) -> str | None:
    """Emit `form` for `e.site` and rewire the site's output; a note for the report."""
    if form.fused:
        return emit_fused(e, form.fused)
    if form.gate is not None:
        return emit_gate(e, form.gate)
    if form.collapse is not None:
        return collapse.emit_collapse(e, form.collapse)
    if form.stream is not None:  # first: the outputs keep their names, the record names the full cache
        cap_cache(SiteEdit(e.model, e.site, e.pass_name, "cache"), form.stream)
    return emit_attention(e, e.site, form.pattern, form.normaliser)


def cap_cache(e: SiteEdit, stream: StreamCache) -> None:
    """The site's present key/value outputs keep the first `sinks` positions and the last
    `window` ones (all of them while the sequence is no longer than sinks + window); the
    attention still reads the whole concatenation."""
    c = e.site.cache
    for name in (c.present_key, c.present_value):
        full = next(v for v in e.model.graph.outputs if v.name == name)
        length = e.shape_dim(full, 2)
        start = e.op("Max", [e.ints(stream.sinks), e.op("Sub", [length, e.ints(stream.window)])])
        head = e.op("Slice", [full, e.ints(0), e.ints(stream.sinks), e.ints(2)])
        tail = e.op("Slice", [full, start, e.ints(2 ** 62), e.ints(2)])
        dims = list(full.shape) if full.shape is not None else ["batch", "heads", None, "head_dim"]
        dims[2] = "cache_len"  # min(total, sinks + window)
        e.commit_output(full, e.op("Concat", [head, tail], {"axis": 2}), ir.Shape(dims))


GRAPH_EDITS = {"drop_mlp": collapse.drop_mlp}


def per_head(e: SiteEdit, site: AttentionSite, values, ndim: int):
    """A per-head constant shaped [1, Hkv, g, 1, ...] to broadcast over `ndim`-D scores."""
    arr = np.asarray(values, dtype=np.float32).reshape((1, site.kv_heads, site.heads // site.kv_heads)
                                                       + (1,) * (ndim - 3))
    return e.const(arr)


AFFINE = (("temperature", 1.0), ("offset", 0.0), ("gain", 1.0))


def normaliser_fn(n: Normaliser, site: AttentionSite, ndim: int):
    """(edit, scores, visible) -> weights, for scores of rank `ndim` with heads as [Hkv, g];
    a per-head affine gain · N(temperature · S + offset) as initializers the calibration
    sets (attn_opt.<site>.temperature / .offset / .gain, one value per head)."""
    base = _normaliser_fn(n.without_affine(), site, ndim)
    if not n.affine:
        return base

    def affine(e, s, vis):
        t, o, g = (_affine_param(e, site, name, getattr(n, name), default, ndim) for name, default in AFFINE)
        return e.op("Mul", [base(e, e.op("Add", [e.op("Mul", [s, t]), o]), vis), g])

    return affine


def _affine_param(e: SiteEdit, site: AttentionSite, name: str, values, default: float, ndim: int):
    """The site's per-head initializer `name` ([heads]), viewed as [1, Hkv, g, 1, ...]."""
    full = f"attn_opt.{site.id}.{name}"
    init = e.model.graph.initializers.get(full)
    if init is None:
        vals = np.asarray(values if values is not None else [default] * site.heads, np.float32)
        init = e.initializer(name, vals)
    shape = e.ints(1, site.kv_heads, site.heads // site.kv_heads, *([1] * (ndim - 3)))
    return e.op("Reshape", [init, shape])


def _normaliser_fn(n: Normaliser, site: AttentionSite, ndim: int):
    if n.kind == "softmax":
        return softmax_visible
    if n.kind == "softplus":
        return lambda e, s, vis: _softplus(e, s, vis, n.n_train, n.p)
    if n.kind == "logit":
        return lambda e, s, vis: _logit(e, s, vis, per_head(e, site, n.per_head_bias(site.heads), ndim))
    if n.kind == "redistribute":
        return lambda e, s, vis: _redistribute(e, s, vis, site, n, ndim)
    if n.kind == "relu":
        return _relu
    bias = n.per_head_bias(site.heads)
    return lambda e, s, vis: _sigmoid(e, s, vis, None if bias is None else per_head(e, site, bias, ndim))


def _softplus(e, s, vis, n_train, p):
    if n_train:
        n = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        s = e.op("Mul", [s, e.op("Div", [e.op("Log", [e.op("Max", [n, f32(e, 1)])]), f32(e, math.log(n_train))])])
    a = e.op("Where", [vis, e.op("Softplus", [s]), f32(e, 0)])
    a = safe_div(e, a, row_sum(e, a))
    if p != 1:
        a = e.op("Pow", [a, f32(e, p)])
        a = safe_div(e, a, row_sum(e, a))
    return a


def _logit(e, s, vis, b):
    m = e.op("Max", [row_max(e, e.op("Where", [vis, s, f32(e, MIN)])), b])
    ex = e.op("Where", [vis, e.op("Exp", [e.op("Sub", [s, m])]), f32(e, 0)])
    return safe_div(e, ex, e.op("Add", [row_sum(e, ex), e.op("Exp", [e.op("Sub", [b, m])])]))


def _redistribute(e, s, vis, site, n: Normaliser, ndim):
    p = softmax_visible(e, s, vis)
    head = e.op("Slice", [p, e.ints(0), e.ints(n.sinks), e.ints(-1)])
    tail = e.op("Slice", [p, e.ints(n.sinks), e.ints(2 ** 62), e.ints(-1)])
    m = row_sum(e, head)
    rest = e.op("Sub", [f32(e, 1), m])
    factor = safe_div(e, e.op("Sub", [f32(e, 1), e.op("Mul", [m, f32(e, n.alpha)])]), rest)
    scaled = e.op("Concat", [e.op("Mul", [head, f32(e, n.alpha)]), e.op("Mul", [tail, factor])], {"axis": -1})
    keep = e.op("Less", [rest, f32(e, 1e-6)])  # a row all on the sinks is left as it is
    if n.heads:
        chosen = np.zeros(site.heads, np.float32)
        chosen[list(n.heads)] = 1
        keep = e.op("Or", [keep, e.op("Equal", [per_head(e, site, chosen, ndim), f32(e, 0)])])
    return e.op("Where", [keep, p, scaled])


def _relu(e, s, vis):
    return safe_div(e, e.op("Where", [vis, e.op("Relu", [s]), f32(e, 0)]), row_sum(e, e.op("Cast", [vis], {"to": 1})))


def _sigmoid(e, s, vis, b):
    """σ(S + b) on visible keys; b = −log n_i where no bias is given."""
    if b is None:
        n = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        b = e.op("Neg", [e.op("Log", [e.op("Max", [n, f32(e, 1)])])])
    return e.op("Where", [vis, e.op("Sigmoid", [e.op("Add", [s, b])]), f32(e, 0)])


def emit_attention(e: SiteEdit, site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser) -> str | None:
    """Emit `site` with this form, commit it, and record the form on the output node."""
    e.compute_in_fp32()
    note = None
    if pattern is not None and pattern.kind == "grid":
        out = _grid(e, site, pattern, normaliser)
    elif pattern is not None:
        banded, note = banded_pays(site, pattern)
        out = _split_heads(e, site, pattern, normaliser, banded)
    else:
        out = emit_explicit(e, site, normaliser_fn(normaliser, site, 5))
    out = e.back(out)
    out = e.op("Identity", [e.fold(out) if site.q.fold else out])  # the record's carrier: its output is the site's
    out.producer().metadata_props[FORM_KEY] = form_record(site, pattern, normaliser)
    e.commit(out, folded=True)
    return note


def _sparse(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser, banded: bool, qkv=None):
    if banded:
        return emit_banded(e, site, pattern, normaliser_fn(normaliser, site, 6), qkv=qkv)
    return emit_explicit(e, site, normaliser_fn(normaliser, site, 5), qkv=qkv, pattern=pattern)


def _split_heads(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser, banded: bool):
    """The sparse heads in the pattern; `dense_heads` (masks shared by all heads there)
    through the dense form, then the heads put back in order."""
    if not pattern.dense_heads:
        return _sparse(e, site, pattern, normaliser, banded)
    import dataclasses

    dense = sorted(pattern.dense_heads)
    sparse = [h for h in range(site.heads) if h not in dense]
    q, k, v = e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v)
    outs = []
    for heads, dense_part in ((dense, True), (sparse, False)):
        if not heads:
            continue
        idx = e.ints(*heads)
        sub = dataclasses.replace(site, heads=len(heads), kv_heads=len(heads))
        qkv = [e.op("Gather", [x, idx], {"axis": 1}) for x in (q, k, v)]
        if dense_part:
            outs.append(emit_explicit(e, sub, normaliser_fn(normaliser, sub, 5), qkv=qkv))
        else:
            outs.append(_sparse(e, sub, pattern.sparse_heads(), normaliser, banded, qkv=qkv))
    order = dense + sparse
    inverse = [order.index(h) for h in range(site.heads)]
    return e.op("Gather", [e.op("Concat", outs, {"axis": 1}) if len(outs) > 1 else outs[0], e.ints(*inverse)], {"axis": 1})


def _grid(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
    """Vision tokens: the prefix (class/register tokens) attends densely and stays visible
    to all; grid tokens attend to their kh x kw neighborhood, banded by grid row."""
    import dataclasses

    site = dataclasses.replace(site, additive=(), bool_mask=None)  # mask kind "none": any term is a no-op
    n = pattern.sinks
    q, k, v = e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v)
    tail = [e.op("Slice", [x, e.ints(n), e.ints(2 ** 62), e.ints(2)]) for x in (q, k, v)]
    out = emit_banded(e, site, pattern, normaliser_fn(normaliser, site, 6), qkv=tail, sink_kv=(k, v))
    if not n:
        return out
    head = e.op("Slice", [q, e.ints(0), e.ints(n), e.ints(2)])
    dense = emit_explicit(e, site, normaliser_fn(normaliser, site, 5), qkv=(head, k, v))
    return e.op("Concat", [dense, out], {"axis": 2})


def emit_gate(e: SiteEdit, gate: Gate) -> None:
    """O ⊙ σ(X W + b), the gate [B, T, H·k] viewed as [B, H, T, k]; the nodes read the
    site's output and are tagged as its epilogue."""
    site = e.site
    e.epilogue = True
    e.compute_in_fp32()
    x = e.value(gate.source)
    g = e.op("Sigmoid", [e.op("Add", [e.op("MatMul", [x, e.initializer("gate.weight", gate.weight)]),
                                      e.initializer("gate.bias", gate.bias)])])
    o = e.value(site.output)
    o = e.unfold(o, site.heads) if site.q.fold else o  # heads folded into the batch: [B, H, S, dv] (commit refolds)
    k = 1 if gate.mode == "headwise" else site.head_dim
    shape = e.op("Concat", [e.shape_dim(o, 0), e.shape_dim(o, 2), e.ints(site.heads, k)], {"axis": 0})
    g4 = e.op("Transpose", [e.op("Reshape", [g, shape])], {"perm": [0, 2, 1, 3]})  # [B, H, T, k]
    e.commit(e.back(e.op("Mul", [o, g4])))

