"""Lower a site's `Form` (patterns/form.py) on torch.fx: calls inserted into the
GraphModule, built from the AttentionSite record (the same record the ONNX lowering reads).

fused: one `F.scaled_dot_product_attention`. A pattern × normaliser form: one call to
`backends.torch.forms.attention` carrying the form record, so the next pass can read the
site back (trained values, like sink logits, are nn.Parameters). A gate: an `nn.Linear`
registered on the module (trainable). Collapsed weights: one call to
`backends.torch.forms.collapsed` with the matrices as nn.Parameters.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from attn_opt.backends.torch import forms
from attn_opt.patterns.form import Collapse, Form, Gate, Latent, Normaliser, Pattern, banded_pays, selection_reason
from attn_opt.patterns.mlp import mlp_blocks
from attn_opt.patterns.record import form_record
from attn_opt.patterns.site import AttentionSite, Operand
from attn_opt.core.errors import NotSupported
from attn_opt.core.graph import EPILOGUE_TAG, FORM_KEY, SITE_TAG, param_name

HIDE = -1e30  # a hidden key's bias: finite, so a row hidden completely gets uniform weights


def _node(v, graph: fx.Graph):
    """An fx node (or a literal) for a view Value."""
    if v.native is not None:
        return v.native
    arr = v.const
    return arr.item() if arr is not None and arr.size == 1 else torch.as_tensor(arr)


def _bhsd(op: Operand, graph: fx.Graph):
    x = _node(op.value, graph)
    x = graph.call_function(torch.permute, (x, list(op.perm))) if op.perm else x
    if op.factor is not None:  # a per-head score factor (cosine attention's temperature) folded into Q
        x = graph.call_function(operator.mul, (x, _node(op.factor, graph)))
    if op.streams:  # [B, N, H, S, D] -> [B*N, H, S, D]
        x = graph.call_method("flatten", (x, 0, 1))
    return graph.call_method("unflatten", (x, 0, (-1, op.fold))) if op.fold else x  # [B*H, S, D] -> 4-D


def _term(site: AttentionSite, t, graph: fx.Graph):
    """An additive term; one added to 3-D heads-in-batch scores viewed as [B, H, ·, ·]."""
    x = _signed(site, t, graph)
    if t.name in site.regrouped_terms:
        q = _node(site.q.value, graph)
        x = graph.call_function(regrouped, (x, site.regroup, q, site.q.perm[0] if site.q.perm else 0,
                                            bool(site.q.streams)))
    return graph.call_method("unflatten", (x, 0, (-1, site.heads))) if t.name in site.folded_terms else x


def regrouped(x: torch.Tensor, windows: int, q: torch.Tensor, batch_axis: int, streams: bool) -> torch.Tensor:
    """A term added to the scores viewed [B/W, W, H, Tq, Tk] (Swin's shifted-window mask; a
    5-D product's streams: W = N and Q's batch axis is B) as a term of the 4-D scores
    (patterns/reference.py: regrouped)."""
    x = x.reshape((1,) * (5 - x.dim()) + tuple(x.shape))
    groups = q.shape[batch_axis] if streams else q.shape[batch_axis] // windows
    return x.expand(groups, windows, -1, -1, -1).flatten(0, 1)


def _signed(site: AttentionSite, t, graph: fx.Graph):
    """A term's node, negated where the scores subtract it (s − 1e30·mask)."""
    x = _node(t, graph)
    return graph.call_function(operator.neg, (x,)) if t.name in site.negated_terms else x


def _filled(site: AttentionSite) -> tuple[int, ...]:
    """Indices of the additive terms added after the boolean mask's fill."""
    return tuple(i for i, t in enumerate(site.additive) if t.name in site.filled_terms)


def _refold(site: AttentionSite, new, graph: fx.Graph):
    """A heads-in-batch site's output back to [B*H, Tq, dv]."""
    if site.q.streams:  # [B*N, H, S, dv] -> [B, N, H, S, dv]
        return graph.call_method("unflatten", (new, 0, (-1, site.q.streams)))
    return graph.call_method("flatten", (new, 0, 1)) if site.q.fold else new


def lower(gm: fx.GraphModule, site: AttentionSite, form: Form) -> str | None:
    """Emit `form` for `site` in place of its nodes; a note for the report."""
    feature = lambda name: CAPABILITIES.implementation("feature", name)  # noqa: E731
    if form.stream is not None:
        feature("stream")(gm, site, form.stream)
    if form.fused:
        return feature("fused")(gm, site)
    if form.gate is not None:
        return feature("gate")(gm, site, form.gate)
    if form.collapse is not None:
        return feature("collapse")(gm, site, form.collapse)
    if form.latent is not None:
        return feature("latent")(gm, site, form.latent)
    note = emit_form(gm, site, form.pattern, form.normaliser)
    if form.lora:
        note = "; ".join(n for n in (note, feature("lora")(gm, site, form.lora)) if n)
    return note


