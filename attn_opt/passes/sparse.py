"""sparse: keep only some (query, key) pairs, and skip the rest of the work.

    sparse:window=W[,sinks=N|auto][,heads=all|auto][,causal=auto|true|false][,border=clip|shift][,stride=S][,block=B]
    sparse:topk=K[,block=B][,window=W][,sinks=N|auto][,levels=L]
    sparse:pyramid=L[,topk=K|budget=F][,block=B][,window=W][,sinks=N]
    sparse:routing=C[,window=W][,size=N]

window: query i sees |i - j| <= W//2 (bidirectional) or 0 <= i - j < W (causal; `auto`
follows the site). border=shift keeps exactly W keys per query at the ends
(neighborhood attention). stride=S: S consecutive queries share one window of W keys
(S = W is blocked attention). sinks=N: the first N tokens stay visible to every query.
sinks=auto picks N from attention diagnostics on the fidelity inputs: the leading tokens
whose mean received attention exceeds sink_threshold. heads=auto keeps dense the heads
whose attention mass outside the window exceeds dense_threshold (dense_heads=0+3 names
them by hand), and sparsifies the rest; the report says which tokens and heads.
The site's own mask still applies on top; a query left with no visible key gives zeros.

topk=K is content-based (HiP-style): per query block, the K key blocks whose mean-pooled
keys score highest against the block's mean-pooled queries, plus the blocks of the first
`sinks` tokens and of the local band `window` (patterns/form.py: Selection); only the
chosen blocks are gathered and attended. pyramid=L (PSA) goes on down the ranking: the
next K·2^l blocks at level l with their keys and values mean-pooled by 2^l (a pooled logit
gets + log n for the n keys it stands for), the rest dropped. routing=C (Routing
Transformer): C k-means centroids on the sequence's queries and keys, each query attends
the `size` keys (default ceil(T/C)) nearest its own centroid, plus the window; computed
as dense scores masked to the clusters on ONNX and torch.fx (no FLOPs saved yet, said).

The form is a `Pattern` (patterns/form.py) with the site's normaliser kept. The ONNX and
torch lowerings compute scores only inside a band of key blocks where that costs less
than dense at the site's length, else the dense scores masked to the pattern (and say
so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.patterns.diagnostics import SiteDiagnostics
from attn_opt.patterns.form import Form, Pattern, Selection, form_skip_reason
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.errors import NotSupported, UserError
from attn_opt.core.passbase import Pass, option


@dataclass(frozen=True)
class Sparse(Pass):
    name: ClassVar[str] = "sparse"
    exact: ClassVar[bool] = False
    why: ClassVar[str] = "sliding-window / blocked attention that skips the dropped pairs"
    once: ClassVar[bool] = True
    sets_pattern: ClassVar[bool] = True
    window: str | None = option(None, "keys per query, or a KHxKW kernel with grid=HxW",
                                accepts="W >= 1 (required), or KHxKW; with topk W >= 0 (its local band)")
    sinks: str = option("0", "first tokens every query sees", accepts=">= 0, or auto")
    heads: str = option("all", "which heads to sparsify", choices=("all", "auto"))
    dense_heads: tuple[int, ...] | None = option(None, "heads kept dense, e.g. 0+3", low=0)
    sink_threshold: float = option(0.2, "sinks=auto: mean received attention that makes a token a sink", low=0, high=1)
    dense_threshold: float = option(0.3, "heads=auto: attention mass outside the window that keeps a head dense",
                                    low=0, high=1)
    causal: str = option("auto", "causal window", choices=("auto", "true", "false"))
    border: str = option("clip", "window at the sequence ends", choices=("clip", "shift"))
    stride: int = option(1, "queries sharing one window", low=1)
    dilation: int = option(1, "keep every d-th key", low=1)
    block: int | None = option(None, "query block size of the banded lowering; topk: tokens per block "
                                      "(default 64, 16 below 256 keys)", low=1)
    grid: str | None = option(None, "token grid for 2-D neighborhoods", accepts="HxW, H and W >= 1")
    topk: int | None = option(None, "content-based: key blocks each query block keeps by mean-pooled Q·K score "
                                    "(beyond the sinks and the local band `window`)", low=1)
    levels: int = option(1, "topk: HiP coarse-to-fine levels (1: score the blocks directly)", low=1)
    pyramid: int | None = option(None, "content-based (PSA): pooling levels L; after the topk blocks, topk·2^l "
                                       "blocks at level l with keys mean-pooled by 2^l", low=1)
    routing: int | None = option(None, "content-based (Routing Transformer): C k-means centroids on the sequence; "
                                       "each query attends its centroid's cluster (+ the window); 1 would be one cluster "
                                       "holding every key (dense attention)", low=2)
    size: int | None = option(None, "routing: keys per cluster (default ceil(T / C); >= T: exact)", low=1)
    budget: float | None = option(None, "pyramid without topk: the kept fraction of key columns (sets topk at the "
                                        "site's length)", accepts="0 < F <= 1")

    @property
    def content(self) -> bool:
        return self.topk is not None or self.pyramid is not None or self.routing is not None

    def __post_init__(self):
        if self.content:
            return self._check_content()
        if self.budget is not None:
            raise UserError("sparse: budget needs pyramid=L")
        if self.levels != 1:
            raise UserError("sparse: levels needs topk=K")
        if self.size is not None:
            raise UserError("sparse: size needs routing=C")
        if self.window is None:
            raise UserError("sparse: window=W is required (e.g. sparse:window=128), or topk=K")
        if self.grid is not None:
            object.__setattr__(self, "kernel", _pair(self.window, "window"))
            object.__setattr__(self, "grid_shape", _pair(self.grid, "grid"))
            if self.stride > 1 or self.dilation > 1 or self.sinks != "0" or self.heads != "all":
                raise NotSupported("sparse: grid=HxW with stride, dilation, sinks or heads is not implemented yet")
            return
        try:
            object.__setattr__(self, "window", int(self.window))
        except ValueError:
            raise UserError(f"sparse: bad value {self.window!r} for window (a number; KHxKW needs grid=HxW)") from None
        if self.sinks != "auto" and not str(self.sinks).isdigit():
            raise UserError(f"sparse: bad value {self.sinks!r} for sinks (expected a number >= 0 or auto)")
        if self.window < 1 or self.stride < 1 or self.dilation < 1:
            raise UserError("sparse: window, stride and dilation must be >= 1 and sinks >= 0")
        if self.heads == "auto" and self.dense_heads is not None:
            raise UserError("sparse: give heads=auto or dense_heads=..., not both")
        if self.block is not None and self.block < 1:
            raise UserError("sparse: block must be >= 1")
        if self.dilation > 1 and (self.stride > 1 or self.border == "shift"):
            raise NotSupported("sparse: dilation with stride or border=shift is not implemented yet")

    def _check_content(self):
        """topk: the options a content selection takes, checked before anything runs."""
        try:
            object.__setattr__(self, "window", int(self.window or 0))
        except ValueError:
            raise UserError(f"sparse: bad value {self.window!r} for window (a number)") from None
        if self.sinks != "auto" and not str(self.sinks).isdigit():
            raise UserError(f"sparse: bad value {self.sinks!r} for sinks (expected a number >= 0 or auto)")
        if self.window < 0:
            raise UserError("sparse: window must be >= 0 with topk (0: no local band)")
        if self.block is not None and self.block < 1:
            raise UserError("sparse: block must be >= 1")
        if self.grid is not None or self.stride > 1 or self.dilation > 1 or self.border != "clip":
            raise UserError("sparse: topk takes block, window, sinks and levels; not grid, stride, dilation or border")
        if self.heads != "all" or self.dense_heads is not None:
            raise NotSupported("sparse: topk with heads=auto or dense_heads is not implemented yet")
        if self.routing is not None:
            return self._check_routing()
        if self.size is not None:
            raise UserError("sparse: size needs routing=C")
        if self.levels > 1 and self.pyramid is not None:
            raise NotSupported("sparse: levels > 1 with pyramid is not implemented yet")
        if self.pyramid is None:
            if self.budget is not None:
                raise UserError("sparse: budget needs pyramid=L")
            return
        if self.budget is not None and not 0 < self.budget <= 1:
            raise UserError(f"sparse: budget must be in (0, 1] (got {self.budget:g})")
        if self.block is not None and self.block % 2 ** self.pyramid:
            raise UserError(f"sparse: pyramid={self.pyramid} pools by up to {2 ** self.pyramid}: block must be a "
                            f"multiple of it (got {self.block})")
        if self.block is None and self.pyramid > 4:
            raise UserError("sparse: pyramid > 4 needs block=B, a multiple of 2^L")

    def _check_routing(self):
        if self.topk is not None or self.pyramid is not None or self.block is not None or self.sinks != "0" \
                or self.levels != 1 or self.budget is not None:
            raise UserError("sparse: routing takes window and size; not topk, pyramid, block, sinks, levels or budget")

    def skip_reason(self, site: AttentionSite) -> str | None:
        if self.content:
            return self._content_skip(site)
        if self.grid is not None:
            gh, gw = self.grid_shape
            if site.run_shape is None or site.run_shape[2] < gh * gw or site.run_shape[2] != site.run_shape[3]:
                return f"the sequence ({site.run_shape and site.run_shape[2]} tokens) does not hold a {gh}x{gw} grid"
            if site.mask != "none":
                return "a 2-D neighborhood needs an unmasked site (vision tokens)"
            if self.kernel[0] > gh or self.kernel[1] > gw:
                return f"kernel {self.window} is larger than the {self.grid} grid"
        if self.dense_heads is not None or self.heads == "auto":
            if site.kv_heads != site.heads:
                return "dense heads need one kv head per query head (this site is GQA/MQA)"
            if any(len(sh) == 4 and sh[1] > 1 for sh in site.mask_shapes.values()):
                return "dense heads need masks shared by all heads"
        reason = form_skip_reason(site)
        if reason:
            return reason
        if site.kind == "cross":
            return "a window needs self-attention (queries and keys on one axis)"
        if site.cache is None and site.run_shape and site.run_shape[2] != site.run_shape[3]:
            return (f"its {site.run_shape[3]} keys are a reduced view of its {site.run_shape[2]} query tokens "
                    "(spatial reduction): a window on the reduced axis would not mean nearby tokens")
        return None

    def _content_skip(self, site: AttentionSite) -> str | None:
        reason = form_skip_reason(site)
        if reason:
            return reason
        if site.cache is not None and (self.pyramid is not None or self.routing is not None):
            return "pyramid and routing on a decoder step (over its past cache) are not implemented yet"
        if site.kind == "cross" and self.window:
            return "a local band needs self-attention (queries and keys on one axis)"
        if site.causal and site.kind == "cross":
            return "a causal cross-attention site: queries and keys are not on one axis"
        if self.pyramid is not None:
            if site.causal:
                return "pyramid on a causal site is not implemented yet (a pooled group would straddle the diagonal)"
            if site.softcap:
                return "pyramid on a soft-capped site is not implemented yet"
            for m in site.additive + ((site.bool_mask,) if site.bool_mask is not None else ()):
                shape = site.mask_shapes.get(m.name)
                if len(shape) != 4 or shape[1] != 1 or shape[2] != 1:
                    return f"pyramid pools keys under per-key (padding) masks only; mask {m.name} is {list(shape)}"
        return None

    def content_block(self, site: AttentionSite) -> int:
        """Tokens per block: `block`, else 64, or 16 below 256 keys at the fidelity inputs."""
        if self.block is not None:
            return self.block
        run = site.run_shape
        return 16 if run and run[3] < 256 else 64

    def coverage_note(self, site: AttentionSite) -> str | None:
        """Said when the window keeps every key: at the model's fixed length, or at the
        length of the fidelity inputs."""
        if isinstance(site.k_len, int) and self.keeps_every_key(site, site.k_len):
            return (f"window {self.window} keeps all {site.k_len} keys and the model's length is fixed at "
                    f"{site.k_len}: this rewrite drops nothing")
        run = site.run_shape
        if run and self.keeps_every_key(site, run[3]):
            return (f"at the fidelity inputs' length ({run[3]} keys) the window keeps every key: "
                    "it drops keys only on longer inputs")
        return None

    def keeps_every_key(self, site: AttentionSite, n: int) -> bool:
        """Whether on n keys the window alone (no stride, dilation or grid) keeps them all."""
        if self.grid is not None or self.stride > 1 or self.dilation > 1:
            return False
        return self.window >= n if self.is_causal(site) else self.window // 2 >= n - 1

    def needs_diagnostics(self) -> bool:
        return self.sinks == "auto" or self.heads == "auto"

    def resolve(self, site: AttentionSite, diag: SiteDiagnostics | None) -> tuple["Sparse", str]:
        """sinks=auto / heads=auto made concrete from this site's diagnostics: head
        statistics, and the probabilities to measure what the pattern would drop."""
        if not diag:
            raise UserError(f"sparse: no attention probabilities for site {site.id} to choose sinks/heads from")
        stats = diag.stats
        notes, changes = [], {}
        if self.sinks == "auto":
            received = np.mean([h.first_tokens for h in stats], axis=0) if stats else np.zeros(1)
            n = 0
            while n < len(received) and received[n] > self.sink_threshold:
                n += 1
            found = sorted({j for h in stats for j in h.sinks})
            notes.append(f"sink tokens {list(range(n)) or 'none'} kept (mean received attention > "
                         f"{self.sink_threshold:g}; per-head sinks found at {found or 'none'})")
            changes["sinks"] = str(n)
        if self.heads == "auto":
            p = diag.probs  # [B, H, Tq, Tk]
            kept = dataclasses.replace(self, **changes, heads="all").pattern(site).visible(p.shape[-1])[-p.shape[2]:]
            rows = p.sum(-1) > 0.5
            dropped = [float((p[:, h] * ~kept).sum(-1)[rows[:, h]].mean()) for h in range(p.shape[1])]
            dense = [h for h, m in enumerate(dropped) if m > self.dense_threshold]
            notes.append(f"heads {dense or 'none'} kept dense (attention the pattern drops per head "
                         f"{[round(m, 3) for m in dropped]} vs {self.dense_threshold:g})")
            changes.update(heads="all", dense_heads=tuple(dense) or None)
        return dataclasses.replace(self, **changes), "; ".join(notes)

    def is_causal(self, site: AttentionSite) -> bool:
        return site.causal is True if self.causal == "auto" else self.causal == "true"

    def pattern(self, site: AttentionSite) -> Pattern:
        """The pairs these (concrete) options keep at `site`."""
        if self.routing is not None:
            return Pattern("routing", self.is_causal(site), self.window, 1,
                           selection=Selection("routing", 0, clusters=self.routing, size=self.size or 0))
        if self.content:
            kind = "topk" if self.pyramid is None else "pyramid"
            return Pattern(kind, self.is_causal(site), self.window, self.content_block(site), sinks=int(self.sinks),
                           selection=Selection(kind, self.topk or 1, self.levels, self.pyramid or 0))
        if self.grid is not None:
            (kh, kw), (gh, gw) = self.kernel, self.grid_shape
            prefix = (site.run_shape[2] - gh * gw) if site.run_shape else None
            return Pattern("grid", False, kh, gw, sinks=prefix or 0, kernel=(kh, kw), grid=(gh, gw),
                           shift=self.border == "shift")
        causal = self.is_causal(site)
        w, sinks, dense = self.window, int(self.sinks), tuple(self.dense_heads or ())
        if self.stride > 1:
            return Pattern("stride", causal, w, self.stride, sinks=sinks, dense_heads=dense)
        span = w if causal else 2 * (w // 2) + 1
        b = self.block or (64 if span >= 128 else max(8, span // 2))
        kind = "shift" if self.border == "shift" and not causal else "window"
        return Pattern(kind, causal, w, b, sinks=sinks, dilation=self.dilation, dense_heads=dense)

    def form(self, site: AttentionSite, diag: SiteDiagnostics | None = None) -> Form:
        concrete, note = self.resolve(site, diag) if self.needs_diagnostics() else (self, "")
        if self.content:
            return concrete._content_form(site, note)
        if concrete.dense_heads and max(concrete.dense_heads) >= site.heads:
            raise UserError(f"sparse: dense head {max(concrete.dense_heads)} does not exist ({site.heads} heads)")
        notes = [n for n in (self.coverage_note(site), note) if n]
        if not site.normaliser.is_softmax:
            notes.insert(0, f"{site.normaliser.kind} normaliser kept")
        return Form(pattern=concrete.pattern(site), normaliser=site.normaliser, notes=tuple(notes))


    def _content_form(self, site: AttentionSite, note: str) -> Form:
        pattern = self.pattern(site)
        tk = site.k_len if isinstance(site.k_len, int) else (site.run_shape[3] if site.run_shape else None)
        if self.routing is not None:
            return Form(pattern=pattern, normaliser=site.normaliser, notes=tuple(self._routing_notes(site, tk)))
        if tk is not None and pattern.block > tk and site.cache is None:  # a step's cache grows past it
            raise UserError(f"sparse: block {pattern.block} is larger than the sequence ({tk} keys at site {site.id})")
        notes = [n for n in (note,) if n]
        if self.pyramid is not None and self.topk is None:  # topk from the budget at the site's length
            if tk is None:
                raise UserError(f"sparse: pyramid with budget needs site {site.id}'s length; give topk=K")
            nbk, f = -(-tk // pattern.block), self.budget or 0.25
            k = max(1, int((f * nbk - pattern.forced_count()) // (pattern.selection.pyramid + 1)))
            pattern = dataclasses.replace(pattern, selection=dataclasses.replace(pattern.selection, topk=k))
            notes.append(f"budget {f:g} at {tk} keys: topk={k} blocks per level")
        if tk is not None and pattern.kept_blocks(-(-tk // pattern.block)) == -(-tk // pattern.block):
            notes.append(f"at {tk} keys every block is kept ({-(-tk // pattern.block)} blocks of {pattern.block}): "
                         "this rewrite drops nothing at that length")
        if not site.normaliser.is_softmax:
            notes.insert(0, f"{site.normaliser.kind} normaliser kept")
        return Form(pattern=pattern, normaliser=site.normaliser, notes=tuple(notes))


    def _routing_notes(self, site: AttentionSite, tk: int | None) -> list[str]:
        notes = [] if site.normaliser.is_softmax else [f"{site.normaliser.kind} normaliser kept"]
        if tk is not None:
            n = min(tk, self.size or -(-tk // self.routing))
            notes.append(f"{self.routing} clusters of {n} keys at {tk} keys" + (
                ": every cluster holds every key, this rewrite drops nothing" if n >= tk else ""))
        notes.append("routing is computed as dense scores masked to the clusters: no FLOPs saved yet")
        return notes


def _pair(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in str(text).lower().split("x")]
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
        return parts[0], parts[1]
    except ValueError:
        raise UserError(f"sparse: bad value {text!r} for {what} (expected HxW, e.g. 7x7)") from None
