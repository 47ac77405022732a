"""The canonical eager attention pattern, anchored at Softmax:

    MatMul(Q, Kᵀ) → (Mul | Div | pre-scaled Q or K | none) → (Add bias/mask | Where mask)*
        → Softmax(-1) → (Cast | Dropout | NaN guard | none) → MatMul(·, V)

Each stage is a table of tagged alternatives, not one pattern per exporter. Where the
exporters differ is noted beside the alternative that covers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from attn_opt.patterns.candidate import Candidate
from attn_opt.patterns.layout import operand, weight_like
from attn_opt.patterns.site import Miss, Operand
from attn_opt.core.graph import GraphView, Node, Value

# ops that carry the scores/probabilities through unchanged
PASS = {"Cast", "Identity", "Dropout", "Contiguous"}
SCALE = {"Mul", "Div"}
MAX_STAGES = 12


def is_scalar(v: Value | None) -> bool:
    if v is None:
        return False
    if v.const is not None:
        return v.const.size == 1
    return v.shape is not None and all(d == 1 for d in v.shape)


def _scale_of(n: Node, path: Value) -> tuple[Value, bool] | None:
    """(factor, divides) when `n` multiplies/divides `path` by a scalar."""
    a, b = n.input(0), n.input(1)
    if n.op == "Div" and a is path and is_scalar(b):
        return b, True
    if n.op == "Mul" and a is path and is_scalar(b):
        return b, False
    if n.op == "Mul" and b is path and is_scalar(a):
        return a, False
    return None


def _unfolds(n: Node) -> bool:
    """A Reshape of 3-D scores [B*H, Tq, Tk] to 4-D [B, H, Tq, Tk]."""
    return n.op == "Reshape" and n.input(0) is not None and n.input(0).rank == 3 and n.outputs[0].rank == 4


def _same_view(n: Node) -> bool:
    """A Reshape that keeps the scores' rank and shape (`s.view(b, h, t, t)` on 4-D scores)."""
    if n.op != "Reshape" or n.input(0) is None or n.input(0).rank is None or n.input(0).rank != n.outputs[0].rank:
        return False
    a, b = n.input(0).shape, n.outputs[0].shape
    return a is None or b is None or all(x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(a, b))


def _qdq_source(v: Value) -> Value | None:
    """x of DequantizeLinear(QuantizeLinear(x)) (a QDQ model's activation rounding), else None."""
    dq = v.producer
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = dq.input(0).producer
    return q.input(0) if q is not None and q.op == "QuantizeLinear" else None


def _qdq_user(p: Value) -> Node | None:
    """The DequantizeLinear of QuantizeLinear(p) → DequantizeLinear, when that is p's only use."""
    users = [u for u in p.users if u.op != "Assert"]
    if len(users) != 1 or users[0].op != "QuantizeLinear":
        return None
    dq = users[0].outputs[0].users
    return dq[0] if len(dq) == 1 and dq[0].op == "DequantizeLinear" else None


# -- the score stage: from the softmax input back to Q·Kᵀ ---------------------------------
#
# One table, read top to bottom at each node: the first alternative whose `match` holds
# says what the node is (`tag`), and `step` records it on the candidate and returns the
# value to walk back to, or the product node where the walk ends. The same table answers
# "do these scores come from a Q·Kᵀ product?" (`leads_to_product`: no candidate, nothing
# recorded), which the Add and Where alternatives ask of each operand.


@dataclass(frozen=True)
class Alt:
    tag: str  # what the node is, in the pattern's words
    match: Callable[[Node, Value], Any]  # None (or False) where it does not apply, else what `step` needs
    step: Callable[[Candidate | None, Node, Value, Any], Any]  # the value to walk back to, or the product node
    seen: str = ""  # where exporters write it


def _product(c, n, v, m):
    return n


def _through(c, n, v, m):
    return n.input(0)


def _unfold(c, n, v, m):
    if c is not None:  # 3-D [B*H, Tq, Tk] scores viewed as [B, H, Tq, Tk]
        if c.unfold is not None:
            raise Miss("two reshapes of the scores before the softmax", n)
        c.unfold = n.outputs[0]
    return n.input(0)