def lora(gm: fx.GraphModule, site: AttentionSite, rank: int) -> str:
    """y = x W_o (+ b) becomes y + (x A) B after the site's output projection, A and B
    nn.Parameters (B zero: the function is unchanged until calibration or heal fits them)."""
    o = site.out_projection
    if o is None:
        return "no LoRA: no output projection with constant weights reads this site"
    w = o.weight.const
    d_in, d_out = (w.shape[1], w.shape[0]) if o.transposed else w.shape
    g = gm.graph
    y = next(n for n in g.nodes if n.name == o.node)
    names = (param_name(site.id, "lora_a", "fx"), param_name(site.id, "lora_b", "fx"))
    init = (torch.randn(d_in, rank, generator=torch.Generator().manual_seed(0)) / math.sqrt(d_in),
            torch.zeros(rank, d_out))
    for name, t in zip(names, init):
        gm.register_parameter(name, torch.nn.Parameter(t.to(torch.float32)))
    x = o.x.native
    with g.inserting_after(y):
        a = g.get_attr(names[0])
    with g.inserting_after(a):
        b = g.get_attr(names[1])
    with g.inserting_after(b):
        xf = g.call_function(_as_float, (x,))
    with g.inserting_after(xf):
        xa = g.call_function(torch.matmul, (xf, a))
    with g.inserting_after(xa):
        xab = g.call_function(torch.matmul, (xa, b))
    with g.inserting_after(xab):
        new = g.call_function(_add_like, (y, xab))
    for n in (a, b, xf, xa, xab, new):
        n.meta.update({SITE_TAG: site.id, EPILOGUE_TAG: "1"})
    new.meta.update({k: y.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in y.meta})
    y.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return f"LoRA rank {rank} on the output projection {o.node} (zero until calibrated)"


def _as_float(x):
    return x.float()


def _add_like(y, delta):
    """y + delta in y's dtype."""
    return y + delta.to(y.dtype)


def fuse_site(gm: fx.GraphModule, site: AttentionSite) -> str:
    """Replace one eager site by scaled_dot_product_attention (exact); a soft-capped site,
    which SDPA cannot express, by one call of the dense form."""
    if site.softcap:
        emit_form(gm, site, None, Normaliser())
        return f"one call of the dense form with soft-cap {site.softcap:g} (SDPA has no soft-cap)"
    g = gm.graph
    out = site.output.native
    with g.inserting_before(out):
        q, k, v = (_bhsd(op, g) for op in (site.q, site.k, site.v))
        mask = None
        for term in site.additive:
            t = _term(site, term, g)
            mask = t if mask is None else g.call_function(operator.add, (mask, t))
        if site.bool_mask is not None:
            keep = _node(site.bool_mask, g)
            keep = g.call_method("bool", (keep,))
            if not site.bool_keep:
                keep = g.call_function(torch.logical_not, (keep,))
            fill = site.mask_value
            if mask is None and (fill is None or not math.isfinite(fill)):
                mask = keep
            else:  # hidden keys get a finite fill, so a row hidden completely is uniform as in the original
                low = max(fill, HIDE) if fill is not None and math.isfinite(fill) else HIDE
                after = [_term(site, t, g) for t in site.additive if t.name in site.filled_terms]
                if after and fill is not None and math.isfinite(fill):  # fill + later terms may overflow: hidden for good
                    total = after[0]
                    for t in after[1:]:
                        total = g.call_function(operator.add, (total, t))
                    dead = g.call_function(torch.isinf, (g.call_function(operator.add, (total, fill)),))
                    low = g.call_method("type_as", (g.call_function(torch.where, (dead, -math.inf, low)), total))
                mask = g.call_function(torch.where, (keep, mask if mask is not None else 0.0, low))
        causal = site.mask == "causal"
        if site.normaliser.kind == "logit":  # a per-head sink logit: one more key, zero value (exact)
            name = param_name(site.id, "sink_logit", "fx")
            gm.register_parameter(name, torch.nn.Parameter(torch.tensor(site.normaliser.bias, dtype=torch.float32)))
            new = g.call_function(scaled_dot_product_attention_with_sink, (q, k, v, mask, g.get_attr(name), float(site.scale),
                                                   bool(causal), bool(site.gqa)))
            new = _refold(site, new, g)
        else:
            kwargs = {"attn_mask": None if causal else mask, "scale": float(site.scale), "is_causal": causal}
            if site.gqa:
                kwargs["enable_gqa"] = True
            new = _refold(site, g.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs), g)
    out.replace_all_uses_with(new)
    new.meta[SITE_TAG] = site.id
    covered = set(site.nodes)
    for n in list(g.nodes):  # export's metadata assertions on the replaced nodes go with them
        if "_assert" in str(n.target) and any(getattr(a, "name", None) in covered for a in n.args):
            g.erase_node(n)
    new.meta.update({k: out.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in out.meta})
    if site.normaliser.kind == "logit":
        return "scaled_dot_product_attention with the sink logit as one more key (value 0)"
    return "scaled_dot_product_attention"


