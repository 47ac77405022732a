"""The attention record every pass works from, and the reason record for a miss."""

from __future__ import annotations

from dataclasses import dataclass, field

from attn_opt.patterns.cache import Cache
from attn_opt.patterns.form import SOFTMAX, Normaliser, Pattern
from attn_opt.core.graph import Node, Value

MASK_KINDS = ("none", "causal", "additive", "boolean")
MASKED = -1e4  # an additive term at or below this hides the key (HF uses finfo.min, older code -1e4)


@dataclass(frozen=True)
class Operand:
    """A tensor entering attention. `perm` maps `value` to [B, H, S, D] with one
    Transpose; `packed` means `value` is [B, S, H*D] (heads not split yet)."""

    value: Value
    perm: tuple[int, ...] | None = None
    packed: bool = False
    repeated: bool = False  # `value` holds the kv heads; the graph repeats them to H (GQA)
    fold: int | None = None  # `value` is 3-D [B*H, S, D] (after perm): heads folded into the batch
    streams: int | None = None  # `value` is 5-D [B, N, H, S, D] (after perm): N streams merged into the batch
    factor: "Value | None" = None  # multiplies `value` (after perm) first: a per-head score factor folded into Q


@dataclass(frozen=True)
class Projection:
    """A Linear that feeds (q, k, v) or reads (o) the attention: y = x @ W (+ b)."""

    x: Value
    weight: Value
    bias: Value | None
    node: str
    transposed: bool = False  # weight stored as [out, in] (Gemm transB / torch Linear)


@dataclass(frozen=True)
class AttentionSite:
    id: str
    rule: str  # which rule found it ("eager", "sdpa", "onnx-attention", ...)
    kind: str  # "self" or "cross"
    q: Operand
    k: Operand
    v: Operand
    output: Value  # O = P V, [B, H, Tq, dv] unless the fused op says otherwise
    scale: float | None
    mask: str  # one of MASK_KINDS
    causal: bool | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    q_len: int | None
    k_len: int | None
    nodes: tuple[str, ...]
    additive: tuple[Value, ...] = ()  # additive mask/bias terms, summed
    bool_mask: Value | None = None  # boolean mask
    bool_keep: bool = True  # True: attend where the boolean mask is True
    mask_value: float | None = None  # fill value of masked scores
    probs: Value | None = None  # the Softmax output, where the graph has one
    probs_shared: bool = False  # the probabilities are used outside the attention too
    layer: int | None = None
    scope: str | None = None
    projections: dict[str, Projection] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    run_shape: tuple[int, ...] | None = None  # (B, H, Tq, Tk, D) seen on the sample inputs
    mask_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # mask value name -> run shape
    pattern: Pattern | None = None  # the pairs a form attn-opt gave it keeps (None: dense)
    normaliser: Normaliser = SOFTMAX  # how scores become weights
    hidden: Value | None = None  # the hidden state Q is projected from (through any ops), if one
    softcap: float | None = None  # scores soft-capped as c·tanh(S/c) after the scale, before masks
    window: int | None = None  # a causal sliding window its own mask implies (keys per query)
    quantized: bool = False  # QDQ rounds its scores or probabilities inside (a rewrite computes them in float)
    folded_terms: tuple[str, ...] = ()  # additive terms added while the scores were 3-D [B*H, Tq, Tk]
    regrouped_terms: tuple[str, ...] = ()  # added while the scores were viewed [B, W, H, Tq, Tk] (Swin's shifted windows)
    regroup: int | None = None  # W of that view: the batch axis split as [B/W, W]
    filled_terms: tuple[str, ...] = ()  # additive terms added after the boolean mask's fill (fill + term may be -inf)
    zero_hidden_rows: bool = False  # a row its mask hides completely gives zeros (masked again after the softmax)
    negated_terms: tuple[str, ...] = ()  # additive terms the scores subtract (s − 1e30·mask): a term counts as −term
    cache: Cache | None = None  # a decoder step's KV cache: K/V = Concat(past input, new), returned as present
    region: str = ""  # the graph it is in: "" the model's, else a path (patterns/regions.py)
    blocked: str | None = None  # why no pass may rewrite it (a function whose calls differ), if so

    @property
    def out_projection(self) -> "Projection | None":
        """The linear that reads the site's output with heads merged, where its weight is a
        constant (what a LoRA correction is added to)."""
        o = self.projections.get("o")
        return o if o is not None and o.weight.const is not None else None

    @property
    def gqa(self) -> bool:
        return self.heads is not None and self.kv_heads is not None and self.kv_heads < self.heads

    def to_json(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "heads": self.heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "causal": self.causal, "mask": self.mask,
            "scale": None if self.scale is None else float(self.scale),
            "q_len": self.q_len, "k_len": self.k_len, "layer": self.layer, "scope": self.scope,
            "rule": self.rule, "nodes": list(self.nodes),
            "projections": {k: p.node for k, p in self.projections.items()},
            "notes": list(self.notes), "softcap": self.softcap, "window": self.window,
            "cache": self.cache.to_json() if self.cache else None, "region": self.region, "blocked": self.blocked,
            "form": {"pattern": self.pattern.to_json() if self.pattern else None, "normaliser": self.normaliser.to_json()},
        }


@dataclass(frozen=True)
class NearMiss:
    """A softmax (or attention-like op) that did not become a site, and why."""

    reason: str
    nodes: tuple[str, ...]
    rule: str = ""

    def to_json(self) -> dict:
        return {"nodes": list(self.nodes), "reason": self.reason, "rule": self.rule}


class Miss(Exception):
    """Raised inside a rule's check: the anchor is not a site, for `reason`."""

    def __init__(self, reason: str, *nodes: Node):
        super().__init__(reason)
        self.reason = reason
        self.nodes = tuple(n.name for n in nodes)
