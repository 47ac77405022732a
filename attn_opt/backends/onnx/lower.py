"""Lower a site's `Form` (patterns/form.py) to ONNX.

`lower(edit, form)` is the one entry: a fused op (fused.py), a gate epilogue, collapsed
weights (collapse.py), or a pattern × normaliser form. `CAPABILITIES` declares every
kind this backend lowers and the function that does it (patterns/capability.py); a kind
missing there stops with "<kind>: no onnx lowering". The last is computed banded
(banded.py: only the key blocks the pattern reaches) where that counts fewer score pairs
than dense at the site's length, else as dense scores masked to the pattern
(explicit.py); a content pattern (a Selection) gathers only its chosen key blocks
(choose.py, gathered.py); either way its output node carries the site's record (metadata
"attn_opt.form"), so detection reads it back as the site for the next pass and forms
compose on one site.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx import collapse, fused
from attn_opt.backends.onnx.banded import emit_banded
from attn_opt.backends.onnx.edit import LOW_PRECISION, SiteEdit, find_node
from attn_opt.backends.onnx.latent import emit_latent
from attn_opt.backends.onnx.explicit import (MIN, emit_explicit, f32, row_max, row_sum, safe_div,
                                             softmax_visible)
from attn_opt.backends.onnx.gathered import emit_gathered
from attn_opt.backends.onnx.stream_heads import emit_split, split_cache
from attn_opt.backends.onnx.stream_heads import limits as split_limits
from attn_opt.patterns.capability import Capabilities
from attn_opt.patterns.form import Form, Gate, Normaliser, Pattern, StreamCache, banded_pays, selection_reason
from attn_opt.patterns.record import form_record
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.graph import FORM_KEY, param_name

OPSET = {"fused": 23, "form": 18, "collapse": 18, "latent": 18}  # Attention; ReduceMax/ReduceSum with axes as an input


def opset_for(produces: str) -> int | None:
    """The opset the lowering of this kind of form needs (the model is converted up)."""
    return OPSET.get(produces)


def lower(e: SiteEdit, form: Form) -> str | None:
    """Emit `form` for `e.site` and rewire the site's output; a note for the report."""
    feature = lambda name: CAPABILITIES.implementation("feature", name)  # noqa: E731
    if form.fused:
        return feature("fused")(e, form.fused)
    if form.gate is not None:
        return feature("gate")(e, form.gate)
    if form.collapse is not None:
        return feature("collapse")(e, form.collapse)
    if form.latent is not None:
        return feature("latent")(e, form.latent)
    sink_q = None
    if form.stream is not None and form.stream.target != "own":  # a runtime's windowed op (stream_ops.py)
        from attn_opt.backends.onnx.stream_ops import emit_stream_op

        return emit_stream_op(e, form.stream, form.stream.target, feature("stream"))
    compute = None
    if form.stream is not None and form.stream.full_groups is not None:  # per-head: two caches, two parts
        parts = split_cache(SiteEdit(e.model, e.site, e.pass_name, "cache"), form.stream)
        compute = lambda: emit_split(e, parts, form.pattern, normaliser_fn, form.normaliser)  # noqa: E731
    elif form.stream is not None:  # first: the outputs keep their names, the record names the full cache
        feature("stream")(SiteEdit(e.model, e.site, e.pass_name, "cache"), form.stream)
        if form.stream.rotary is not None:
            sink_q = (form.stream.sinks, lambda q, k: cache_positioned(e, q, form.stream))
    note = emit_attention(e, e.site, form.pattern, form.normaliser, sink_q, compute)
    if form.lora:
        lora = feature("lora")(SiteEdit(e.model, e.site, e.pass_name, "lora"), form.lora)
        note = "; ".join(n for n in (note, lora) if n)
    return note


