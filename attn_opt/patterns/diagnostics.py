"""Attention diagnostics on sample inputs, per site and head.

The probabilities come from one run of the model: a site's Softmax output where the
graph has one (exposed as an extra output of a temporary copy), else computed from its
probed Q, K and masks (patterns/reference.py). Per head:

- first_tokens: mean attention each of the first tokens receives (the sink ratio is [0]);
- sinks: tokens whose mean received attention exceeds `sink_threshold`;
- entropy: mean attention entropy of a row, in nats;
- outside_window: mean attention mass on keys outside a window of `window` (if given);
- state: "dormant" when the first token takes at least `dormant_threshold` of the
  attention (the head parks its mass on the sink, Guo et al. 2024), else "active".
Rows that see no key (fully padded) are left out of every mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from attn_opt.patterns import reference
from attn_opt.patterns.form import Pattern
from attn_opt.patterns.site import AttentionSite

SINK_THRESHOLD = 0.2
DORMANT_THRESHOLD = 0.5
FIRST = 4


@dataclass
class HeadStats:
    site: str
    layer: int | None
    head: int
    first_tokens: list[float]
    sinks: list[int]
    entropy: float
    outside_window: float | None
    state: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SiteDiagnostics:
    """What a pass that chooses from data (sinks=auto, heads=auto) gets for one site: the
    per-head statistics and the probabilities they were read from, [B, H, Tq, Tk]."""
    stats: list[HeadStats]
    probs: np.ndarray | None
    gates: np.ndarray | None = None  # per KV group, DuoAttention's fitted α (pipeline/stream_gates.py)


def outside_mask(tq: int, tk: int, window: int, causal: bool) -> np.ndarray:
    """[Tq, Tk]: the pairs outside a window of `window` keys (queries the last Tq of Tk)."""
    i = np.arange(tq)[:, None] + (tk - tq)
    return ~Pattern("window", causal, window, 1).window_visible(i, np.arange(tk)[None, :], tk)


def probabilities(gv, sites: list[AttentionSite], feeds) -> dict[str, np.ndarray]:
    """Per site, [B, H, Tq, Tk] attention probabilities on `feeds` (float64)."""
    values = []
    for s in sites:
        values += [s.probs] if s.probs is not None and s.rule == "eager" else reference.needed(s)
    probed = gv.probe(values, feeds)
    out = {}
    for s in sites:
        try:
            if s.probs is not None and s.rule == "eager" and s.probs.name in probed:
                out[s.id] = np.asarray(probed[s.probs.name], dtype=np.float64)
            else:
                out[s.id] = reference.probabilities(s, probed)
        except (ValueError, KeyError):
            continue  # packed layouts: no per-head probabilities
    return out


def head_stats(site: AttentionSite, p: np.ndarray, window: int | None = None,
               sink_threshold: float = SINK_THRESHOLD, dormant_threshold: float = DORMANT_THRESHOLD) -> list[HeadStats]:
    rows = p.sum(-1) > 0.5  # [B, H, Tq]: rows that see some key
    out = []
    for h in range(p.shape[1]):
        ph = p[:, h][rows[:, h]]  # [rows, Tk]
        if ph.size == 0:
            continue
        received = ph.mean(0)
        ent = float(np.mean(-np.sum(np.where(ph > 0, ph * np.log(np.where(ph > 0, ph, 1)), 0), -1)))
        outside = None
        if window:
            mask = outside_mask(p.shape[2], p.shape[3], window, bool(site.causal))
            per_row = (p[:, h] * mask).sum(-1)  # [B, Tq]
            outside = float(per_row[rows[:, h]].mean())
        out.append(HeadStats(site.id, site.layer, h, [float(x) for x in received[:FIRST]],
                             [int(j) for j in np.nonzero(received > sink_threshold)[0]], ent, outside,
                             "dormant" if received[0] >= dormant_threshold else "active"))
    return out


def diagnose(gv, sites: list[AttentionSite], feeds, window: int | None = None, **thresholds) -> list[HeadStats]:
    probs = probabilities(gv, sites, feeds)
    stats = []
    for s in sites:
        if s.id in probs:
            stats += head_stats(s, probs[s.id], window, **thresholds)
    return stats


def for_pass(gv, sites: list[AttentionSite], feeds, window: int | None) -> dict[str, SiteDiagnostics]:
    """Per site id, what a pass that chooses from diagnostics gets."""
    probs = probabilities(gv, sites, feeds)
    return {s.id: SiteDiagnostics(head_stats(s, probs[s.id], window), probs[s.id]) for s in sites if s.id in probs}


def outside_stream(p: np.ndarray, sinks: int, window: int) -> np.ndarray:
    """Per head [H]: the mean attention mass a causal `window` plus the first `sinks` keys
    would drop (stream's pattern), over the rows that see some key; queries are the last
    Tq of Tk keys."""
    tq, tk = p.shape[2], p.shape[3]
    i = np.arange(tq)[:, None] + (tk - tq)
    j = np.arange(tk)[None, :]
    keep = Pattern("window", True, window, 1).window_visible(i, j, tk) | ((j < sinks) & (j <= i))
    rows = p.sum(-1) > 0.5  # [B, H, Tq]
    dropped = (p * ~keep).sum(-1)  # [B, H, Tq]
    return np.array([float(dropped[:, h][rows[:, h]].mean()) if rows[:, h].any() else 0.0 for h in range(p.shape[1])])
