"""Detection: run the attention rules, probe the shapes and masks they need in one run
of the model on sample inputs, and turn candidates into `AttentionSite` records."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from attn_opt.patterns import eager, fused, projections
from attn_opt.patterns.cache import cache_of
from attn_opt.patterns.candidate import Candidate
from attn_opt.patterns.form import Normaliser
from attn_opt.patterns.layout import unexpanded
from attn_opt.patterns.reference import regrouped
from attn_opt.patterns.site import MASKED, AttentionSite, Miss, NearMiss, Operand
from attn_opt.core.errors import first_line
from attn_opt.core.graph import SITE_TAG, GraphView, Value, layer_of
from attn_opt.core.rules import Rule, run_rules


# The rule set, read top to bottom. Fused forms first: they are exact matches.
RULES = [
    Rule("sdpa", frozenset({"SDPA"}), fused.match_sdpa, "torch scaled_dot_product_attention call"),
    Rule("torch-mha", frozenset({"TorchMHA"}), fused.match_torch_mha, "nn.MultiheadAttention"),
    Rule("onnx-attention", frozenset({"Attention"}), fused.match_onnx_attention, "ONNX Attention op (opset 23+)"),
    Rule("ms-mha", frozenset({"com.microsoft.MultiHeadAttention"}), fused.match_ms_mha, "ORT MultiHeadAttention"),
    Rule("ms-gqa", frozenset({"com.microsoft.GroupQueryAttention"}), fused.match_ms_gqa, "ORT GroupQueryAttention"),
    Rule("ms-attention", frozenset({"com.microsoft.Attention"}), fused.match_ms_attention, "ORT Attention (packed QKV)"),
    Rule("attn-opt", frozenset({"attn_opt.Attention"}), fused.match_attn_opt, "attention attn-opt rewrote (its form record)"),
    Rule("eager", frozenset({"Softmax"}), eager.match_eager, "MatMul → scale → mask → Softmax → MatMul"),
    Rule("quantized-softmax", frozenset({"com.microsoft.QLinearSoftmax"}), fused.quantized_softmax,
         "a QOperator softmax: said why it is not rewritten"),
    Rule("torch-leaf", frozenset(f"module:{m}" for m in fused.OPAQUE_MODULES), fused.opaque_module,
         "torch.nn transformer modules that symbolic_trace keeps as leaves"),
]



@dataclass
class Detection:
    sites: list[AttentionSite]
    near_misses: list[NearMiss]
    counts: dict[str, int]
    probe_error: str | None = None
    feeds: dict[str, np.ndarray] = field(default_factory=dict)


def detect(gv: GraphView, feeds: dict[str, np.ndarray] | None = None, probe: bool = True) -> Detection:
    found = match(gv)
    probed, err = {}, None
    if probe and found.candidates:
        probed, err, feeds = _probe(gv, needed(found), feeds)
    return found.finish(gv, probed, err, feeds)


@dataclass
class Matched:
    """What the rules found before anything ran: candidates and near misses."""

    candidates: list[Candidate]
    near_misses: list[NearMiss]
    counts: dict[str, int]

    def finish(self, gv: GraphView, probed: dict, err: str | None = None, feeds=None) -> Detection:
        """Sites from the candidates, with shapes and masks read from the probed values; a
        site inside a region (a function body, a branch, a loop body) is numbered within it
        and says where it is (patterns/regions.py)."""
        from attn_opt.patterns.regions import finish_in_region, region_of

        sites, index = [], {}
        for c in self.candidates:
            path = region_of(c)
            i = index[path] = index.get(path, -1) + 1
            if not path:
                sites.append(_finalize(gv, c, i, probed, err))
                continue
            info = gv.regions.get(path)
            why = err or (info.error if info is not None else None)
            site = _finalize(gv, c, i, probed, why, "it was not run alone" if why and not err else None)
            sites.append(finish_in_region(gv, c, site, feeds, lambda p: _finalize(gv, c, i, p, None)))
        return Detection(sites, self.near_misses, self.counts, err, feeds or {})


def match(gv: GraphView) -> Matched:
    """Run the rules (no model run): the candidates and why each other softmax is not one."""
    res = run_rules(gv, RULES, Miss, skip=lambda n: n.op == "Softmax" and SITE_TAG in n.meta)
    cands = []
    for rule, node, c in res.matches:
        for op in ("k", "v"):  # see through repeat_kv: the op can take the kv heads as they are
            src = unexpanded(getattr(c, op))
            if src is not None:
                setattr(c, op, src)
            c.expanded_kv |= getattr(c, op).repeated
        cands.append(c)
    misses = [NearMiss(e.reason, e.nodes or (node.name,), rule.name) for rule, node, e in res.misses]
    return Matched(cands, misses, dict(res.counts))


def needed(found: Matched) -> list[Value]:
    """The values detection reads from a run of the model."""
    return _needed(found.candidates)


def _probe(gv: GraphView, values: list[Value], feeds):
    """Run once on sample inputs; if the model rejects batch 2, retry at batch 1 (the
    opset-23 export of rotary embeddings only runs at the batch it was traced with)."""
    attempts = [feeds] if feeds is not None else [None, 1]
    err = None
    for attempt in attempts:
        try:
            if attempt is None or isinstance(attempt, int):
                f = gv.sample_inputs()
                f = f if attempt is None else {k: a[:1] if a.ndim else a for k, a in f.items()}  # a scalar stays
            else:
                f = attempt
            return gv.probe(values, f), None, f
        except Exception as e:  # the sites stay, with what static shapes say
            err = first_line(e)
    return {}, err, feeds


def _input_dependent(v: Value, depth: int = 64) -> bool:
    """Whether `v` depends on graph-input data (not only on input shapes)."""
    stack, seen = [v], set()
    while stack and depth > 0:
        x = stack.pop()
        if x.is_input:
            return True
        n = x.producer
        if n is None or id(n) in seen or n.op in ("Shape", "Size", "ConstantOfShape"):
            continue
        seen.add(id(n))
        depth -= 1
        stack.extend(i for i in n.inputs if i is not None and i.const is None)
    return depth <= 0


def _needed(cands: list[Candidate]) -> list[Value]:
    vals = []
    for c in cands:
        vals += [c.q.value, c.k.value, c.v.value]
        vals += [f for f, _ in c.scale_factors if f.const is None]
        vals += [a for a in c.additive if a.const is None]
        if c.bool_mask is not None and c.bool_mask.const is None:
            vals.append(c.bool_mask)
        if c.unfold is not None:
            vals.append(c.unfold)
        if c.out_view is not None:
            vals.append(c.out_view)
        if c.regroup_view is not None:
            vals.append(c.regroup_view)
        if c.q_factor is not None and c.q_factor.const is None:
            vals.append(c.q_factor)
        if c.sink is not None and c.sink.const is None:
            vals.append(c.sink)
    return vals


def _arr(v: Value | None, probed: dict) -> np.ndarray | None:
    if v is None:
        return None
    if v.name in probed:  # a term viewed per head or per window is probed under its own name
        return probed[v.name]
    return v.const


def _bhsd(op: Operand, probed: dict, static: bool = False) -> tuple | None:
    """[B, H, S, D] of an operand, from the probe run (or static shapes)."""
    if static:
        shape = op.value.shape
    else:
        a = _arr(op.value, probed)
        shape = None if a is None else a.shape
    if shape is None or op.packed:
        return shape
    shape = tuple(shape[p] for p in op.perm) if op.perm else tuple(shape)
    if op.fold and len(shape) == 3 and isinstance(shape[0], int):  # [B*H, S, D] -> [B, H, S, D]
        return (shape[0] // op.fold, op.fold) + shape[1:]
    if op.streams and len(shape) == 5 and isinstance(shape[0], int):  # [B, N, H, S, D] -> [B*N, H, S, D]
        return (shape[0] * shape[1],) + shape[2:]
    return shape


def _streams(c: Candidate, probed: dict) -> int | None:
    """N of a 5-D product `bnhtc,bnhsc->bnhts` (ProphetNet's predict streams): the stream
    axis, merged into the batch; its 5-D terms are broadcast over it the same way."""
    if c.q.perm is None or len(c.q.perm) != 5:
        return None
    a = _arr(c.q.value, probed)
    shape = a.shape if a is not None else _static_ints(c.q.value.shape)
    if shape is None:
        return None
    n = int(shape[c.q.perm[1]])
    c.q, c.k, c.v = (dataclasses.replace(x, streams=n) for x in (c.q, c.k, c.v))
    c.regrouped_terms = [t for t in c.additive if _rank(t, probed) == 5]
    c.regroup = n
    return n


def _fold(c: Candidate, probed: dict) -> int | None:
    """Heads of eager attention written as 3-D batched products ([B*H, S, D]): from the
    4-D view of its scores, else 1 (a batch of single-head attentions)."""
    if c.rule != "eager" or c.q.packed or c.q.value.rank != 3:
        return None
    if c.unfold is not None:
        a = _arr(c.unfold, probed)
        shape = a.shape if a is not None else c.unfold.shape
        return int(shape[1]) if shape is not None and isinstance(shape[1], int) else None
    return _fold_from_output(c, probed) or 1


def _fold_from_output(c: Candidate, probed: dict) -> int | None:
    """Heads read from the reshape that unfolds the 3-D output [N, Tq, Dv] to
    [N/H, H, ...] (SAM: batch, windows and heads in one axis, the scores never 4-D):
    H where the view splits N and keeps the rest's size, else None."""
    if c.out_view is None:
        return None
    view, q = _arr(c.out_view, probed), _arr(c.q.value, probed)
    vs = view.shape if view is not None else _static_ints(c.out_view.shape)
    qs = q.shape if q is not None else _static_ints(c.q.value.shape)
    os_ = _static_ints(c.output.shape)
    if vs is None or qs is None or len(qs) != 3:
        return None
    n, h = int(qs[0]), int(vs[1])
    rest = int(np.prod(vs[2:]))
    if h > 1 and int(vs[0]) * h == n and (os_ is None or rest == int(os_[1]) * int(os_[2])):
        c.folded_terms = [a for a in c.additive if _rank(a, probed) == 3]
        return h
    return None


def _regroup_terms(c: Candidate, probed: dict) -> tuple[int | None, dict, str | None]:
    """W of a [B/W, W, H, Tq, Tk] view of 4-D scores [B, H, Tq, Tk] that terms were added
    to (Swin's shifted-window mask), the probed values with those terms as 4-D terms, and
    why no pass may rewrite the site where the view is not that split of the batch axis."""
    if (c.regroup_view is None and not c.regroup) or not c.regrouped_terms:
        return None, probed, None  # a view with nothing added in it changes nothing
    q = _arr(c.q.value, probed)
    qs = q.shape if q is not None else _static_ints(c.q.value.shape)
    qs = tuple(qs[p] for p in c.q.perm) if qs is not None and c.q.perm else qs
    if qs is not None and c.q.streams and len(qs) == 5:
        qs = (qs[0] * qs[1],) + tuple(qs[2:])
    if c.regroup_view is None:  # a rewritten site: its record says W
        vs = (int(qs[0]) // c.regroup, c.regroup, int(qs[1])) if qs is not None and len(qs) == 4 else None
    else:
        view = _arr(c.regroup_view, probed)
        vs = view.shape if view is not None else _static_ints(c.regroup_view.shape)
    if vs is None or qs is None or len(qs) != 4 or int(vs[0]) * int(vs[1]) != int(qs[0]) or int(vs[2]) != int(qs[1]):
        return None, probed, (f"its scores are viewed as {vs}, not as [B/W, W, H, Tq, Tk] of its batch: "
                              "the terms added in that view cannot be placed")
    w, out = int(vs[1]), dict(probed)
    for t in c.regrouped_terms:
        a = _arr(t, probed)
        if a is not None:
            out[t.name] = regrouped(a, w, int(qs[0]))
    return w, out, None


def _rank(v: Value, probed: dict) -> int | None:
    a = _arr(v, probed)
    return a.ndim if a is not None else v.rank


def _unfold_terms(c: Candidate, probed: dict, h: int | None) -> dict:
    """Probed values with the terms added to 3-D scores viewed as [B, H, ·, ·]."""
    if not c.folded_terms or not h:
        return probed
    out = dict(probed)
    for t in c.folded_terms:
        a = _arr(t, probed)
        if a is not None and a.ndim == 3:
            out[t.name] = a.reshape((-1, h) + a.shape[1:])
    return out


def _masked(c: Candidate, probed: dict) -> tuple[np.ndarray | None, bool]:
    """Which (b, h, i, j) the mask hides, and whether any unhidden term is non-zero."""
    hidden, bias = None, False
    if c.additive:
        terms = [_arr(a, probed) for a in c.additive]
        if any(t is None for t in terms):
            return None, False
        total = sum(np.asarray(t, dtype=np.float64) * (-1 if any(a is x for x in c.negated) else 1)
                    for a, t in zip(c.additive, terms))
        hidden = total <= MASKED
        bias = bool(np.any((total != 0) & ~hidden))
    if c.bool_mask is not None:
        cond = _arr(c.bool_mask, probed)
        if cond is None:
            return None, bias
        b = ~cond.astype(bool) if c.bool_keep else cond.astype(bool)
        hidden = b if hidden is None else (hidden | b)
    return hidden, bias


def _causal_pattern(hidden: np.ndarray, tq: int, tk: int) -> bool:
    """Whether batch row 0 (never padded in sample inputs) hides exactly the future keys."""
    if hidden.ndim < 2 or tq < 2:
        return False
    h = np.broadcast_to(hidden, hidden.shape[:-2] + (tq, tk))
    row0 = h.reshape((-1,) + h.shape[-3:])[0] if h.ndim >= 3 else h
    return bool(np.all(row0 == np.triu(np.ones((tq, tk), dtype=bool), 1 + tk - tq)))


def _causal_window(hidden: np.ndarray, tq: int, tk: int) -> int | None:
    """W when batch row 0 sees exactly the W most recent keys up to its own (a causal
    sliding window, Gemma 2/3, Mistral), else None."""
    if hidden.ndim < 2 or tq < 2:
        return None
    h = np.broadcast_to(hidden, hidden.shape[:-2] + (tq, tk))
    row0 = h.reshape((-1,) + h.shape[-3:])[0]
    seen = ~row0
    w = int(seen.sum(-1).max())
    i = np.arange(tq)[:, None] + (tk - tq)
    j = np.arange(tk)[None, :]
    band = (j <= i) & (j > i - w)
    return w if 0 < w < tk and np.all(seen == band) else None  # a row that sees nothing is no window


def _static_ints(shape: tuple | None) -> tuple | None:
    return shape if shape is not None and all(isinstance(d, int) for d in shape) else None


def _length(op: Operand, shape: tuple | None, seq_first: bool) -> int | None:
    if shape is None:
        return None
    if op.packed and len(shape) == 3:
        return int(shape[0] if seq_first else shape[1])
    return int(shape[-2]) if len(shape) == 4 else None


def _finalize(gv: GraphView, c: Candidate, index: int, probed: dict, err: str | None,
              unrun: str | None = None) -> AttentionSite:
    notes = list(c.notes)
    if c.quantized:
        notes.append("its scores/probabilities are quantized (QDQ) inside; a rewrite computes them in float")
    fold = _fold(c, probed) or c.q.fold  # a rewritten site's record says it
    if fold:
        c.q, c.k, c.v = (dataclasses.replace(x, fold=fold) for x in (c.q, c.k, c.v))
        probed = _unfold_terms(c, probed, fold)
        if c.rule == "eager":
            seen = " (read from the reshape that unfolds the output)" if c.unfold is None and fold > 1 else ""
            notes.append(f"heads folded into the batch (3-D products): {fold} head(s){seen}")
    if c.q_factor is not None:
        c.q = dataclasses.replace(c.q, factor=c.q_factor)
        notes.append("a per-head factor multiplies its scores (cosine attention's learned temperature): "
                     "folded into Q")
    if (n := _streams(c, probed)) is not None:
        notes.append(f"{n} attention streams in one 5-D product, the stream axis merged into the batch")
    windows, probed, blocked_view = _regroup_terms(c, probed)
    qs, ks = _bhsd(c.q, {}, static=True), _bhsd(c.k, {}, static=True)
    q, k = _bhsd(c.q, probed) or _static_ints(qs), _bhsd(c.k, probed) or _static_ints(ks)
    heads, kv_heads, head_dim = c.heads_attr, c.kv_heads_attr, None
    if q is not None and not c.q.packed and len(q) == 4:
        heads, head_dim = heads or int(q[1]), int(q[3])
    elif q is not None and c.q.packed and heads:
        head_dim = int(q[-1]) // heads
    if k is not None and not c.k.packed and len(k) == 4:
        kv_heads = kv_heads or int(k[1])
    kv_heads = kv_heads or heads
    tq, tk = _length(c.q, q, c.seq_first), _length(c.k, k, c.seq_first)

    def static_len(s):
        return s[-2] if s is not None and len(s) == 4 and isinstance(s[-2], int) else None

    if c.scale is not None:
        scale = c.scale
    elif c.rule == "eager":
        try:
            scale = eager.scale_value(c.scale_factors, probed)
        except (TypeError, IndexError, ValueError):
            scale = None
    else:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else None

    hidden, bias = _masked(c, probed) if probed or not (c.additive or c.bool_mask) else (None, False)
    causal, window = c.causal_attr, None
    # a mask wider than the keys (GroupQueryAttention's window-sized cache reads the columns of
    # the positions it holds out of a past + new mask) says nothing about the pattern by shape
    if hidden is not None and tq and tk and hidden.shape[-1] in (1, tk):
        is_causal = _causal_pattern(hidden, tq, tk)
        causal = causal or is_causal
        if not causal and (window := _causal_window(hidden, tq, tk)) is not None:
            notes.append(f"causal with a sliding window of {window} keys (read from its mask)")
    has_mask = bool(c.additive or c.bool_mask is not None)
    terms = list(c.additive) + ([c.bool_mask] if c.bool_mask is not None else [])
    if (has_mask and hidden is not None and not hidden.any() and not bias
            and not any(_input_dependent(t) for t in terms)):
        has_mask = False  # a mask built from shapes alone that hides nothing (ViT's exports)
        notes.append("its mask hides no key and depends on no input: treated as no mask")
    if not has_mask:
        mask = "causal" if c.causal_attr else "none"
    elif hidden is not None and causal and not bias and not any(_input_dependent(t) for t in terms):
        mask = "causal"
    else:
        mask = "boolean" if c.bool_mask is not None and not c.additive else "additive"
    causal = causal or window is not None  # after the mask kind: a window is a mask, not is_causal
    if err:
        notes.append(f"shapes from static inference only: {unrun or 'the model did not run'} ({err})")
        causal = causal if (c.causal_attr or hidden is not None) else None

    projs = {}
    for name, op in (("q", c.q), ("k", c.k), ("v", c.v)):
        p = projections.feeding(op.value)
        if p is not None:
            projs[name] = p
    o = projections.reading(c.output)
    if o is not None:
        projs["o"] = o
    src_q, src_k = projections.hidden_sources(c.q.value), projections.hidden_sources(c.k.value)
    if src_q and src_k:  # where K comes from decides, whatever lies between (rotary, Split, quantization)
        kind = "self" if src_q.keys() & src_k.keys() else "cross"
        if kind == "cross" and projections.root_sources(c.q.value).keys() & projections.root_sources(c.k.value).keys():
            kind = "self"  # through low-rank factors and norms (MLA), or keys reduced by a strided map (SegFormer)
            notes.append("self-attention through a compressed view of its hidden states (a low-rank factor and "
                         "norm, or a strided reduction)")
    elif "q" in projs and "k" in projs:
        kind = "self" if projs["q"].x is projs["k"].x else "cross"
    elif c.q.value is c.k.value:
        kind = "self"
    else:
        lq, lk = (qs[-2] if qs and len(qs) == 4 else None), (ks[-2] if ks and len(ks) == 4 else None)
        kind = "cross" if (lq is not None and lk is not None and lq != lk) or (tq and tk and tq != tk) else "self"
    normaliser, blocked = c.normaliser, blocked_view
    if c.sink is not None:
        normaliser, blocked, said = _sink_logits(c, probed, heads)
        notes.append(said)
    order = {id(n): i for i, n in enumerate(gv.nodes)}
    covered = sorted({id(n): n for n in c.covered}.values(), key=lambda n: order.get(id(n), 0))
    return AttentionSite(
        id=f"a{index}", rule=c.rule, kind=kind, q=c.q, k=c.k, v=c.v, output=c.output, scale=scale,
        mask=mask, causal=causal, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        q_len=static_len(qs), k_len=static_len(ks), nodes=tuple(n.name for n in covered),
        additive=tuple(c.additive), bool_mask=c.bool_mask, bool_keep=c.bool_keep,
        mask_value=_fill(c, probed), probs=c.probs, probs_shared=c.probs_shared,
        layer=layer_of(c.scope), scope=c.scope, projections=projs, notes=tuple(notes),
        hidden=next(iter(src_q.values())) if len(src_q) == 1 else None, softcap=c.softcap, window=window,
        quantized=c.quantized, folded_terms=tuple(t.name for t in c.folded_terms),
        filled_terms=tuple(t.name for t in c.filled_terms), cache=cache_of(c.k.value, c.v.value),
        pattern=c.pattern, normaliser=normaliser, blocked=blocked,
        negated_terms=tuple(t.name for t in c.negated), zero_hidden_rows=c.zero_rows,
        regrouped_terms=tuple(t.name for t in c.regrouped_terms), regroup=windows,
        mask_shapes={t.name: tuple(np.shape(a)) for t in terms if (a := _arr(t, probed)) is not None},
        run_shape=(int(q[0]), heads, tq, tk, head_dim) if q is not None and heads and tq and tk and head_dim else None)


def _fill(c: Candidate, probed: dict) -> float | None:
    if c.fill is None:
        return c.fill_value
    a = _arr(c.fill, probed)
    return None if a is None or a.size != 1 else float(a.reshape(-1)[0])


def _sink_logits(c: Candidate, probed: dict, heads: int | None) -> tuple[Normaliser, str | None, str]:
    """The sink column as a per-head sink logit b_h (exp(S) / (exp(b_h) + Σ exp(S))): the
    normaliser, why no pass may rewrite the site where b_h cannot be read, and a note."""
    a = _arr(c.sink, probed)
    why = None
    if _input_dependent(c.sink):
        why = "its sink column is computed from the inputs, not one learned logit per head"
    elif a is None or not heads:
        why = "its sink logits could not be read (the model did not run on sample inputs)"
    else:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 4 or a.shape[-1] != 1 or a.shape[1] not in (1, heads) or not np.all(a == a[:1, :, :1, :]):
            why = f"its sink column {tuple(a.shape)} is not one logit per head, the same for every row"
    if why is not None:
        return Normaliser("logit"), why, f"a sink column before the softmax; {why}"
    bias = np.broadcast_to(a[0, :, 0, 0], (heads,))
    norm = Normaliser("logit", bias=tuple(float(b) for b in bias))
    return norm, None, "a learned sink logit per head concatenated before the softmax (sliced off before ·V)"
