"""Lower one attention form to ONNX: a sparse pattern (or dense) × a normaliser.

Every form-changing pass (sparse, softplus, sinkfree) calls `emit_attention` with the
site's current form plus its own change, so passes compose on the same site: the
output node carries a record of the form and operands (metadata "attn_opt.form"), and
detection reads that record back as the site for the next pass.
"""

from __future__ import annotations

import math

import numpy as np

from attn_opt.backends.onnxruntime.edit import SiteEdit
from attn_opt.backends.onnxruntime.explicit import (MIN, emit_explicit, f32, row_max, row_sum, safe_div,
                                                    softmax_visible)
from attn_opt.patterns.record import form_record
from attn_opt.patterns.site import AttentionSite
from attn_opt.rewriter.ir.onnx import FORM_KEY


def per_head(e: SiteEdit, site: AttentionSite, values, ndim: int):
    """A per-head constant shaped [1, Hkv, g, 1, ...] to broadcast over `ndim`-D scores."""
    arr = np.asarray(values, dtype=np.float32).reshape((1, site.kv_heads, site.heads // site.kv_heads)
                                                       + (1,) * (ndim - 3))
    return e.const(arr)


def normaliser_fn(spec: dict, site: AttentionSite, ndim: int):
    kind = spec["kind"]
    if kind == "softmax":
        return softmax_visible
    if kind == "softplus":
        return lambda e, s, vis: _softplus(e, s, vis, spec.get("n_train"), spec.get("p", 1.0))
    if kind == "logit":
        return lambda e, s, vis: _logit(e, s, vis, per_head(e, site, spec["bias"], ndim))
    if kind == "redistribute":
        return lambda e, s, vis: _redistribute(e, s, vis, site, spec, ndim)
    if kind == "relu":
        return _relu
    raise ValueError(f"unknown normaliser {kind!r}")


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


def _redistribute(e, s, vis, site, spec, ndim):
    p = softmax_visible(e, s, vis)
    n, alpha = spec["sinks"], spec["alpha"]
    head = e.op("Slice", [p, e.ints(0), e.ints(n), e.ints(-1)])
    tail = e.op("Slice", [p, e.ints(n), e.ints(2 ** 62), e.ints(-1)])
    m = row_sum(e, head)
    rest = e.op("Sub", [f32(e, 1), m])
    factor = safe_div(e, e.op("Sub", [f32(e, 1), e.op("Mul", [m, f32(e, alpha)])]), rest)
    scaled = e.op("Concat", [e.op("Mul", [head, f32(e, alpha)]), e.op("Mul", [tail, factor])], {"axis": -1})
    keep = e.op("Less", [rest, f32(e, 1e-6)])  # a row all on the sinks is left as it is
    if spec.get("heads"):
        chosen = np.zeros(site.heads, np.float32)
        chosen[list(spec["heads"])] = 1
        keep = e.op("Or", [keep, e.op("Equal", [per_head(e, site, chosen, ndim), f32(e, 0)])])
    return e.op("Where", [keep, p, scaled])


def _relu(e, s, vis):
    return safe_div(e, e.op("Where", [vis, e.op("Relu", [s]), f32(e, 0)]), row_sum(e, e.op("Cast", [vis], {"to": 1})))


def emit_attention(e: SiteEdit, site: AttentionSite, pattern: dict | None, normaliser: dict):
    """Emit `site` with this form, commit it, and record the form on the output node."""
    e.compute_in_fp32()
    if pattern and pattern.get("grid"):
        out = _grid(e, site, pattern, normaliser)
    elif pattern and pattern.get("dense_heads"):
        out = _split_heads(e, site, pattern, normaliser)
    elif pattern:
        from attn_opt.backends.onnxruntime.banded import emit_banded
        from attn_opt.passes.sparse import Sparse

        out = emit_banded(e, site, Sparse(**pattern).form(site), normaliser_fn(normaliser, site, 6))
    else:
        out = emit_explicit(e, site, normaliser_fn(normaliser, site, 5))
    out = e.back(out)
    out = e.op("Identity", [e.fold(out) if site.q.fold else out])  # the record's carrier: its output is the site's
    out.producer().metadata_props[FORM_KEY] = form_record(site, pattern, normaliser)
    e.commit(out, folded=True)
    return out


def _split_heads(e: SiteEdit, site: AttentionSite, pattern: dict, normaliser: dict):
    """Head-aware hybrid: the dense heads through the explicit form, the rest banded,
    then the heads put back in order (masks are shared by all heads here)."""
    import dataclasses

    from attn_opt.backends.onnxruntime.banded import emit_banded
    from attn_opt.passes.sparse import Sparse

    dense = sorted(pattern["dense_heads"])
    sparse = [h for h in range(site.heads) if h not in dense]
    q, k, v = e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v)
    outs = []
    for heads, banded in ((dense, False), (sparse, True)):
        if not heads:
            continue
        idx = e.ints(*heads)
        sub = dataclasses.replace(site, heads=len(heads), kv_heads=len(heads))
        qkv = [e.op("Gather", [x, idx], {"axis": 1}) for x in (q, k, v)]
        if banded:
            form = Sparse(**dict(pattern, dense_heads=None)).form(site)
            outs.append(emit_banded(e, sub, form, normaliser_fn(normaliser, sub, 6), qkv=qkv))
        else:
            outs.append(emit_explicit(e, sub, normaliser_fn(normaliser, sub, 5), qkv=qkv))
    order = dense + sparse
    inverse = [order.index(h) for h in range(site.heads)]
    return e.op("Gather", [e.op("Concat", outs, {"axis": 1}) if len(outs) > 1 else outs[0], e.ints(*inverse)], {"axis": 1})


def _grid(e: SiteEdit, site: AttentionSite, pattern: dict, normaliser: dict):
    """Vision tokens: the prefix (class/register tokens) attends densely and stays visible
    to all; grid tokens attend to their kh x kw neighborhood, banded by grid row."""
    import dataclasses

    from attn_opt.backends.onnxruntime.banded import emit_banded
    from attn_opt.passes.sparse import Sparse

    site = dataclasses.replace(site, additive=(), bool_mask=None)  # mask kind "none": any term is a no-op
    form = Sparse(**pattern).form(site)
    n = form.sinks
    q, k, v = e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v)
    tail = [e.op("Slice", [x, e.ints(n), e.ints(2 ** 62), e.ints(2)]) for x in (q, k, v)]
    out = emit_banded(e, site, form, normaliser_fn(normaliser, site, 6), qkv=tail, sink_kv=(k, v))
    if not n:
        return out
    head = e.op("Slice", [q, e.ints(0), e.ints(n), e.ints(2)])
    dense = emit_explicit(e, site, normaliser_fn(normaliser, site, 5), qkv=(head, k, v))
    return e.op("Concat", [dense, out], {"axis": 2})