def cache_positioned(e: SiteEdit, q: ir.Value, stream: StreamCache) -> ir.Value:
    """The rotated queries [B, H, Tq, d] turned back by Δ_i = max(0, p_i − (S + W − 1))
    positions, the tokens dropped before query i (p_i its rotary position): a query then
    meets sink j at distance min(p_i, S + W − 1) − j, its index among the S + W keys it
    sees. R(−Δ) x = x·cos(Δω) − rotate_half(x)·sin(Δω) (positions=cache, patterns/rotary.py)."""
    rot = stream.rotary
    pos = e.op("Cast", [rot.positions.native], {"to": ir.DataType.FLOAT})
    pos = e.op("Reshape", [pos, e.op("Concat", [e.shape_dim(pos, 0), e.ints(-1, 1)], {"axis": 0})])  # [B, Tq, 1]
    delta = e.op("Max", [e.op("Sub", [pos, f32(e, stream.sinks + stream.window - 1)]), f32(e, 0)])
    angle = e.op("Mul", [e.op("Unsqueeze", [delta, e.ints(1)]), f32(e, rot.angles())])  # [B, 1, Tq, d]
    half = len(rot.inv_freq)
    x1 = e.op("Slice", [q, e.ints(0), e.ints(half), e.ints(-1)])
    x2 = e.op("Slice", [q, e.ints(half), e.ints(2 * half), e.ints(-1)])
    rotated_half = e.op("Concat", [e.op("Neg", [x2]), x1], {"axis": -1})
    return e.op("Sub", [e.op("Mul", [q, e.op("Cos", [angle])]), e.op("Mul", [rotated_half, e.op("Sin", [angle])])])


def emit_lora(e: SiteEdit, rank: int) -> str:
    """y = x W_o (+ b) becomes y + (x A) B after the site's output projection: A [D, r]
    (small random) and B [r, D_out] (zero, so the function is unchanged) as initializers
    attn_opt.<site>.lora_a / .lora_b, which calibration fits."""
    o = e.site.out_projection
    if o is None:
        return "no LoRA: no output projection with constant weights reads this site"
    w = o.weight.const
    d_in, d_out = (w.shape[1], w.shape[0]) if o.transposed else w.shape
    rng = np.random.default_rng(0)
    a = e.initializer("lora_a", rng.standard_normal((d_in, rank)) / np.sqrt(d_in))
    b = e.initializer("lora_b", np.zeros((rank, d_out)))
    e.epilogue = True
    y = find_node(e.model, o.node).outputs[0]
    x = o.x.native
    low = o.x.dtype in LOW_PRECISION
    if low:
        x = e.op("Cast", [x], {"to": ir.DataType.FLOAT})
    delta = e.op("MatMul", [e.op("MatMul", [x, a]), b])
    if low:
        delta = e.op("Cast", [delta], {"to": LOW_PRECISION[o.x.dtype]})
    e.commit_value(y, e.op("Add", [y, delta]))
    return f"LoRA rank {rank} on the output projection {o.node} (zero until calibrated)"


def cap_cache(e: SiteEdit, stream: StreamCache) -> None:
    """The site's present key/value outputs keep the first `sinks` positions and the last
    `window` ones (all of them while the sequence is no longer than sinks + window); the
    attention still reads the whole concatenation. (Per-head streaming: stream_heads.py.)"""
    c = e.site.cache
    for name in (c.present_key, c.present_value):
        full = next(v for v in e.graph.outputs if v.name == name)
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


