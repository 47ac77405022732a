"""stream: a decoder step whose cache stays S + W tokens long, however long it runs
(StreamingLLM: attention sinks plus a recent window).

    stream:sinks=S,window=W[,positions=original|cache][,target=own|onnx|ort|auto]

Each site attends as `sparse:window=W,sinks=S` with a causal window: a query sees the
first S tokens and the W most recent ones (itself included). The step's `present`
key/values keep exactly those: the S sink slots, then the W most recent tokens in order
(each step drops the oldest window entry), so `present` has S + W positions once the
sequence is that long, and the generation loop feeds it back unchanged. While a
sequence fits in S + W tokens nothing is dropped and the step is exact; after that it is
the sink + window approximation.

positions=original keeps each token's rotary position (the position ids the loop
feeds). positions=cache is StreamingLLM's re-indexing: positions count within the cache,
so a query at index c in it sees sink j at distance c − j however many tokens were
dropped. Window keys are at the same distance in both (the window is contiguous); only
the sink scores change, computed with the query rotated back by the dropped count
(patterns/rotary.py reads the rotary's frequencies from the graph; a model without a
rotary embedding on Q is skipped with the reason). Both are exact while nothing is dropped.

target=onnx|ort computes the window with a runtime's own op (ONNX Attention opset 25 with
left_window_size, ONNX Runtime's GroupQueryAttention with local_window_size; sinks=0, as
neither keeps sink tokens), the cache capped the same way; auto times both at the site's
shape and keeps the faster (backends/onnx/stream_ops.py); own (default) is attn-opt's
lowering in standard ops. A site an op cannot take is skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attn_opt.patterns.form import STREAM_TARGETS, Form, Pattern, StreamCache, form_skip_reason
from attn_opt.patterns.rotary import rotary
from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option


@dataclass(frozen=True)
class Stream(Pass):
    name: ClassVar[str] = "stream"
    why: ClassVar[str] = "a fixed-size sink + window KV cache for decoder steps (StreamingLLM)"
    once: ClassVar[bool] = True
    sets_pattern: ClassVar[bool] = True
    sinks: int = option(4, "first tokens every query sees and the cache keeps", low=0)
    window: int | None = option(None, "recent tokens each query sees and the cache keeps (required)", low=1)
    positions: str = option("original", "rotary positions of cached tokens", choices=("original", "cache"))
    target: str = option("own", "who computes the window: attn-opt's own ONNX lowering, ONNX Attention-25, ORT "
                                "GroupQueryAttention, or the faster of the two ops (auto; the ops need sinks=0)",
                         choices=STREAM_TARGETS)

    def __post_init__(self):
        if self.window is None:
            raise UserError("stream: window=W is required (e.g. stream:sinks=4,window=1024)")
        if self.target in ("onnx", "ort") and self.sinks:
            raise UserError(f"stream: target={self.target} computes the window with one op that keeps no sink tokens: "
                            "give sinks=0 (or target=own|auto)")

    def skip_reason(self, site) -> str | None:
        if site.cache is None:
            return "not a decoder step's attention: its keys/values are not a cache input concatenated with new ones"
        if site.cache.present_key is None or site.cache.present_value is None:
            return "the step does not return this site's cache"
        if site.cache.static_past:
            return (f"its cache input {site.cache.past_key} has a static length: a streaming cache needs a dynamic "
                    "past-length axis (re-export with one)")
        if self.positions == "cache" and self.sinks and isinstance(why := rotary(site.q.value, site.head_dim), str):
            return f"positions=cache re-indexes rotary positions: {why}"
        return form_skip_reason(site)

    def form(self, site, diag=None) -> Form:
        pattern = Pattern("window", True, self.window, 1, sinks=self.sinks)
        limit = self.sinks + self.window
        notes = [f"cache kept to {self.sinks} sink + {self.window} recent positions ({limit} in all): exact while a "
                 f"sequence fits in {limit} tokens, the sink + window approximation after that"]
        rot = None
        if self.positions == "cache":
            if self.sinks:
                rot = rotary(site.q.value, site.head_dim)
                notes.append("positions within the cache: sink scores use the query turned back by the dropped count "
                             f"(rotary ω read from the graph, d/2 = {len(rot.inv_freq)})")
            else:
                notes.append("positions=cache is positions=original without sinks (window distances are the same)")
        if self.target == "auto" and self.sinks:
            notes.append("target=auto: the windowed ops keep no sink tokens, so attn-opt's own lowering (sinks > 0)")
        target = "own" if self.target == "auto" and self.sinks else self.target
        return Form(pattern=pattern, normaliser=site.normaliser,
                    stream=StreamCache(self.sinks, self.window, rot, target),
                    notes=tuple(notes))