def _qdq(c, n, v, src):
    if c is not None:
        c.covered.append(src.users[0]) if len(src.users) == 1 else None
        c.quantized = True
    return src


def _scaled(c, n, v, s):
    if c is not None:
        c.scale_factors.append(s)
    return n.input(0) if s[0] is not n.input(0) else n.input(1)


def _score_paths(candidates) -> list[Value]:
    return [x for x in candidates if x is not None and leads_to_product(x)]


def _add_term(c, n, v, m):
    """An additive mask or bias (T5 adds its position bias, then the mask)."""
    paths = _score_paths(n.inputs)
    if len(paths) != 1:
        raise Miss("an Add before the softmax has no single score operand", n)
    if c is not None:
        terms = [x for x in n.inputs if x is not paths[0]]
        _before_factor(c, n)
        c.additive.extend(terms)
        if c.unfold is not None:  # added while the scores were 3-D: heads folded into the batch
            c.folded_terms.extend(terms)
        if c.regroup_open:
            c.regrouped_terms.extend(terms)
    return paths[0]


def _before_factor(c, n):
    if c.q_factor is not None:
        raise Miss("a term added to the scores before their per-head factor (the factor would scale it)", n)


def _head_factor(n: Node, v: Value):
    """Mul(scores, t), t [.., H, 1, 1] computed from anything but the scores (Swin v2's
    exp(clamp(logit_scale)) per head): the index of t, else None."""
    if n.op != "Mul" or len(n.inputs) != 2:
        return None
    for i in (0, 1):
        t, s = n.inputs[i], n.inputs[1 - i]
        shape = t.const.shape if t is not None and t.const is not None else (t.shape if t is not None else None)
        if (shape is not None and 3 <= len(shape) <= 4 and tuple(shape[-2:]) == (1, 1)
                and all(isinstance(d, int) for d in shape) and not is_scalar(t)
                and s is not None and s.rank is not None and s.rank >= len(shape)
                and leads_to_product(s) and not leads_to_product(t)):
            return i + 1  # 1-based: 0 would read as "no match"
    return None


def _head_factored(c, n, v, at):
    t, s = n.inputs[at - 1], n.inputs[2 - at]
    if c is not None:
        if c.q_factor is not None or c.softcap is not None or c.sink is not None:
            raise Miss("a per-head score factor with another factor, a soft-cap or a sink column", n)
        c.q_factor = t
    return s


def _regroups(n: Node) -> bool:
    """A Reshape between 4-D scores and a 5-D view of them (Swin: [B·W, H, T, T] viewed as
    [B, W, H, T, T] to add the shifted-window mask per window, then viewed back)."""
    if n.op != "Reshape" or n.input(0) is None:
        return False
    return {n.input(0).rank, n.outputs[0].rank} == {4, 5}


def _regroup(c, n, v, m):
    if c is not None:
        if n.input(0).rank == 5:  # walking back: the view back to 4-D comes first
            if c.regroup_open or c.regroup_view is not None:
                raise Miss("the scores viewed at rank 5 twice before the softmax", n)
            c.regroup_open = True
        else:
            if not c.regroup_open:
                raise Miss("4-D scores viewed at rank 5 and never viewed back before the softmax", n)
            c.regroup_open, c.regroup_view = False, n.outputs[0]
    return n.input(0)


def _where_mask(c, n, v, m):
    """A boolean mask: where(cond, scores, fill) or where(cond, fill, scores)."""
    cond, x, y = n.inputs
    on_x, on_y = bool(_score_paths([x])), bool(_score_paths([y]))
    if on_x == on_y:
        raise Miss("a Where before the softmax has no single score operand", n)
    if c is not None:
        if c.regroup_open or c.q_factor is not None:
            raise Miss("a boolean mask inside a 5-D view of the scores or before their per-head factor", n)
        c.set_bool_mask(cond, keep=on_x, fill=y if on_x else x)
    return x if on_x else y