def scaled_dot_product_attention_with_sink(q, k, v, mask, sink, scale: float, causal: bool, gqa: bool) -> torch.Tensor:
    """scaled_dot_product_attention over the keys plus one key of value 0 whose score is the
    head's sink logit b_h: exp(b_h) joins only the denominator, which is the sink-logit
    normaliser exactly (the ONNX fuse writes the same extra key)."""
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    k = torch.cat([k, k.new_zeros(k.shape[:-2] + (1, k.shape[-1]))], -2)
    v = torch.cat([v, v.new_zeros(v.shape[:-2] + (1, v.shape[-1]))], -2)
    m = q.new_zeros((b, h, tq, tk))
    if causal:
        m = m.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1 + tk - tq), float("-inf"))
    if mask is not None:
        m = m + (torch.zeros((), dtype=q.dtype).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                 else mask.to(q.dtype))
    col = sink.to(q.dtype).reshape(1, h, 1, 1).expand(b, h, tq, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([m, col], -1), scale=scale, enable_gqa=gqa)


def erase_dead(g: fx.Graph, names: set[str]) -> None:
    """Erase the named nodes once nothing uses them, and export's metadata assertions on them.
    Dead-code elimination alone keeps them: dropout counts as impure."""
    for n in reversed(list(g.nodes)):
        asserting = "_assert" in str(n.target) and any(getattr(a, "name", None) in names for a in n.args)
        if (asserting or (n.name in names and n.op == "call_function")) and not n.users:
            g.erase_node(n)


def _drop_asserts(g: fx.Graph, site: AttentionSite) -> None:
    """The replaced nodes of `site` go."""
    erase_dead(g, set(site.nodes))


def emit_form(gm: fx.GraphModule, site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser) -> str | None:
    """Replace `site` by one call computing it with this pattern and normaliser; a sink
    logit becomes an nn.Parameter of the module (trainable)."""
    g = gm.graph
    bias = note = None
    params = {}
    if normaliser.calibrated:  # calibration's per-head parameters: nn.Parameters of the module
        for name, vals in normaliser.values(site.heads).items():
            params[name] = param_name(site.id, name, "fx")
            gm.register_parameter(params[name], torch.nn.Parameter(torch.tensor(vals, dtype=torch.float32)))
    elif normaliser.kind == "logit" and np.all(np.isfinite(normaliser.bias)):
        bias = param_name(site.id, "sink_logit", "fx")
        gm.register_parameter(bias, torch.nn.Parameter(torch.tensor(normaliser.bias, dtype=torch.float32)))
        note = f"sink logits in parameter {bias}"
    banded, why = banded_pays(site, pattern) if pattern is not None else (True, None)
    note = "; ".join(n for n in (why, note) if n) or None
    out = site.output.native
    with g.inserting_before(out):
        q, k, v = (_bhsd(op, g) for op in (site.q, site.k, site.v))
        additive = [_term(site, t, g) for t in site.additive]
        boolean = _node(site.bool_mask, g) if site.bool_mask is not None else None
        kwargs = {"bool_keep": site.bool_keep, "scale": float(site.scale), "causal": bool(site.causal),
                  "fill": site.mask_value, "softcap": site.softcap, "banded": banded, "filled": _filled(site)}
        if bias is not None:
            kwargs["bias"] = g.get_attr(bias)
        if params:
            kwargs["params"] = {name: g.get_attr(target) for name, target in params.items()}
        new = g.call_function(SiteAttention(site.id, pattern, normaliser), (q, k, v, additive, boolean), kwargs)
        new = _refold(site, new, g)
    new.meta[FORM_KEY] = form_record(site, pattern, normaliser)
    new.meta[SITE_TAG] = site.id
    out.replace_all_uses_with(new)
    new.meta.update({k: out.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in out.meta})
    _drop_asserts(g, site)
    return note