def normaliser_fn(n: Normaliser, site: AttentionSite, ndim: int, heads: list[int] | None = None):
    """(edit, scores, visible) -> weights, for scores of rank `ndim` with heads as [Hkv, g].
    A calibrated normaliser reads its per-head parameters (patterns/form.py: the affine
    gain · N(temperature · S + offset) and the kind's own) from initializers calibration
    sets, attn_opt.<site>.<name>, one value per head. `heads`: the scores hold only these
    heads of the site, in order (one part of a dense-heads split, each head its own KV):
    per-head values are taken at them, a calibrated parameter gathered from the site's one
    [heads] initializer, so calibration writes every head's value in one place."""
    part = site if heads is None else dataclasses.replace(site, heads=len(heads), kv_heads=len(heads))
    own = n if heads is None else n.of_heads(heads, site.heads)
    if not n.calibrated:
        return lambda e, s, vis: _kind(e, s, vis, part, own, ndim, None)

    def calibrated(e, s, vis):
        start = n.values(site.heads)
        prm = lambda name: _param(e, site, name, start[name], ndim, heads)  # noqa: E731
        s = e.op("Where", [vis, s, f32(e, 0)])  # hidden scores (-inf) stay out of the product
        s = e.op("Add", [e.op("Mul", [s, prm("temperature")]), prm("offset")])
        return e.op("Mul", [_kind(e, s, vis, part, own, ndim, prm), prm("gain")])

    return calibrated


