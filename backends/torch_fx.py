"""Lowering on torch.fx: a site becomes calls inserted into the GraphModule.

`fuse` is implemented here: one `F.scaled_dot_product_attention` per eager site, built
from the AttentionSite record (the same record the ONNX emitters read). The other forms
are not lowered to FX yet; asking for them on a torch model says so.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from attn_opt.patterns.site import AttentionSite, Operand


def _node(v, graph: fx.Graph):
    """An fx node (or a literal) for a view Value."""
    if v.native is not None:
        return v.native
    arr = v.const
    return arr.item() if arr is not None and arr.size == 1 else torch.as_tensor(arr)


def _bhsd(op: Operand, graph: fx.Graph):
    x = _node(op.value, graph)
    return graph.call_function(torch.permute, (x, list(op.perm))) if op.perm else x


def fuse_site(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Replace one eager site by scaled_dot_product_attention (exact)."""
    g = gm.graph
    out = site.output.native
    with g.inserting_before(out):
        q, k, v = (_bhsd(op, g) for op in (site.q, site.k, site.v))
        mask = None
        for term in site.additive:
            t = _node(term, g)
            mask = t if mask is None else g.call_function(operator.add, (mask, t))
        if site.bool_mask is not None:
            keep = _node(site.bool_mask, g)
            keep = g.call_method("bool", (keep,))
            if not site.bool_keep:
                keep = g.call_function(torch.logical_not, (keep,))
            if mask is None:
                mask = keep
            else:  # both: hidden keys get the lowest value, the rest keep their bias
                low = torch.finfo(torch.float32).min
                mask = g.call_function(torch.where, (keep, mask, low))
        causal = site.mask == "causal"
        kwargs = {"attn_mask": None if causal else mask, "scale": float(site.scale), "is_causal": causal}
        if site.gqa:
            kwargs["enable_gqa"] = True
        new = g.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
    out.replace_all_uses_with(new)
    covered = set(site.nodes)
    for n in list(g.nodes):  # export's metadata assertions on the replaced nodes go with them
        if "_assert" in str(n.target) and any(getattr(a, "name", None) in covered for a in n.args):
            g.erase_node(n)
    new.meta.update({k: out.meta[k] for k in ("val", "tensor_meta", "nn_module_stack") if k in out.meta})
