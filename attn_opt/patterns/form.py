"""The form of an attention site, as data.

A pass turns a site into a `Form`; a backend lowers it (backends/onnx, backends/torch,
backends/triton); the NumPy reference (patterns/reference.py) evaluates it; a rewritten
site's record (patterns/record.py) carries its pattern and normaliser, so the next pass reads them back and
forms compose on one site.

    Form = Pattern (which (query, key) pairs are kept; None = dense; with a Selection
                    the kept key blocks are chosen from Q and K themselves)
         × Normaliser (how scores become weights: softmax, softplus, sink logit,
                       redistribute, relu, sigmoid)
         + Gate (an epilogue: the output times a sigmoid gate)
         | Collapse (the weight algebra: Q·Kᵀ and V·O products folded per head)
         | fused (the same function as one attention op)
    (+ StreamCache: a decoder step's returned cache capped at sinks + window)
    (+ lora: a low-rank correction of the output projection, fitted by calibration)
    | Latent (K/V projections through one low-rank latent c; a decoder step caches c)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attn_opt.patterns.cache import PAST_INPUTS

NORMALISERS = ("softmax", "softplus", "logit", "redistribute", "relu", "sigmoid")
PATTERN_KINDS = ("window", "shift", "stride", "grid")  # every backend declares each (patterns/capability.py)
SELECTION_KINDS = ("topk", "pyramid", "routing")  # content-based patterns: Pattern.selection (every backend declares each)


@dataclass(frozen=True)
class Selection:
    """The score-dependent slot of a Pattern: which key blocks each query block keeps,
    chosen from Q and K at run time (HiP-style block top-k).

    Keys and queries are cut into blocks of `Pattern.block` tokens. Per query block a and
    key block c (per batch row and kv head: one selection per KV group),
        score(a, c) = scale · Σ_{heads h of the group} mean(Q_h[block a]) · mean(K[block c])
    (means over the block's tokens inside the sequence). Forced blocks come first: the
    blocks holding the first `Pattern.sinks` tokens and the local band (the blocks within
    ceil((W//2)/block) of a, or ceil((W−1)/block) before it when causal; W =
    `Pattern.window`, 0 = none). A causal query block never ranks a key block after it;
    it stands at the key block of its last query (queries are the last Tq of Tk positions:
    on a decoder step, the end of the cache, so the step selects blocks of its past).
    levels L > 1 (HiP's coarse-to-fine search): groups of 2^(L-1) blocks are scored first
    (their keys' mean against the query block's), the topk best kept, each split in two
    halves scored the same way, the topk best kept, down to single blocks: only those
    compete for the non-forced places (causal and mask rules as for blocks).
    Each query block keeps C = min(blocks, topk + F) blocks (F: the forced blocks of an
    interior block): forced ones, then the highest scores, ties to the lowest block index
    in every backend; a key block the site's masks hide from every query of the block
    (padding, a causal mask given as a term) ranks below every block they do not hide,
    so no kept block is spent on keys nobody sees. Query i then sees key j iff j's block is kept for i's block (and the
    site's masks and causality allow it), so with C = all blocks the form is exact.

    pyramid (PSA): the ranking goes on past C: the next topk·2 blocks are kept at level 1,
    the next topk·4 at level 2, …, topk·2^L at level L, the rest dropped (each level costs
    topk·block keys). At level l a block's keys come in groups of 2^l, each group one
    pooled key: over its n visible keys (inside the sequence, kept by the site's per-key
    mask) k̄ = mean k, v̄ = mean v, and its logit scale·q·k̄ + mean(additive terms) + log n,
    so it stands for the n keys it replaces; softmax runs over all of a row's keys and
    pooled keys together. Bidirectional sites with per-key masks, softmax.

    routing (Routing Transformer): per batch row and kv head, C centroids by k-means on the
    sequence's unit-normalised queries (the group's heads) and keys: centroid c starts as
    the mean of the c-th of C equal runs of keys, then `iterations` Lloyd steps (nearest
    centroid by dot product, ties to the lowest index; a centroid left empty keeps its
    place; keys the site's masks hide from every query move nothing). Each centroid's
    cluster is its `size` (default ceil(Tk / C)) keys most similar to it (hidden keys
    last, ties to the lowest index): balanced, so the cost is bounded. Query i sees key j
    iff j is in the cluster of i's nearest centroid, or within the window W (as a window
    pattern's band). Exact when every cluster holds every key (size >= Tk)."""

    kind: str  # SELECTION_KINDS
    topk: int  # key blocks kept per query block beyond the forced ones (pyramid: at level 0)
    levels: int = 1  # HiP's coarse-to-fine levels (1: score the blocks directly)
    pyramid: int = 0  # PSA's pooling levels L (kind "pyramid")
    clusters: int = 0  # routing: k-means centroids C
    size: int = 0  # routing: keys per cluster (0: ceil(Tk / C))
    iterations: int = 3  # routing: Lloyd iterations on the sequence

    def __post_init__(self):
        if self.kind not in SELECTION_KINDS:
            raise ValueError(f"unknown selection kind {self.kind!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Pattern:
    """Which keys query i sees, and the block layout the banded lowerings use.

    window: |i - j| <= W//2 (bidirectional) or 0 <= i - j < W (causal), every d-th key
    with dilation d; shift: exactly W keys per query, moved inward at the ends (neighborhood
    attention); stride: `block` consecutive queries share one window of W keys; grid: a
    kh x kw neighborhood on a gh x gw token grid after `sinks` prefix tokens. The first
    `sinks` tokens stay visible to every query (causal: to the queries after them); heads
    in `dense_heads` keep every pair."""

    kind: str  # "window", "shift", "stride", "grid"
    causal: bool
    window: int
    block: int  # queries per block of the banded layout
    sinks: int = 0
    dilation: int = 1
    kernel: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    shift: bool = False  # grid: neighborhoods moved inward at the borders
    dense_heads: tuple[int, ...] = ()
    selection: Selection | None = None  # content-based: kind == selection.kind, the blocks chosen from Q, K

    def __post_init__(self):
        if self.selection is not None:
            if self.kind != self.selection.kind:
                raise ValueError(f"pattern kind {self.kind!r} with a {self.selection.kind!r} selection")
        elif self.kind not in PATTERN_KINDS:
            raise ValueError(f"unknown pattern kind {self.kind!r}")

    @property
    def table(self) -> str:
        """The capability table its kind is declared in (patterns/capability.py)."""
        return "pattern" if self.selection is None else "selection"

    def sink_blocks(self) -> int:
        """Key blocks forced for the sinks (a content pattern)."""
        return -(-self.sinks // self.block)

    def band_blocks(self) -> int:
        """Key blocks the local band reaches on each side (causal: before) of a query
        block (a content pattern; -1: no band)."""
        if self.window <= 0:
            return -1
        return -(-(self.window - 1 if self.causal else self.window // 2) // self.block)

    def forced_count(self) -> int:
        """F: the forced key blocks of an interior query block."""
        r = self.band_blocks()
        return self.sink_blocks() + (0 if r < 0 else r + 1 if self.causal else 2 * r + 1)

    def kept_blocks(self, nbk: int) -> int:
        """C: key blocks each query block keeps (at full resolution) out of `nbk`."""
        return min(nbk, self.selection.topk + self.forced_count())

    def level_counts(self, nbk: int) -> list[int]:
        """Key blocks per level (0: full keys, l: pooled by 2^l) each query block keeps."""
        counts, left = [], nbk
        for level in range(self.selection.pyramid + 1):
            n = min(left, self.kept_blocks(nbk) if level == 0 else self.selection.topk * 2 ** level)
            counts.append(n)
            left -= n
        return counts

    def forced(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Query block a always keeps key block c (broadcasting)."""
        f = c < self.sink_blocks()
        r = self.band_blocks()
        if r >= 0:
            f = f | (((a - c >= 0) & (a - c <= r)) if self.causal else (np.abs(a - c) <= r))
        return f

    @property
    def span(self) -> int:
        """Keys one query's window covers."""
        return self.window if self.causal or self.kind == "stride" else 2 * (self.window // 2) + 1

    @property
    def lo(self) -> int:
        """Block j gathers keys from j·block − lo (window and shifted forms)."""
        if self.kind in ("grid", "stride"):
            return 0
        if self.kind == "shift":
            return self.span - 1
        return self.window - 1 if self.causal else self.window // 2

    @property
    def keys(self) -> int:
        """Keys gathered per query block."""
        if self.kind == "grid":
            return self.kernel[0] * self.grid[1]
        if self.kind == "stride":
            return self.window
        if self.kind == "shift":
            return self.block + 2 * (self.span - 1)
        return self.block + self.span - 1

    def sparse_heads(self) -> "Pattern":
        return dataclasses.replace(self, dense_heads=())

    def window_visible(self, i: np.ndarray, j: np.ndarray, t: int) -> np.ndarray:
        """Pairs the window part keeps (sinks aside), for query positions i and key
        positions j that broadcast, at sequence length t."""
        d = i - j
        if self.kind == "stride":
            off = self.block - self.window if self.causal else (self.block - self.window) // 2
            start = np.maximum(np.minimum(i // self.block * self.block + off, t - self.window), 0)
            vis = (j >= start) & (j < start + self.window)
        elif self.kind == "shift":
            start = np.maximum(np.minimum(i - self.window // 2, t - self.span), 0)
            vis = (j >= start) & (j < start + self.span)
        elif self.kind == "window" and self.causal:
            vis = (d >= 0) & (d < self.window * self.dilation)
        elif self.kind == "window":
            vis = np.abs(d) <= self.window // 2 * self.dilation
        else:
            raise ValueError(f"window_visible: {self.kind} is not a window")
        if self.dilation > 1:
            vis = vis & (d % self.dilation == 0)
        return vis & (d >= 0) if self.causal else vis

    def visible(self, t: int) -> np.ndarray:
        """[t, t] boolean: the pairs this pattern keeps at sequence length t (the reference
        every lowering is tested against)."""
        if self.selection is not None:
            raise ValueError("a content pattern's pairs depend on Q and K: patterns/reference.py: selected_visible")
        if self.kind == "grid":
            return self._grid_visible(t)
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        vis = self.window_visible(i, j, t)
        if self.sinks:
            vis = vis | ((j < self.sinks) & ((j <= i) if self.causal else True))
        return vis

    def _grid_visible(self, t: int) -> np.ndarray:
        (kh, kw), (gh, gw), n = self.kernel, self.grid, t - self.grid[0] * self.grid[1]
        g = np.arange(gh * gw)
        r, c = g // gw, g % gw
        if self.shift:
            rs, cs = np.clip(r - kh // 2, 0, gh - kh), np.clip(c - kw // 2, 0, gw - kw)
            near = ((r[None] >= rs[:, None]) & (r[None] < rs[:, None] + kh)
                    & (c[None] >= cs[:, None]) & (c[None] < cs[:, None] + kw))
        else:
            near = (np.abs(r[:, None] - r[None]) <= kh // 2) & (np.abs(c[:, None] - c[None]) <= kw // 2)
        vis = np.ones((t, t), bool)  # prefix tokens (class, registers) see and are seen by all
        vis[n:, n:] = near
        return vis

    def banded_pairs(self, t: int) -> int:
        """Score pairs the banded (or gathered) lowering computes at length t (padding included)."""
        if self.selection is not None:
            nb = -(-t // self.block)
            return nb * self.block * sum(n * self.block >> lv for lv, n in enumerate(self.level_counts(nb)))
        if self.kind == "grid":
            n = t - self.grid[0] * self.grid[1]
            return n * t + self.grid[0] * self.grid[1] * (self.keys + n)
        nb = -(-t // self.block)
        return nb * self.block * (self.keys + self.sinks)

    def describe(self) -> str:
        if self.selection is not None:
            sel = self.selection
            s = f"top-{sel.topk} key blocks of {self.block} per query block (mean-pooled Q·K)"
            if sel.pyramid:
                s += f", then {sel.pyramid} pooled level(s): {sel.topk}·2^l blocks at level l, keys pooled by 2^l"
            s += f", local band {self.window}" if self.window else ""
            return s + (f", {self.sinks} sink tokens" if self.sinks else "") + (", causal" if self.causal else "")
        if self.kind == "grid":
            return (f"{self.kernel[0]}x{self.kernel[1]} neighborhood on a {self.grid[0]}x{self.grid[1]} grid"
                    f"{' (shifted at borders)' if self.shift else ''}, {self.sinks} global prefix token(s)")
        kind = {"window": "causal window" if self.causal else "window", "shift": "shifted window",
                "stride": f"strided window (queries in groups of {self.block})"}[self.kind]
        s = f"{kind} {self.window}" + (f" dilated by {self.dilation}" if self.dilation > 1 else "")
        s += f", {self.sinks} sink tokens" if self.sinks else ""
        return s + (f", heads {list(self.dense_heads)} dense" if self.dense_heads else "")

    def to_json(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        if self.selection is None:
            d.pop("selection")
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "Pattern | None":
        if not d:
            return None
        d = dict(d)
        for k in ("kernel", "grid", "dense_heads"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        if d.get("selection") is not None:
            d["selection"] = Selection(**d["selection"])
        return cls(**d)


AFFINE = ("temperature", "offset", "gain")  # gain_h · N(temperature_h · S + offset_h), any normaliser
TUNED = {"softplus": ("kappa", "p"), "logit": ("bias",), "redistribute": ("alpha",)}  # and each kind's own


@dataclass(frozen=True)
class Normaliser:
    """How scores become weights, over the keys a row may see (0 elsewhere; a row that
    sees no key gives zeros):

    softmax       exp(S_ij) / Σ_j exp(S_ij)
    softplus      φ(λ_i S_ij) / Σ_j φ(λ_i S_ij), φ = softplus, λ_i = log n_i / log n_train;
                  then A^p / Σ A^p
    logit         exp(S_ij) / (exp(b_h) + Σ_j exp(S_ij)), `bias` = b_h per head
    redistribute  softmax, then the mass on the first `sinks` keys times α and the rest
                  renormalised, in `heads` (default all)
    relu          ReLU(S_ij) / n_i
    sigmoid       σ(S_ij + b): b per head from `bias`, or −log n_i when `bias` is None
    (n_i: keys row i sees.)

    A *calibrated* normaliser (`temperature` set) has per-head parameters that
    calibration fits (pipeline/calibrate.py), lowered as graph initializers / module
    parameters rather than constants: the affine gain_h · N(temperature_h · S + offset_h)
    of every kind, and the kind's own (`TUNED`): softplus's length exponent κ_h (λ_i =
    (log n_i / log n_train)^κ_h, n_train = 2 and κ_h = 0 where the pass set none) and power
    p_h; the sink logit b_h; redistribute's α_h (1 on heads it leaves alone)."""

    kind: str = "softmax"
    n_train: int | None = None
    p: float | tuple[float, ...] = 1.0
    bias: tuple[float, ...] | None = None
    alpha: float | tuple[float, ...] | None = None
    sinks: int = 1
    heads: tuple[int, ...] | None = None
    temperature: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None
    gain: tuple[float, ...] | None = None
    kappa: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in NORMALISERS:
            raise ValueError(f"unknown normaliser {self.kind!r}")

    @property
    def is_softmax(self) -> bool:
        return self.kind == "softmax" and not self.calibrated

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    def tunable(self) -> tuple[str, ...]:
        """The per-head parameters calibration fits for this kind."""
        return AFFINE + TUNED.get(self.kind, ())

    def values(self, heads: int) -> dict[str, np.ndarray]:
        """Each tunable parameter as [heads] float64: its fitted values, else the ones that
        give this normaliser exactly (the identity calibration starts from)."""
        start = {"temperature": 1.0, "offset": 0.0, "gain": 1.0, "kappa": 1.0 if self.n_train else 0.0}
        if self.kind == "redistribute" and np.ndim(self.alpha) == 0:
            start["alpha"] = np.ones(heads)  # α = 1 leaves a head as it is
            start["alpha"][list(self.heads) if self.heads else slice(None)] = self.alpha
        out = {}
        for name in self.tunable():
            v = getattr(self, name)
            if v is None or (name == "alpha" and np.ndim(v) == 0):
                v = start[name]
            out[name] = np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (heads,)).copy()
        return out

    def calibrate(self, values: dict | None = None, heads: int | None = None) -> "Normaliser":
        """This normaliser with per-head parameters (`values`: name -> [heads]; the identity
        where a name is missing), lowered as parameters calibration can set."""
        h = heads if heads is not None else len(next(iter(values.values())))
        vals = self.values(h) | {k: np.asarray(v, np.float64) for k, v in (values or {}).items()}
        tup = lambda x: tuple(float(v) for v in np.asarray(x).reshape(-1))  # noqa: E731
        changes = {k: tup(vals[k]) for k in self.tunable()}
        if self.kind == "redistribute":
            changes["heads"] = None  # folded into α
        return dataclasses.replace(self, **changes)

    def of_heads(self, heads: list[int], n_heads: int) -> "Normaliser":
        """This normaliser on the subset `heads` of the site's `n_heads` heads, in that order
        (a pattern's dense-heads split computes each part apart): every per-head value taken
        at those heads, redistribute's `heads` renumbered. The lowerings read a calibrated
        normaliser's parameters from the site's whole [n_heads] values, gathered the same way."""
        def pick(v):
            if v is None or np.ndim(v) == 0:
                return v
            return tuple(np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (n_heads,))[list(heads)].tolist())

        changes = {k: pick(getattr(self, k)) for k in ("p", "bias", "alpha", *AFFINE, "kappa")}
        if self.heads is not None:
            changes["heads"] = tuple(i for i, h in enumerate(heads) if h in self.heads)
        return dataclasses.replace(self, **changes)

    def per_head_bias(self, heads: int) -> np.ndarray | None:
        """`bias` as [heads] float64, or None."""
        if self.bias is None:
            return None
        return np.broadcast_to(np.asarray(self.bias, np.float64).reshape(-1), (heads,)).copy()

    def describe(self) -> str:
        tuned = ", calibrated per head" if self.calibrated else ""
        if self.kind == "softplus":
            lam = f"log n_i / log {self.n_train}" if self.n_train else "1"
            return (f"softplus, λ={lam}, p={_num(self.p)}") + tuned
        if self.kind == "logit":
            return f"sink logit b = {np.array2string(np.asarray(self.bias), precision=3)}" + tuned
        if self.kind == "redistribute":
            return f"redistribute α={_num(self.alpha)} over the first {self.sinks} token(s)" + tuned
        if self.kind == "relu":
            return "ReLU(S)/n_i" + tuned
        if self.kind == "sigmoid":
            b = "−log n_i" if self.bias is None else np.array2string(np.asarray(self.bias), precision=3)
            return f"sigmoid σ(S + b), b = {b}, no row normalisation" + tuned
        return "softmax" + tuned

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v != getattr(SOFTMAX, k) or k == "kind"}

    @classmethod
    def from_json(cls, d: dict | None) -> "Normaliser":
        if not d:
            return SOFTMAX
        d = dict(d)
        for k in ("bias", "heads", "temperature", "offset", "gain", "kappa", "p", "alpha"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


def _num(x) -> str:
    return f"{x:g}" if np.ndim(x) == 0 else "per head"


SOFTMAX = Normaliser()


@dataclass(frozen=True, eq=False)
class Gate:
    """O_h ⊙ σ(X W + b) per head (headwise: W is [D, H]) or per element ([D, H·dv]);
    X is the hidden state `source` (a graph value)."""

    mode: str
    weight: np.ndarray
    bias: np.ndarray
    source: Any


@dataclass(frozen=True, eq=False)
class Collapse:
    """Per head W_qk = W̃_q W̃_kᵀ ([D+1, H·(D+1)], X̃ = [X, 1]) read by scores X̃q W_qk X̃kᵀ,
    and/or W_vo = W̃_v W_o ([D+1, H·D]) giving the output projection's result
    Σ_h P_h X̃v W_vo,h (+ its bias). x* are the hidden states (graph values), `o` the
    output projection the V·O collapse replaces."""

    w_qk: np.ndarray | None = None
    xq: Any = None
    xk: Any = None
    w_vo: np.ndarray | None = None
    xv: Any = None
    o: Any = None


@dataclass(frozen=True, eq=False)
class StreamCache:
    """A decoder step's returned cache kept to the first `sinks` positions and the `window`
    most recent ones, in order (the step's attention keeps the same pairs). With
    `rotary` (positions=cache, patterns/rotary.py), a query meets the sink keys at its
    index among the S + W keys it sees rather than at its own position: its scores on them
    use the query turned back by Δ_i = max(0, p_i − (S + W − 1)) rotary positions (p_i
    its position; 0 until tokens are dropped). Window keys keep their distances either way."""

    sinks: int
    window: int
    rotary: Any = None
    target: str = "own"  # STREAM_TARGETS: attn-opt's own lowering, or a runtime's windowed op (sinks = 0)
    # per-head streaming (None: every group capped, the cache keeps its names): the KV groups
    # that keep the full cache, possibly none; their cache keeps the past input's name and
    # the full length, the capped groups' is a second input/output named after it + "_stream"
    full_groups: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class Latent:
    """K and V through one shared low-rank latent (MHA → MLA): c = x · down ([D, R]),
    then each factorised projection reads c instead of x: K = c · up_k (+ its bias),
    V = c · up_v (+ its bias). `k`/`v` are the site's Projection records; `up_k` is None
    where K keeps its own projection (a decoder step whose K is rotated after the
    projection: its cache keeps the rotated K, the "rope part", and only V is in the
    latent). With `cache` (a decoder step), the step caches c ([B, 1, T, R]) in place of
    the factorised K/V and up-projects the whole cache each step. With `rope` (partial
    RoPE, MHA2MLA): only those rotated K dims keep a cache ([B, Hkv, T, len(rope)]); the
    other K dims come unrotated from c (`up_k` holds their columns) and the queries' same
    dims are turned back to unrotated, so scores are q_rope·k_rope + q_nope·k_nope."""

    rank: int
    x: Any  # the hidden state both projections read (a graph value)
    k: Any  # Projection of K
    v: Any  # Projection of V
    down: np.ndarray  # [D, R]
    up_k: np.ndarray | None  # [R, Hkv·d] (None: K not in the latent)
    up_v: np.ndarray  # [R, Hkv·dv]
    bias_k: np.ndarray | None = None  # a bias added after the projection (re-added to the up-projected cache)
    bias_v: np.ndarray | None = None
    cache: bool = False  # a decoder step: the cache holds c
    rope: tuple[int, ...] | None = None  # partial RoPE: the rotated K dims (per kv head) cached as they are
    rotary: Any = None  # with `rope`: the queries' rotary (patterns/rotary.py), to turn the other dims back
    absorb: bool = False  # a step whose K keeps its cache: P·(c·W_uv) computed as (P·c)·W_uv (V never up-projected)


FUSED_TARGETS = ("onnx", "ort", "auto")
STREAM_TARGETS = ("own", "onnx", "ort", "ort_window_cache", "auto")


@dataclass(frozen=True, eq=False)
class Form:
    """What a pass makes of one site."""

    pattern: Pattern | None = None
    normaliser: Normaliser = SOFTMAX
    gate: Gate | None = None
    collapse: Collapse | None = None
    fused: str | None = None  # one attention op: FUSED_TARGETS
    stream: StreamCache | None = None  # a decoder step's cache capped at sinks + window
    latent: Latent | None = None  # K/V projections through a low-rank latent (and the cache, on a step)
    lora: int = 0  # a rank-r correction x·A·B added to the output projection (B = 0 until calibrated)
    notes: tuple[str, ...] = field(default=())  # what the pass chose and why (said in the report)

    def describe(self) -> str:
        """The pattern and normaliser in words ("" for a fused op, a gate, collapsed weights:
        their notes say it)."""
        if self.fused or self.gate is not None or self.collapse is not None or self.latent is not None:
            return ""
        parts = [self.pattern.describe()] if self.pattern else []
        if not self.normaliser.is_softmax or not parts:
            parts.append(self.normaliser.describe())
        return ", ".join(parts)


def break_even(pattern: Pattern, limit: int = 1 << 16) -> int | None:
    """The shortest length at which the band computes fewer score pairs than dense."""
    t = max(2, pattern.keys // 2)
    while t <= limit:
        if pattern.banded_pairs(t) < t * t:
            return t
        t += max(1, t // 16)
    return None


def banded_pays(site, pattern: Pattern) -> tuple[bool, str | None]:
    """Whether the banded lowering computes fewer score pairs than dense at the site's
    shape (as run on the fidelity inputs), and the note that says so when it does not:
    then the lowerings mask the dense scores instead, so a pattern never costs more than
    dense attention."""
    if site.cache is not None:  # a decoder step: queries are the last Tq of Tk positions, which the band does not index
        return False, None
    if pattern.kind == "grid" or not site.run_shape:
        return True, None
    tq, tk = site.run_shape[2], site.run_shape[3]
    if pattern.selection is not None:  # always gathered (exact either way); said where it saves nothing
        nbq, nbk = -(-tq // pattern.block), -(-tk // pattern.block)
        kept = nbq * pattern.block * sum(n * pattern.block >> lv for lv, n in enumerate(pattern.level_counts(nbk)))
        return True, (None if kept < tq * tk else
                      f"selecting costs more than it saves: at the site's length ({tk} keys) the kept blocks hold "
                      f"{kept} score pairs vs {tq * tk} dense, plus the block scores")
    band, dense = pattern.banded_pairs(tk), tq * tk
    if band < dense:
        return True, None
    from_t = break_even(pattern)
    return False, (f"masked dense: at the site's length ({tk} keys) the band would compute {band} score pairs "
                   f"vs {dense} dense, so the pattern masks the dense scores (no FLOPs saved at this length"
                   + (f"; the band pays from about {from_t} tokens: give --input-shape at that length" if from_t
                      else "") + ")")


def selection_reason(site, form: Form) -> str | None:
    """Why a content pattern cannot be computed with this form (every backend's limit)."""
    p = form.pattern
    if p is None or p.selection is None:
        return None
    n = form.normaliser
    if any(isinstance(x, tuple) and len(x) > 1 for x in (n.bias, n.p, n.alpha)):
        return (f"{p.selection.kind}: per-head {n.kind} parameters (a model's own sink logits) are not lowered over "
                "gathered key blocks yet")
    if not p.selection.pyramid:
        return None
    if not form.normaliser.is_softmax:
        return f"pyramid: a pooled key stands for its keys under softmax only (not {form.normaliser.kind})"
    return None


def reads_own_cache(site) -> bool:
    """K/V are the present cache output of the site's own fused op (Attention or
    GroupQueryAttention with past)."""
    return any((n := op.value.producer) is not None and n.op in PAST_INPUTS and n.name in site.nodes
               for op in (site.k, site.v))


def form_skip_reason(site) -> str | None:
    """Why a site cannot take a pattern × normaliser form (the explicit and banded
    lowerings read Q/K/V per head, its masks, and its probabilities alone)."""
    if any(op.packed for op in (site.q, site.k, site.v)):
        return "Q/K/V are not in [B, H, S, D] layout"
    if reads_own_cache(site):
        return "a fused op that reads its own present cache: rewrite the step before fusing it"
    if site.heads is None or site.kv_heads is None or site.head_dim is None or site.scale is None:
        return "heads, head size or scale unknown (the model did not run on sample inputs)"
    if site.probs_shared:
        return "its attention probabilities are used outside the attention too"
    if site.heads % site.kv_heads:
        return f"{site.heads} heads do not group over {site.kv_heads} kv heads"
    for m in site.additive + ((site.bool_mask,) if site.bool_mask is not None else ()):
        shape = site.mask_shapes.get(m.name)
        if shape is None or len(shape) not in (2, 4):
            return f"mask {m.name} has an unsupported or unknown shape {shape}"
    return None