def _param(e: SiteEdit, site: AttentionSite, name: str, values, ndim: int, heads: list[int] | None = None):
    """The site's per-head initializer `name` ([heads]), viewed as [1, Hkv, g, 1, ...]; only
    `heads` of it (as [1, len(heads), 1, 1, ...]) where given."""
    init = e.model.graph.initializers.get(param_name(site.id, name))
    if init is None:
        init = e.initializer(name, np.asarray(values, np.float32))
    if heads is not None:
        init = e.op("Gather", [init, e.ints(*heads)], {"axis": 0})
        return e.op("Reshape", [init, e.ints(1, len(heads), 1, *([1] * (ndim - 3)))])
    shape = e.ints(1, site.kv_heads, site.heads // site.kv_heads, *([1] * (ndim - 3)))
    return e.op("Reshape", [init, shape])


def _kind(e, s, vis, site, n: Normaliser, ndim, prm):
    """The kind's formula; `prm(name)`: a calibrated per-head parameter (None: constants from `n`)."""
    return CAPABILITIES.implementation("normaliser", n.kind)(e, s, vis, site, n, ndim, prm)


def _softmax(e, s, vis, site, n: Normaliser, ndim, prm):
    return softmax_visible(e, s, vis)


def _softplus(e, s, vis, site, n: Normaliser, ndim, prm):
    if prm is not None:  # λ_i = (log n_i / log n_train)^κ_h
        cnt = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        ratio = e.op("Div", [e.op("Log", [e.op("Max", [cnt, f32(e, 2)])]), f32(e, math.log(n.n_train or 2))])
        s = e.op("Mul", [s, e.op("Pow", [ratio, prm("kappa")])])
    elif n.n_train:
        cnt = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        s = e.op("Mul", [s, e.op("Div", [e.op("Log", [e.op("Max", [cnt, f32(e, 1)])]), f32(e, math.log(n.n_train))])])
    a = e.op("Where", [vis, e.op("Softplus", [s]), f32(e, 0)])
    a = safe_div(e, a, row_sum(e, a))
    if prm is not None or n.p != 1:
        a = e.op("Where", [vis, e.op("Pow", [e.op("Max", [a, f32(e, 1e-30)]), prm("p") if prm else f32(e, n.p)]), f32(e, 0)])
        a = safe_div(e, a, row_sum(e, a))
    return a


def _logit(e, s, vis, site, n: Normaliser, ndim, prm):
    if prm:
        b = prm("bias")
    else:  # the site's weight attn_opt.<site>.sink_logit, viewed per head
        shape = e.ints(1, site.kv_heads, site.heads // site.kv_heads, *([1] * (ndim - 3)))
        b = e.op("Reshape", [e.weight("sink_logit", n.per_head_bias(site.heads)), shape])
    m = e.op("Max", [row_max(e, e.op("Where", [vis, s, f32(e, MIN)])), b])
    ex = e.op("Where", [vis, e.op("Exp", [e.op("Sub", [s, m])]), f32(e, 0)])
    return safe_div(e, ex, e.op("Add", [row_sum(e, ex), e.op("Exp", [e.op("Sub", [b, m])])]))


def _redistribute(e, s, vis, site, n: Normaliser, ndim, prm):
    alpha = prm("alpha") if prm else f32(e, n.alpha)
    p = softmax_visible(e, s, vis)
    head = e.op("Slice", [p, e.ints(0), e.ints(n.sinks), e.ints(-1)])
    tail = e.op("Slice", [p, e.ints(n.sinks), e.ints(2 ** 62), e.ints(-1)])
    m = row_sum(e, head)
    rest = e.op("Sub", [f32(e, 1), m])
    factor = safe_div(e, e.op("Sub", [f32(e, 1), e.op("Mul", [m, alpha])]), rest)
    scaled = e.op("Concat", [e.op("Mul", [head, alpha]), e.op("Mul", [tail, factor])], {"axis": -1})
    keep = e.op("Less", [rest, f32(e, 1e-6)])  # a row all on the sinks is left as it is
    if n.heads:
        chosen = np.zeros(site.heads, np.float32)
        chosen[list(n.heads)] = 1
        keep = e.op("Or", [keep, e.op("Equal", [per_head(e, site, chosen, ndim), f32(e, 0)])])
    return e.op("Where", [keep, p, scaled])


def _relu(e, s, vis, site, n: Normaliser, ndim, prm):
    return safe_div(e, e.op("Where", [vis, e.op("Relu", [s]), f32(e, 0)]), row_sum(e, e.op("Cast", [vis], {"to": 1})))


def _sigmoid(e, s, vis, site, n: Normaliser, ndim, prm):
    """σ(S + b) on visible keys; b = −log n_i where no bias is given."""
    bias = n.per_head_bias(site.heads)
    b = None if bias is None else per_head(e, site, bias, ndim)
    if b is None:
        n = row_sum(e, e.op("Cast", [vis], {"to": 1}))
        b = e.op("Neg", [e.op("Log", [e.op("Max", [n, f32(e, 1)])])])
    return e.op("Where", [vis, e.op("Sigmoid", [e.op("Add", [s, b])]), f32(e, 0)])


def emit_attention(e: SiteEdit, site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser,
                   sink_q=None, compute=None) -> str | None:
    """Emit `site` with this form, commit it, and record the form on the output node.
    `sink_q`: (sinks, q -> the queries the sink keys are scored with) for positions=cache;
    `compute`: () -> the output [B, H, Tq, Dv], where the form's own lowering gives it."""
    e.compute_in_fp32()
    note = None
    if compute is not None:
        out = compute()
        note = "each part of the heads over its own cache: the streaming groups read only their sinks + window"
    elif sink_q is not None:
        out = emit_explicit(e, site, normaliser_fn(normaliser, site, 5), pattern=pattern, sink_q=sink_q)
        note = "dense scores masked to the pattern (the sink columns are scored at cache positions)"
    elif pattern is not None:
        out, note = CAPABILITIES.implementation(pattern.table, pattern.kind)(e, site, pattern, normaliser)
    else:
        out = emit_explicit(e, site, normaliser_fn(normaliser, site, 5))
    out = e.back(out)
    out = e.op("Identity", [e.outward(out)])  # the record's carrier: its output is the site's
    out.producer().metadata_props[FORM_KEY] = form_record(site, pattern, normaliser)
    e.commit(out, folded=True)
    return note


def _sparse(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser, banded: bool, qkv=None,
            of=None):
    """`of`: (the whole site, its heads these are) where `site` is one part of a dense-heads split."""
    whole, heads = of or (site, None)
    if banded:
        return emit_banded(e, site, pattern, normaliser_fn(normaliser, whole, 6, heads), qkv=qkv)
    return emit_explicit(e, site, normaliser_fn(normaliser, whole, 5, heads), qkv=qkv, pattern=pattern)


def _windowed(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
    """A window (plain, shifted or strided): banded where that pays at the site's shape."""
    banded, note = banded_pays(site, pattern)
    return _split_heads(e, site, pattern, normaliser, banded), note


def _split_heads(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser, banded: bool):
    """The sparse heads in the pattern; `dense_heads` (masks shared by all heads there)
    through the dense form, then the heads put back in order."""
    if not pattern.dense_heads:
        return _sparse(e, site, pattern, normaliser, banded)
    dense = sorted(pattern.dense_heads)
    sparse = [h for h in range(site.heads) if h not in dense]
    q, k, v = e.bhsd(site.q), e.bhsd(site.k), e.bhsd(site.v)
    outs = []
    for heads, dense_part in ((dense, True), (sparse, False)):
        if not heads:
            continue
        idx = e.ints(*heads)
        kv_idx = e.ints(*(h * site.kv_heads // site.heads for h in heads))  # GQA: each query head's KV group
        sub = dataclasses.replace(site, heads=len(heads), kv_heads=len(heads))
        qkv = [e.op("Gather", [q, idx], {"axis": 1})] + [e.op("Gather", [x, kv_idx], {"axis": 1}) for x in (k, v)]
        if dense_part:
            outs.append(emit_explicit(e, sub, normaliser_fn(normaliser, site, 5, heads), qkv=qkv))
        else:
            outs.append(_sparse(e, sub, pattern.sparse_heads(), normaliser, banded, qkv=qkv, of=(site, heads)))
    order = dense + sparse
    inverse = [order.index(h) for h in range(site.heads)]
    return e.op("Gather", [e.op("Concat", outs, {"axis": 1}) if len(outs) > 1 else outs[0], e.ints(*inverse)], {"axis": 1})


def _topk(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
    """A content pattern (top-k, pyramid): the chosen key blocks gathered (choose.py, gathered.py)."""
    return emit_gathered(e, site, pattern, normaliser_fn(normaliser, site, 6)), banded_pays(site, pattern)[1]


def _routing(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
    """Routing: dense scores masked to the clusters (routing.py); no FLOPs saved yet."""
    return emit_explicit(e, site, normaliser_fn(normaliser, site, 5), pattern=pattern), None


def _grid(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
    """Vision tokens: the prefix (class/register tokens) attends densely and stays visible
    to all; grid tokens attend to their kh x kw neighborhood, banded by grid row."""
    return _grid_tokens(e, site, pattern, normaliser), None


def _grid_tokens(e: SiteEdit, site: AttentionSite, pattern: Pattern, normaliser: Normaliser):
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



def _limits(site: AttentionSite, form: Form) -> str | None:
    if form.stream is not None and form.stream.target != "own":
        from attn_opt.backends.onnx.stream_ops import TARGETS, op_reason

        targets = TARGETS if form.stream.target == "auto" else (form.stream.target,)
        why = [op_reason(site, form.stream, t) for t in targets]
        return None if any(w is None for w in why) else "; ".join(dict.fromkeys(why))
    if form.stream is not None and form.stream.full_groups is not None:
        return split_limits(site, form)
    return fused.limits(site, form) if form.fused else selection_reason(site, form)


CAPABILITIES = Capabilities(
    "onnx",
    normaliser={"softmax": _softmax, "softplus": _softplus, "logit": _logit, "redistribute": _redistribute,
                "relu": _relu, "sigmoid": _sigmoid},
    pattern={"window": _windowed, "shift": _windowed, "stride": _windowed, "grid": _grid},
    selection={"topk": _topk, "pyramid": _topk, "routing": _routing},
    feature={"fused": fused.emit_fused, "gate": emit_gate, "collapse": collapse.emit_collapse, "stream": cap_cache,
             "lora": emit_lora, "latent": emit_latent},
    limits=_limits)