class SiteAttention:
    """The call a rewritten site becomes: `forms.attention` with the site's `Pattern` and
    `Normaliser` held as they are (FX keeps a call's target as an object of the generated
    code, so the form never goes through text on the way to the computation)."""

    def __init__(self, site_id: str, pattern: Pattern | None, normaliser: Normaliser):
        self.pattern, self.normaliser = pattern, normaliser
        self.__name__ = param_name(site_id, "attention", "fx")  # the name FX's generated code gives the call

    def __call__(self, q, k, v, additive=(), bool_mask=None, **kwargs):
        from attn_opt.backends.torch.forms import attention

        return attention(q, k, v, additive, bool_mask, pattern=self.pattern, normaliser=self.normaliser, **kwargs)


def gate(gm: fx.GraphModule, site: AttentionSite, gt: Gate) -> str:
    """O ⊙ σ(X W + b) per head, W and b an nn.Linear registered as a submodule."""
    import torch.nn as nn

    weight, bias, mode = gt.weight, gt.bias, gt.mode
    g = gm.graph
    name = param_name(site.id, "gate", "fx")
    lin = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight.T.copy()))
        lin.bias.copy_(torch.from_numpy(bias))
    gm.add_submodule(name, lin)
    out = site.output.native
    k = 1 if mode == "headwise" else site.head_dim
    x = gt.source.native
    users = list(out.users)
    with g.inserting_after(out):
        logits = g.call_module(name, (x,))
    with g.inserting_after(logits):
        sig = g.call_function(torch.sigmoid, (logits,))
    with g.inserting_after(sig):
        shape = g.call_function(getattr, (sig, "shape"))  # [B, S, H·k]
    with g.inserting_after(shape):
        b_ = g.call_function(operator.getitem, (shape, 0))
    with g.inserting_after(b_):
        t_ = g.call_function(operator.getitem, (shape, 1))
    with g.inserting_after(t_):
        g4 = g.call_function(torch.reshape, (sig, (b_, t_, site.heads, k)))
    with g.inserting_after(g4):
        g4t = g.call_function(torch.transpose, (g4, 1, 2))
    made = [logits, sig, shape, b_, t_, g4, g4t]
    with g.inserting_after(g4t):
        o4 = g.call_method("unflatten", (out, 0, (-1, site.heads))) if site.q.fold else out  # [B*H, S, dv] -> 4-D
    with g.inserting_after(o4 if site.q.fold else g4t):
        gated = g.call_function(operator.mul, (o4, g4t))
    if site.q.fold:
        made.append(o4)
        with g.inserting_after(gated):
            made.append(gated)
            gated = g.call_method("flatten", (gated, 0, 1))
    for n in made + [gated]:
        n.meta.update({SITE_TAG: site.id, EPILOGUE_TAG: "1"})
    for u in users:
        u.replace_input_with(out, gated)
    return f"nn.Linear {name}"


def emit_collapse(gm: fx.GraphModule, site: AttentionSite, c: Collapse) -> None:
    """mlpfree's collapsed products as one call; the new matrices are nn.Parameters."""
    from attn_opt.backends.torch.forms import collapsed

    g = gm.graph

    def param(key, value):
        if value is None:
            return None
        name = param_name(site.id, key, "fx")
        gm.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.astype("float32"))))
        return name

    pq, pvo = param("w_qk", c.w_qk), param("w_vo", c.w_vo)
    vo = pvo is not None
    o = c.o
    target = next(n for n in g.nodes if n.name == o.node) if vo else site.output.native
    with g.inserting_before(target):
        xq = c.xq.native if pq else _bhsd(site.q, g)
        xk = c.xk.native if pq else _bhsd(site.k, g)
        kwargs = {"bool_keep": site.bool_keep, "scale": float(site.scale), "causal": bool(site.causal),
                  "heads": site.heads, "xv": c.xv.native if vo else None,
                  "w_vo": g.get_attr(pvo) if vo else None,
                  "o_bias": _node(o.bias, g) if vo and o.bias is not None else None, "fill": site.mask_value,
                  "softcap": site.softcap, "filled": _filled(site)}
        new = g.call_function(collapsed, (xq, xk, g.get_attr(pq) if pq else None, None if vo else _bhsd(site.v, g),
                                          [_signed(site, t, g) for t in site.additive],
                                          _node(site.bool_mask, g) if site.bool_mask is not None else None), kwargs)
    target.replace_all_uses_with(new)
    g.eliminate_dead_code()  # the output projection and P·V first, so the site's own nodes lose their users
    _drop_asserts(g, site)


