"""Lowering on torch.fx: a site becomes calls inserted into the GraphModule, built from
the AttentionSite record (the same record the ONNX emitters read).

fuse: one `F.scaled_dot_product_attention`. The forms (sparse, softplus, sinkfree): one
call to `backends.torch_forms.attention` carrying the form record, so the next pass can
read the site back. gated: an `nn.Linear` gate registered on the module (trainable).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from attn_opt.patterns.site import AttentionSite, Operand

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
    return graph.call_method("unflatten", (x, 0, (-1, op.fold))) if op.fold else x  # [B*H, S, D] -> 4-D


def _term(site: AttentionSite, t, graph: fx.Graph):
    """An additive term; one added to 3-D heads-in-batch scores viewed as [B, H, ·, ·]."""
    x = _node(t, graph)
    return graph.call_method("unflatten", (x, 0, (-1, site.heads))) if t.name in site.folded_terms else x


def _refold(site: AttentionSite, new, graph: fx.Graph):
    """A heads-in-batch site's output back to [B*H, Tq, dv]."""
    return graph.call_method("flatten", (new, 0, 1)) if site.q.fold else new


def fuse_site(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Replace one eager site by scaled_dot_product_attention (exact); a soft-capped site,
    which SDPA cannot express, by one call of the dense form with its cap."""
    if site.softcap:
        return emit_form(gm, site, None, {"kind": "softmax"})
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
                mask = g.call_function(torch.where, (keep, mask if mask is not None else 0.0, low))
        causal = site.mask == "causal"
        kwargs = {"attn_mask": None if causal else mask, "scale": float(site.scale), "is_causal": causal}
        if site.gqa:
            kwargs["enable_gqa"] = True
        new = _refold(site, g.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs), g)
    out.replace_all_uses_with(new)
    new.meta["attn_opt.site"] = site.id
    covered = set(site.nodes)
    for n in list(g.nodes):  # export's metadata assertions on the replaced nodes go with them
        if "_assert" in str(n.target) and any(getattr(a, "name", None) in covered for a in n.args):
            g.erase_node(n)
    new.meta.update({k: out.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in out.meta})


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


def emit_form(gm: fx.GraphModule, site: AttentionSite, pattern: dict | None, normaliser: dict, bias=None) -> None:
    """Replace `site` by one call computing it with this pattern and normaliser."""
    from attn_opt.backends.torch_forms import attention
    from attn_opt.patterns.record import FORM_KEY, form_record

    g = gm.graph
    out = site.output.native
    with g.inserting_before(out):
        q, k, v = (_bhsd(op, g) for op in (site.q, site.k, site.v))
        additive = [_term(site, t, g) for t in site.additive]
        boolean = _node(site.bool_mask, g) if site.bool_mask is not None else None
        kwargs = {"bool_keep": site.bool_keep, "scale": float(site.scale), "causal": bool(site.causal),
                  "pattern": pattern, "normaliser": normaliser, "fill": site.mask_value, "softcap": site.softcap}
        if bias is not None:
            kwargs["bias"] = g.get_attr(bias)
        new = g.call_function(attention, (q, k, v, additive, boolean), kwargs)
        new = _refold(site, new, g)
    new.meta[FORM_KEY] = form_record(site, pattern, normaliser)
    new.meta["attn_opt.site"] = site.id
    out.replace_all_uses_with(new)
    new.meta.update({k: out.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in out.meta})
    _drop_asserts(g, site)


def gate(gm: fx.GraphModule, site: AttentionSite, weight, bias, mode: str) -> None:
    """O ⊙ σ(X W + b) per head, W and b an nn.Linear registered as a submodule."""
    import torch.nn as nn

    g = gm.graph
    name = f"attn_opt_{site.id}_gate"
    lin = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight.T.copy()))
        lin.bias.copy_(torch.from_numpy(bias))
    gm.add_submodule(name, lin)
    out = site.output.native
    k = 1 if mode == "headwise" else site.head_dim
    x = (site.projections["q"].x if "q" in site.projections else site.hidden).native
    users = list(out.users)
    with g.inserting_after(out):
        logits = g.call_module(name, (x,))
    with g.inserting_after(logits):
        sig = g.call_function(torch.sigmoid, (logits,))
    with g.inserting_after(sig):
        shape = g.call_function(getattr, (out, "shape"))
    with g.inserting_after(shape):
        b_ = g.call_function(operator.getitem, (shape, 0))
    with g.inserting_after(b_):
        t_ = g.call_function(operator.getitem, (shape, 2))
    with g.inserting_after(t_):
        g4 = g.call_function(torch.reshape, (sig, (b_, t_, site.heads, k)))
    with g.inserting_after(g4):
        g4t = g.call_function(torch.transpose, (g4, 1, 2))
    with g.inserting_after(g4t):
        gated = g.call_function(operator.mul, (out, g4t))
    for u in users:
        u.replace_input_with(out, gated)


def emit_collapse(gm: fx.GraphModule, site: AttentionSite, w: dict) -> None:
    """mlpfree's collapsed products as one call; the new matrices are nn.Parameters."""
    from attn_opt.backends.torch_forms import collapsed

    g = gm.graph

    def param(key):
        if key not in w:
            return None
        name = f"attn_opt_{site.id}_{key}"
        gm.register_parameter(name, torch.nn.Parameter(torch.from_numpy(w[key].astype("float32"))))
        return name

    pq, pvo = param("w_qk"), param("w_vo")
    vo = pvo is not None
    o = w.get("o")
    target = next(n for n in g.nodes if n.name == o.node) if vo else site.output.native
    with g.inserting_before(target):
        xq = w["xq"].native if pq else _bhsd(site.q, g)
        xk = w["xk"].native if pq else _bhsd(site.k, g)
        kwargs = {"bool_keep": site.bool_keep, "scale": float(site.scale), "causal": bool(site.causal),
                  "heads": site.heads, "xv": w["xv"].native if vo else None,
                  "w_vo": g.get_attr(pvo) if vo else None,
                  "o_bias": _node(o.bias, g) if vo and o.bias is not None else None, "fill": site.mask_value,
                  "softcap": site.softcap}
        new = g.call_function(collapsed, (xq, xk, g.get_attr(pq) if pq else None, None if vo else _bhsd(site.v, g),
                                          [_node(t, g) for t in site.additive],
                                          _node(site.bool_mask, g) if site.bool_mask is not None else None), kwargs)
    target.replace_all_uses_with(new)
    g.eliminate_dead_code()  # the output projection and P·V first, so the site's own nodes lose their users
    _drop_asserts(g, site)