def _weight_product(c, n, v, m):
    if c is None:
        return n  # a product all the same: the miss names its weight
    w = next((i.name for i in n.inputs[1:] if i is not None and weight_like(i)), "?")
    raise Miss(f"the scores are a {n.op} with the weight {w}, not a product with keys "
               "(a projection, classifier or router)", n)


def _softcapped(c, n, v, m):
    return _softcap(c, n) if c is not None else n.input(0)


def _reduce_axes(n: Node) -> list[int] | None:
    """A Reduce*'s axes: the attribute (opset < 18) or the constant second input."""
    if "axes" in n.attrs:
        return [int(a) for a in n.attrs["axes"]]
    a = n.input(1)
    return None if a is None or a.const is None else [int(x) for x in np.asarray(a.const).reshape(-1)]


def _last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _max_shift(n: Node, v: Value):
    """Sub(x, ReduceMax(x) over the key axis): softmax's own stabiliser written out (gpt-oss)."""
    x, m = n.input(0), n.input(1)
    r = m.producer if m is not None else None
    if n.op != "Sub" or r is None or r.op != "ReduceMax" or r.input(0) is not x:
        return None
    axes = _reduce_axes(r)
    return bool(int(r.attrs.get("keepdims", 1)) and axes and len(axes) == 1 and _last_axis(axes[0], x.rank))


def _shifted(c, n, v, m):
    if c is not None:
        c.covered.append(n.input(1).producer)
    return n.input(0)


def _sink_column(n: Node, v: Value):
    """Concat([scores, sink], key axis): a learned sink logit per head as one more column."""
    if n.op != "Concat" or len(n.inputs) != 2 or not _last_axis(int(n.attrs.get("axis", 0)), n.outputs[0].rank):
        return None
    paths = [i for i, x in enumerate(n.inputs) if x is not None and leads_to_product(x)]
    return paths[0] + 1 if len(paths) == 1 else None  # 1-based: 0 would read as "no match"


def _sink(c, n, v, at):
    scores, sink = n.inputs[at - 1], n.inputs[2 - at]
    if c is not None:
        if c.sink is not None:
            raise Miss("two sink columns before the softmax", n)
        if c.additive or c.bool_mask is not None or c.scale_factors or c.softcap is not None or c.unfold is not None:
            raise Miss("scores scaled or masked after the sink column was concatenated", n)
        c.sink, c.sink_last = sink, at == 1
    return scores


def _subtracted(n: Node, v: Value):
    """Sub(scores, term): a mask applied by subtraction (XLNet's s − 1e30·mask)."""
    return n.op == "Sub" and n.input(0) is not None and leads_to_product(n.input(0)) \
        and not (n.input(1) is not None and leads_to_product(n.input(1)))


def _negated_term(c, n, v, m):
    if c is not None:
        term = n.input(1)
        _before_factor(c, n)
        c.additive.append(term)
        c.negated.append(term)
        if c.unfold is not None:
            c.folded_terms.append(term)
        if c.regroup_open:
            c.regrouped_terms.append(term)
    return n.input(0)


