"""A site under construction: what a rule's check found before shapes are probed."""

from __future__ import annotations

from dataclasses import dataclass, field

from attn_opt.patterns.form import SOFTMAX, Normaliser, Pattern
from attn_opt.patterns.site import Miss, Operand
from attn_opt.core.graph import Node, Value


@dataclass
class Candidate:
    rule: str
    anchor: Node
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    output: Value | None = None
    scores: Value | None = None
    scale_factors: list[tuple[Value, bool]] = field(default_factory=list)
    scale: float | None = None  # known from an attribute
    additive: list[Value] = field(default_factory=list)
    bool_mask: Value | None = None
    bool_keep: bool = True
    fill: Value | None = None
    causal_attr: bool = False
    heads_attr: int | None = None
    kv_heads_attr: int | None = None
    seq_first: bool = False  # packed operands laid out [S, B, E]
    expanded_kv: bool = False  # K/V reach the MatMuls through repeat_kv
    probs: Value | None = None
    probs_shared: bool = False
    covered: list[Node] = field(default_factory=list)
    scope: str | None = None
    notes: list[str] = field(default_factory=list)
    pattern: Pattern | None = None
    normaliser: Normaliser = SOFTMAX
    fill_value: float | None = None  # the mask fill, when a record says it (no fill value to probe)
    quantized: bool = False  # QuantizeLinear/DequantizeLinear round scores or probabilities inside
    unfold: Value | None = None  # the 4-D [B, H, Tq, Tk] view of 3-D scores (heads folded into the batch)
    folded_terms: list[Value] = field(default_factory=list)  # additive terms added to the 3-D scores
    regrouped_terms: list[Value] = field(default_factory=list)  # added to the scores viewed [B/W, W, H, Tq, Tk]
    regroup_open: bool = False  # walking back inside that view (met its view back, not yet its view)
    regroup_view: Value | None = None  # the view [B/W, W, H, Tq, Tk] itself (its shape gives W)
    regroup: int | None = None  # W, where a rewritten site's record says it (no view left to probe)
    q_factor: Value | None = None  # a per-head factor the scores are multiplied by (Swin v2's exp(logit_scale))
    out_view: Value | None = None  # a reshape of a 3-D output [N, Tq, Dv] to [N/H, H, ...]: heads folded with windows (SAM)
    filled_terms: list[Value] = field(default_factory=list)  # additive terms added after the boolean mask's fill
    softcap: float | None = None  # scores soft-capped as c·tanh(S/c) after the scale, before masks
    negated: list[Value] = field(default_factory=list)  # additive terms the scores subtract (s − 1e30·mask)
    sink: Value | None = None  # a column concatenated to the scores before the softmax: per-head sink logits
    sink_last: bool = True  # the sink column comes after the keys (else before them)
    sink_cut: bool = False  # the sink column is sliced off the probabilities before ·V
    zero_rows: bool = False  # the boolean mask zeroes the probabilities again: hidden rows give zeros

    def set_bool_mask(self, cond: Value, keep: bool, fill: Value) -> None:
        if self.bool_mask is not None:
            raise Miss("two boolean masks before the softmax", self.anchor)
        self.bool_mask, self.bool_keep, self.fill = cond, keep, fill
        self.filled_terms = list(self.additive)  # met first walking back: added after the Where, to its fill too
