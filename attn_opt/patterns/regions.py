"""Sites inside regions: a local function's body, an If branch, a Loop or Scan body
(core/graph.py: Region; on ONNX core/ir/onnx_regions.py finds them and runs them alone).

Such a site is found and read like a top-level one, on the values its region gave when
run alone; it is numbered within its region (`pad_if/then/a0`, `function:Attn/a0`) and
its notes say where it is and how its values were read. A function body is one site
for every call: each further call is probed too, and where the calls disagree on what a
rewrite relies on (heads, scale, mask, causality, window), no pass rewrites it, and the
site says why. A K/V cache is read at the top level only: inside a region,
Concat(past, new) is plain K/V.
"""

from __future__ import annotations

import dataclasses

from attn_opt.core.errors import first_line
from attn_opt.core.graph import GraphView, Region, layer_of
from attn_opt.patterns.candidate import Candidate
from attn_opt.patterns.site import AttentionSite

FACTS = ("heads", "kv_heads", "head_dim", "scale", "mask", "causal", "window", "softcap")


def region_of(c: Candidate) -> str:
    """The region a candidate lives in: its output's (the innermost of the graphs it covers)."""
    n = c.output.producer if c.output is not None else None
    return (n or c.anchor).region


def finish_in_region(gv: GraphView, c: Candidate, site: AttentionSite, feeds, refinish) -> AttentionSite:
    """`site` (finished on the probed values, numbered within its region) as a region's site:
    its id, region, notes, no cache, and for a function called more than once, whether
    every call agrees with the first (`refinish(probed)` finishes it on other values)."""
    path = region_of(c)
    r = gv.regions.get(path) or Region(path, "subgraph", path, "as found")
    notes = [f"inside {r.what}: heads and masks read {r.how}"]
    if r.kind == "function" and r.calls == 0:
        notes.append("the function is never called")
    if site.cache is not None:
        notes.append("its K/V are Concat(past, new) inside a region: read as plain K/V (a decoder's cache is "
                      "read where the model's graph takes and returns it)")
    blocked = None
    if r.kind == "function" and r.calls > 1 and feeds is not None and gv.call_probe_fn is not None \
            and r.error is None:
        blocked, said = _calls_differ(gv, c, site, feeds, refinish)
        notes.append(said)
    layer = site.layer if site.layer is not None else layer_of(r.scope)  # else the layer of what holds it
    return dataclasses.replace(site, id=f"{path}/{site.id}", region=path, cache=None, blocked=blocked,
                               notes=site.notes + tuple(notes), layer=layer)


def _calls_differ(gv: GraphView, c: Candidate, site: AttentionSite, feeds, refinish) -> tuple[str | None, str]:
    """(why no pass may rewrite the body, or None; a note) from every further call's values."""
    from attn_opt.patterns.detect import _needed

    try:
        per_call = gv.call_probe_fn(_needed([c]), feeds)
    except Exception as e:  # each call is still one rewrite of the body: refuse rather than guess
        why = f"its function's further calls could not be probed ({first_line(e)[:160]})"
        return why, why
    first = _facts(site)
    for j, probed in enumerate(per_call, start=2):
        if not probed:
            why = f"its function's call {j} could not be run alone, so the calls could not be compared"
            return why, why
        other = _facts(refinish(probed))
        diff = [f"{k} {_fmt(first[k])} vs {_fmt(other[k])}" for k in FACTS if not _same(first[k], other[k])]
        if diff:
            why = (f"its function's calls differ (call 1 vs call {j}: {', '.join(diff)}): one rewrite of the body "
                   "would be wrong for some call; inline the function (onnx.inliner.inline_selected_functions) "
                   "to rewrite each call")
            return why, why
    return None, f"all {len(per_call) + 1} calls of its function agree on heads, scale, mask and causality"


def _facts(s: AttentionSite) -> dict:
    return {k: getattr(s, k) for k in FACTS}


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)
    return a == b


def rewrite_reason(site: AttentionSite, p, calibrating: bool = False) -> str | None:
    """Why pass `p` may not rewrite `site` because of where it is, or None."""
    if site.blocked:
        return site.blocked
    if not site.region:
        return None
    if p.name == "stream":
        return (f"stream caps a decoder's KV cache where the model's graph takes and returns it; this site is inside "
                f"{site.region}, whose outputs the node holding it declares")
    if calibrating and site.region.startswith("function:"):
        return ("--calibrate fits per-head parameters held as initializers, and a function body has none; "
                "inline the function (onnx.inliner) to calibrate this site")
    return None