SCORE_STAGES = [
    Alt("product", lambda n, v: n.op in ("MatMul", "Einsum"), _product, "every exporter"),
    Alt("unfold", lambda n, v: _unfolds(n), _unfold, "bmm attention viewed as 4-D scores (BLOOM, DeBERTa)"),
    Alt("same view", lambda n, v: _same_view(n), _through, "s.view(b, h, t, t) on 4-D scores"),
    Alt("qdq", lambda n, v: _qdq_source(v), _qdq, "QDQ models round the scores to int8 between ops"),
    Alt("pass-through", lambda n, v: n.op in PASS, _through, "Cast (fp16 exports), Dropout, Identity"),
    Alt("scale", lambda n, v: n.op in SCALE and (_scale_of(n, n.input(0)) or _scale_of(n, n.input(1))), _scaled,
        "Mul by 1/√d (dynamo), Div by √d (TorchScript's Pow/Div)"),
    Alt("head factor", _head_factor, _head_factored, "scores times exp(clamp(logit_scale)) per head (Swin v2)"),
    Alt("additive term", lambda n, v: n.op == "Add", _add_term, "masks, ALiBi, relative-position biases"),
    Alt("regroup", lambda n, v: _regroups(n), _regroup, "view → add the shifted-window mask → view (Swin)"),
    Alt("boolean mask", lambda n, v: n.op == "Where", _where_mask, "masked_fill (TorchScript), aten.where"),
    Alt("weight product", lambda n, v: n.op in ("Gemm", "Linear", "Conv"), _weight_product,
        "a projection, classifier or router softmax"),
    Alt("soft-cap", lambda n, v: n.op == "Tanh", _softcapped, "c·tanh(S/c) (Gemma 2, Grok)"),
    Alt("max shift", _max_shift, _shifted, "S − max(S) written out before the softmax (gpt-oss)"),
    Alt("sink column", _sink_column, _sink, "cat([S, sinks], -1), the column sliced off before ·V (gpt-oss)"),
    Alt("subtracted term", _subtracted, _negated_term, "s − 1e30·mask (XLNet), s − INF·(1 − mask) (Funnel)"),
]


def walk_scores(c: Candidate | None, v: Value, budget: int = MAX_STAGES) -> Node:
    """From the softmax input back to the Q·Kᵀ product through `SCORE_STAGES`, recording
    scale, masks and terms on `c` (None: only find the product)."""
    for _ in range(budget):
        n = v.producer
        if n is None:
            raise Miss("the softmax input is a graph input, not computed scores")
        for alt in SCORE_STAGES:
            m = alt.match(n, v)
            if m is None or m is False:
                continue
            if c is not None and alt.tag != "product":
                c.covered.append(n)
            nxt = alt.step(c, n, v, m)
            if isinstance(nxt, Node):
                return nxt
            v = nxt
            break
        else:
            raise Miss(f"the scores come from {n.op}, not from a Q·Kᵀ MatMul", n)
    raise Miss(f"more than {budget} ops between Q·Kᵀ and the softmax")


def leads_to_product(v: Value) -> bool:
    """Whether `v` is computed from a Q·Kᵀ product (or a weight product) through score ops."""
    try:
        walk_scores(None, v)
        return True
    except Miss:
        return False


def _softcap(c: Candidate, tanh: Node) -> Value:
    """Record c of c·tanh(S/c): the scale factors met after the Tanh (walking back) are its
    c_out, the scalar division right before it is its 1/c_in; they must agree. Returns S."""
    if c.softcap is not None:
        raise Miss("two Tanh soft-caps before the softmax", tanh)
    after, c.scale_factors = c.scale_factors, []
    pre = tanh.input(0).producer
    s = _scale_of(pre, pre.input(0)) if pre is not None and pre.op in SCALE else None
    if s is None or any(f.const is None for f, _ in after) or s[0].const is None:
        raise Miss("a Tanh before the softmax that is not a constant soft-cap c·tanh(S/c)", tanh)
    c_out = scale_value(after, {})
    c_in = float(np.asarray(s[0].const).reshape(-1)[0])
    c_in = c_in if s[1] else 1.0 / c_in
    if not np.isclose(c_out, c_in, rtol=1e-6) or c_out <= 0:
        raise Miss(f"a Tanh before the softmax with caps {c_in:g} in and {c_out:g} out, not c·tanh(S/c)", tanh)
    c.softcap = float(c_out)
    c.covered.append(pre)
    return pre.input(0)


def _strip_scale(c: Candidate, v: Value) -> Value:
    """Q or K pre-scaled by a scalar (torch's SDPA decomposition scales both by d^-1/4)."""
    while v.producer is not None and v.producer.op in SCALE and len(v.users) == 1:
        s = _scale_of(v.producer, v.producer.input(0)) or _scale_of(v.producer, v.producer.input(1))
        if s is None:
            break
        c.scale_factors.append(s)
        c.covered.append(v.producer)
        v = v.producer.input(0) if s[0] is not v.producer.input(0) else v.producer.input(1)
    return v


