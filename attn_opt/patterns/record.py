"""The record a rewritten site carries (ONNX node metadata, FX node meta): its form and
the names of the values it reads, so detection can read the site back and the next pass
can rewrite it again. IR-neutral: names and permutations only."""

from __future__ import annotations

import json

from attn_opt.patterns.form import Normaliser, Pattern
from attn_opt.patterns.site import AttentionSite


def _name(v) -> str:
    """The value's name in the graph now (a lowering may have renamed it since detection)."""
    return getattr(v.native, "name", None) or v.name


def form_record(site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser) -> str:
    def op(o):
        return {"name": _name(o.value), "perm": list(o.perm) if o.perm else None, "repeated": o.repeated,
                "fold": o.fold}

    return json.dumps({
        "site": site.id, "scope": site.scope, "q": op(site.q), "k": op(site.k), "v": op(site.v),
        "additive": [_name(a) for a in site.additive],
        "bool": _name(site.bool_mask) if site.bool_mask is not None else None,
        "bool_keep": site.bool_keep, "scale": site.scale, "causal": bool(site.causal), "heads": site.heads,
        "kv_heads": site.kv_heads, "head_dim": site.head_dim, "pattern": pattern.to_json() if pattern else None,
        "normaliser": normaliser.to_json(),
        "softcap": site.softcap, "fill": site.mask_value, "folded_terms": list(site.folded_terms),
        "filled_terms": list(site.filled_terms)})