def emit_latent(gm: fx.GraphModule, site: AttentionSite, lat: Latent) -> None:
    """latent's factorised projections: c = x · W_down once, each factorised projection
    c · W_up (+ its own bias); W_down and W_up are nn.Parameters of the module."""
    g = gm.graph

    def param(key, value):
        name = param_name(site.id, key, "fx")
        gm.register_parameter(name, torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value, np.float32))))
        return g.get_attr(name)

    nodes = {n.name: n for n in g.nodes}
    projs = [(w, nodes[p.node], up) for w, p, up in (("k", lat.k, lat.up_k), ("v", lat.v, lat.up_v)) if up is not None]
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min((n for _, n, _ in projs), key=order.get)
    with g.inserting_before(first):
        x = lat.x.native
        c = g.call_function(torch.matmul, (g.call_method("to", (x, torch.float32)), param("latent_down", lat.down)))
    for w, node, up in projs:
        with g.inserting_before(node):
            y = g.call_function(torch.matmul, (c, param(f"latent_up_{w}", up)))
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None:
                y = g.call_function(operator.add, (y, bias))
            y = g.call_method("type_as", (y, x))
        y.meta.update({k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta})
        node.replace_all_uses_with(y)
        g.erase_node(node)


def cap_stream(gm: fx.GraphModule, site: AttentionSite, stream) -> None:
    """stream's capped cache on torch.fx: where the graph returns the site's present
    key/value (a DynamicCache filled from its inputs and returned as tensors), it returns
    them kept to the sinks and the recent window (forms.cap_cache); the attention still
    reads the whole concatenation, with the window pattern."""
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    nodes = {n.name: n for n in g.nodes}
    for name in (site.cache.present_key, site.cache.present_value):
        present = nodes[name]
        with g.inserting_before(out):
            capped = g.call_function(forms.cap_cache, (present, stream.sinks, stream.window))
        capped.meta.update({k: present.meta[k] for k in ("val",) if k in present.meta})
        out.replace_input_with(present, capped)


def drop_mlp(gm: fx.GraphModule, gv) -> list[str]:
    """x + MLP(norm(x)) becomes x, for every feed-forward block found."""
    notes = []
    for add, x, nodes in mlp_blocks(gv):
        add.outputs[0].native.replace_all_uses_with(x.native)
        erase_dead(gm.graph, {n.name for n in nodes} | {add.name})
        notes.append(f"dropped the feed-forward block ending at {add.name} ({len(nodes)} nodes)")
    return notes or ["drop_mlp: no feed-forward block found"]


GRAPH_EDITS = {"drop_mlp": drop_mlp}


def _limits(site: AttentionSite, form: Form) -> str | None:
    """What scaled_dot_product_attention cannot keep of a site's own form; a latent cache;
    a content pattern's limits (patterns/form.py: selection_reason)."""
    if form.stream is not None and form.stream.full_groups is not None:  # cap_stream would cap the full groups too
        return ("per-head streaming (full_heads) on torch.fx: the split cache is not implemented on torch.fx yet "
                "(the ONNX step has it); give stream without full_heads")
    if form.stream is not None and (form.stream.rotary is not None or form.stream.target != "own"):
        return ("stream on torch.fx: positions=cache and the runtime ops (target=onnx|ort|auto) are ONNX "
                "lowerings; torch.fx takes positions=original, target=own")
    if form.latent is not None and form.latent.cache:
        return ("latent on a torch.fx decoder step: the cache is a DynamicCache the graph fills from its inputs; "
                "the latent cache is not implemented on torch.fx yet (the ONNX step has it)")
    if site is not None and site.zero_hidden_rows:
        return "rows its mask hides completely are zeroed after the softmax: not lowered on torch.fx yet (ONNX is)"
    if not form.fused:
        return selection_reason(site, form)
    if form.pattern is not None:
        return f"its pattern ({form.pattern.describe()}) would be lost: a fused op keeps every pair"
    if not form.normaliser.is_softmax and not (form.normaliser.kind == "logit" and site is not None
                                               and site.normaliser == form.normaliser):
        return f"its normaliser ({form.normaliser.describe()}) would be lost: scaled_dot_product_attention computes softmax"
    return None


CAPABILITIES = dataclasses.replace(
    forms.CAPABILITIES,
    feature={"fused": fuse_site, "gate": gate, "collapse": emit_collapse, "lora": lora, "latent": emit_latent,
             "stream": cap_stream},
    limits=_limits)