# -- the probability stage: from the softmax output forward to the product with V ---------
#
# The same shape of table: `match(c, p, users)` looks at the uses of the probabilities `p`
# (Assert metadata checks left out), `step` records what it found and returns the value
# to walk on to, or the MatMul/Einsum with V where the walk ends.


@dataclass(frozen=True)
class ProbAlt:
    tag: str
    match: Callable[[Candidate, Value, list], Any]
    step: Callable[[Candidate, Value, list, Any], Any]
    seen: str = ""


def _nan_guard(c, p, users):
    isnan = [u for u in users if u.op == "IsNaN"]
    guards = [u for u in users if u.op == "Where" and isnan and u.input(0) is isnan[0].outputs[0]]
    return (isnan[0], guards[0]) if guards else None


def _guarded(c, p, users, m):
    c.covered += list(m)
    c.probs_shared |= len(users) > 2
    return m[1].outputs[0]


def _qdq_probs(c, p, users):
    return _qdq_user(p)


def _dequantized(c, p, users, dq):
    c.covered += [p.users[0], dq]
    c.quantized = True
    return dq.outputs[0]


def _drops_sink(u: Node, last: bool) -> bool:
    """Slice(p, 0, -1) (sink last) or Slice(p, 1, end) (sink first) on the key axis, step 1."""
    if u.op != "Slice" or len(u.inputs) < 4:
        return False
    cs = [None if x is None or x.const is None else np.asarray(x.const).reshape(-1).tolist() for x in u.inputs[1:5]]
    starts, ends, axes = cs[0], cs[1], cs[2]
    steps = cs[3] if len(cs) > 3 and u.input(4) is not None else [1]
    if None in (starts, ends, axes, steps) or len(axes) != 1 or steps != [1] or not _last_axis(axes[0], u.input(0).rank):
        return False
    return (starts, ends) == ([0], [-1]) if last else (starts == [1] and ends[0] >= 2 ** 31 - 1)


def _sink_cut(c, p, users):
    if c.sink is None or c.sink_cut:
        return None
    cuts = [u for u in users if _drops_sink(u, c.sink_last)]
    return cuts[0] if len(cuts) == 1 and len([u for u in users if u.op not in ("Shape", "Size")]) == 1 else None


def _cut(c, p, users, sl):
    c.covered.append(sl)
    c.sink_cut = True
    c.probs = sl.outputs[0]  # the weights on the keys; the sink's share is what they lack
    return sl.outputs[0]


def _is_zero(v: Value | None) -> bool:
    return v is not None and v.const is not None and v.const.size == 1 and float(np.asarray(v.const).reshape(-1)[0]) == 0


def _masked_after(c, p, users):
    """where(cond, 0, p) / where(cond, p, 0): DeBERTa's XSoftmax (SEW-D) zeroes the hidden keys
    again after the softmax; with the same boolean mask before it, that changes only the rows
    it hides completely (zeros, not uniform weights)."""
    ws = [u for u in users if u.op == "Where" and u.input(0) is not p and p in (u.input(1), u.input(2))]
    if len(ws) != 1 or len([u for u in users if u.op not in ("Shape", "Size")]) != 1:
        return None
    w = ws[0]
    zeroes_true = w.input(2) is p  # where(cond, 0, p): cond marks the hidden keys
    if not _is_zero(w.input(1) if zeroes_true else w.input(2)):
        return None
    return w, zeroes_true


def _uncast(v: Value) -> Value:
    """The value a condition is cast from (TorchScript casts each use of a mask to bool)."""
    while v.producer is not None and v.producer.op in ("Cast", "Identity"):
        v = v.producer.input(0)
    return v


def _zeroed(c, p, users, m):
    w, zeroes_true = m
    if c.bool_mask is None or _uncast(w.input(0)) is not _uncast(c.bool_mask) or c.bool_keep == zeroes_true:
        raise Miss("the probabilities are masked after the softmax by a mask not applied before it "
                   "(its rows are not renormalised)", w)
    c.covered.append(w)
    c.zero_rows = True
    return w.outputs[0]


def _fold_back(c, p, users):
    folds = [u for u in users if u.op == "Reshape" and p.rank == 4 and u.outputs[0].rank == 3]
    data_users = [u for u in users if u.op not in ("Shape", "Size")]  # TorchScript reads shapes too
    return folds[0] if c.unfold is not None and len(data_users) == 1 and folds else None


def _covered_step(c, p, users, n):
    c.covered.append(n)
    return n.outputs[0]


def _pv_product(c, p, users):
    matmuls = [u for u in users if u.op in ("MatMul", "Einsum") and u.input(0) is p]
    return matmuls[0] if len(matmuls) == 1 else None


def _ends(c, p, users, mm):
    if c.sink is not None and not c.sink_cut:
        raise Miss("the sink column reaches the product with V (it is not sliced off)", mm)
    c.probs_shared |= len(users) > 1
    return mm


def _pass_through(c, p, users):
    passes = [u for u in users if u.op in PASS]
    return passes[0] if len(passes) == 1 else None


def _passed(c, p, users, n):
    c.probs_shared |= len(users) > 1
    return _covered_step(c, p, users, n)


PROB_STAGES = [
    ProbAlt("nan guard", _nan_guard, _guarded, "torch's SDPA decomposition: where(isnan(p), 0, p)"),
    ProbAlt("qdq", _qdq_probs, _dequantized, "QDQ models round the probabilities to int8"),
    ProbAlt("sink cut", _sink_cut, _cut, "p[..., :-1]: the sink column dropped before ·V (gpt-oss)"),
    ProbAlt("masked after", _masked_after, _zeroed, "masked_fill(softmax(s), ~mask, 0): XSoftmax (DeBERTa, SEW-D)"),
    ProbAlt("fold back", _fold_back, _covered_step, "back to [B*H, Tq, Tk] for the bmm with V"),
    ProbAlt("product with V", _pv_product, _ends, "every exporter"),
    ProbAlt("pass-through", _pass_through, _passed, "Cast (fp16 exports), Dropout, Identity"),
]


def _walk_probs(c: Candidate, p: Value) -> Node:
    """From the Softmax output forward to the MatMul with V through `PROB_STAGES`."""
    c.probs = p
    for _ in range(MAX_STAGES):
        users = [u for u in p.users if u.op != "Assert"]  # torch.export's metadata checks are not uses
        for alt in PROB_STAGES:
            m = alt.match(c, p, users)
            if m is None:
                continue
            nxt = alt.step(c, p, users, m)
            if isinstance(nxt, Node):
                return nxt
            p = nxt
            break
        else:
            if not users:
                raise Miss("the probabilities are not used")
            raise Miss("the probabilities are not multiplied by values (used by "
                       + ", ".join(sorted({u.op for u in users})) + ")", *users)
    raise Miss("more than 12 ops between the softmax and the MatMul with V")


def _einsum_terms(n: Node) -> tuple[str, str, str]:
    eq = str(n.attrs.get("equation", "")).replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or len(out) not in (4, 5) or any(len(t) != len(out) for t in terms):
        raise Miss(f"einsum {eq!r} is not a 4-D batched product (or 5-D with a stream axis)", n)
    return terms[0], terms[1], out


def _einsum_v(n: Node) -> Operand:
    """V of einsum("bhqk,bhkd->bhqd", P, V), with its layout."""
    pt, vt, out = _einsum_terms(n)
    *bh, i, d = out  # b, h or b, n, h (ProphetNet's streams)
    ks = (set(pt) & set(vt)) - set(out)
    if len(ks) != 1 or pt.index(i) != len(out) - 2:
        raise Miss(f"einsum {pt},{vt}->{out} is not P·V", n)
    (k,) = ks
    return Operand(n.input(1), tuple(vt.index(x) for x in (*bh, k, d)))


def _einsum_operands(n: Node) -> tuple[Operand, Operand]:
    qt, kt, out = _einsum_terms(n)
    *bh, i, j = out  # b, h or b, n, h: `bnhtc,bnhsc->bnhts` attends N streams at once (ProphetNet)
    d = (set(qt) & set(kt)) - set(out)
    if len(d) != 1 or j in qt or i in kt:
        raise Miss(f"einsum {qt},{kt}->{out} is not a batched Q·Kᵀ", n)
    (d,) = d
    q_perm = tuple(qt.index(x) for x in (*bh, i, d))
    k_perm = tuple(kt.index(x) for x in (*bh, j, d))
    return Operand(n.input(0), q_perm), Operand(n.input(1), k_perm)


def _flattened(sm: Node) -> tuple[Value, Value, list[Node]] | None:
    """Flatten(axis=r-1) → Softmax → Reshape: ONNX's version converter keeps an opset-11
    softmax over the last axis this way when it moves a model to opset 13+.
    (scores, probabilities, the two wrapping nodes), or None."""
    fl, users = sm.input(0).producer, sm.outputs[0].users
    if fl is None or fl.op != "Flatten" or len(users) != 1 or users[0].op != "Reshape":
        return None
    x = fl.input(0)
    if x.rank is None or int(fl.attrs.get("axis", 1)) not in (x.rank - 1, -1):
        return None
    return x, users[0].outputs[0], [fl, users[0]]


def match_eager(gv: GraphView, sm: Node) -> Candidate:
    x, probs, wrap = sm.input(0), sm.outputs[0], []
    if (flat := _flattened(sm)) is not None:
        x, probs, wrap = flat
    axis = int(sm.attrs.get("axis", -1))
    if not wrap and x.rank is not None and axis not in (-1, x.rank - 1):
        raise Miss(f"softmax over axis {axis}, not the key axis", sm)
    c = Candidate(rule="eager", anchor=sm)
    c.covered += wrap
    qk = walk_scores(c, x)
    if any(weight_like(i) for i in qk.inputs if i is not None):
        w = next(i for i in qk.inputs if i is not None and weight_like(i))
        raise Miss(f"the scores are a MatMul with the weight {w.name}, not with keys "
                   "(a projection or classifier, not attention)", qk, sm)
    pv = _walk_probs(c, probs)
    v_in = pv.input(1)
    if v_in is None or weight_like(v_in):
        raise Miss("the probabilities are multiplied by a weight, not by values", pv)
    c.covered += [qk, sm, pv]
    c.scores = qk.outputs[0]
    if qk.op == "Einsum":
        c.q, c.k = _einsum_operands(qk)
    else:
        c.q = operand(_strip_scale(c, qk.input(0)), transposed=False)
        c.k = operand(_strip_scale(c, qk.input(1)), transposed=True)
    c.v = _einsum_v(pv) if pv.op == "Einsum" else operand(v_in, transposed=False)
    if c.regroup_open:
        raise Miss("the scores are viewed back to 4-D but never viewed at rank 5 before the product", sm)
    if c.unfold is not None and any(x.value.rank != 3 for x in (c.q, c.k, c.v)):
        raise Miss("scores reshaped to 4-D from a product whose operands are not 3-D", sm)
    c.output = pv.outputs[0]
    c.scope = sm.scope or qk.scope
    if c.unfold is None and c.output.rank == 3:
        c.out_view = _output_view(c.output)
    return c


def _output_view(out: Value) -> Value | None:
    """The one reshape that unfolds a 3-D output to rank 4 or more (SAM's
    `(p @ v).reshape(b·windows, H, h, w, D)`): where heads folded into the batch show
    when the scores are never viewed as 4-D."""
    views = [u.outputs[0] for u in out.users if u.op == "Reshape" and (u.outputs[0].rank or 0) >= 4]
    return views[0] if len(views) == 1 else None


def scale_value(factors, probed) -> float:
    s = 1.0
    for f, divides in factors:
        val = f.const if f.const is not None else probed.get(f.name)
        val = float(np.asarray(val).reshape(-1)[0])
        s = s / val if divides else s * val
    return s
