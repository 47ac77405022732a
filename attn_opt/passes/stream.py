"""stream: a decoder step whose cache stays S + W tokens long, however long it runs
(StreamingLLM: attention sinks plus a recent window).

    stream:sinks=S,window=W[,positions=original|cache][,full_heads=auto|G+G|L:G+L:G][,target=own|onnx|ort|auto]

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
lowering in standard ops. target=ort_window_cache is GroupQueryAttention with its
window-sized cache (sliding_window_cache=1: the op evicts inside, no cap after it), where
the installed ONNX Runtime's schema has that attribute (else refused in one line); auto
does not time it. A site an op cannot take is skipped with the reason.

full_heads: per-head streaming (DuoAttention): the named KV groups keep the full cache and
attend densely, the others stream. The step then takes two caches per site: the full
groups' under the old names (`past_key_values.0.key` -> `present.0.key`, every position,
so the attention mask stays over past + new), the streaming groups' as
`past_key_values.0.key_stream` -> `present.0.key_stream` (S + W positions). auto keeps a
group full where the stream pattern drops more than full_above of its attention on the
calibration inputs (the largest over its query heads); with --calibrate, by DuoAttention's
gates instead (pipeline/stream_gates.py: a per-group mix of dense and streaming outputs
fitted so the model's outputs match, L1 weight gate_l1, kept full above gate_above). A
site whose groups all come out full is skipped with that reason. empty: every group
streams, with the split caches (the old names hold no group but still the full length):
what a layer that streams whole takes in a model whose other layers keep the full cache
(`--budget cache=F`), so the attention mask stays over every position. Each part of the
heads attends over its own cache (backends/onnx/stream_heads.py): a streaming group's step
reads only its sinks + window.
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
                                "GroupQueryAttention (with its window-sized cache: ort_window_cache), or the faster "
                                "of Attention-25 and GroupQueryAttention (auto; the ops need sinks=0)",
                         choices=STREAM_TARGETS)
    full_heads: str | None = option(None, "KV groups that keep the full cache, the others stream",
                                    accepts="auto, empty, or groups G+G (every layer) / L:G+L:G (layer L's group G)")
    full_above: float = option(0.05, "full_heads=auto: a group keeps the full cache when the stream pattern drops "
                               "more than this share of its attention on the calibration inputs", low=0, high=1)
    gate_above: float = option(0.5, "full_heads=auto with --calibrate: a group keeps the full cache when its fitted "
                               "DuoAttention gate ends above this", low=0, high=1)
    gate_l1: float = option(1.0, "full_heads=auto with --calibrate: the L1 weight pulling the gates towards "
                            "streaming, against the output error relative to every group streaming (1: a group "
                            "stays full where it carries more than an average share of that error)", low=0)

    def __post_init__(self):
        if self.window is None:
            raise UserError("stream: window=W is required (e.g. stream:sinks=4,window=1024)")
        if self.target in ("onnx", "ort", "ort_window_cache") and self.sinks:
            raise UserError(f"stream: target={self.target} computes the window with one op that keeps no sink tokens: "
                            "give sinks=0 (or target=own|auto)")
        if self.full_heads is not None:
            if self.target != "own":
                raise UserError(f"stream: full_heads with target={self.target} is not implemented (the runtimes' "
                                "windowed ops cap every head; use target=own)")
            if self.positions == "cache":
                raise UserError("stream: full_heads with positions=cache is not implemented yet (use "
                                "positions=original)")
            self.groups()  # parsed now, so a bad list is refused before anything runs

    def groups(self) -> tuple[tuple[int | None, int], ...] | None:
        """full_heads as (layer or None for every layer, group) pairs; None for auto."""
        if self.full_heads in (None, "auto"):
            return None
        if self.full_heads == "empty":
            return ()
        out = []
        for item in str(self.full_heads).split("+"):
            layer, _, group = item.rpartition(":")
            try:
                pair = (int(layer) if layer else None, int(group))
            except ValueError:
                raise UserError(f"stream: full_heads={self.full_heads}: expected auto, or KV groups like 0+3 or "
                                "1:0+2:1 (layer:group)") from None
            if pair[1] < 0 or (pair[0] is not None and pair[0] < 0):
                raise UserError(f"stream: full_heads={self.full_heads}: groups and layers are >= 0")
            out.append(pair)
        return tuple(out)

    def needs_diagnostics(self) -> bool:
        return self.full_heads == "auto"

    def fits_gates(self) -> bool:
        """With --calibrate, full_heads=auto fits DuoAttention's gates (pipeline/stream_gates.py)."""
        return self.full_heads == "auto"

    def full_groups(self, site, diag=None) -> tuple[tuple[int, ...], str]:
        """The site's KV groups that keep the full cache, and why (per-head streaming)."""
        pairs = self.groups()
        if pairs is not None:
            full = sorted({g for layer, g in pairs if layer is None or layer == site.layer})
            if full and full[-1] >= site.kv_heads:
                raise UserError(f"stream: full_heads names KV group {full[-1]}, but site {site.id} has "
                                f"{site.kv_heads} KV groups")
            return tuple(full), f"KV groups {full or 'none'} keep the full cache (full_heads={self.full_heads})"
        if diag is not None and diag.gates is not None:
            full = tuple(int(g) for g in range(site.kv_heads) if diag.gates[g] > self.gate_above)
            return full, (f"KV groups {list(full) or 'none'} keep the full cache: DuoAttention gates "
                          f"{[round(float(a), 3) for a in diag.gates]} vs {self.gate_above:g}, fitted so the model's "
                          "outputs match on the calibration inputs")
        if not diag:
            raise UserError(f"stream: no attention probabilities for site {site.id} to choose full_heads=auto from")
        from attn_opt.patterns.diagnostics import outside_stream

        p = diag.probs
        per_group = outside_stream(p, self.sinks, self.window).reshape(site.kv_heads, -1).max(1)
        full = tuple(int(g) for g in range(site.kv_heads) if per_group[g] > self.full_above)
        note = (f"KV groups {list(full) or 'none'} keep the full cache: attention the stream pattern drops, per "
                f"group (its largest head) {[round(float(m), 3) for m in per_group]} vs {self.full_above:g}, on "
                f"{p.shape[-1]} keys")
        if p.shape[-1] <= self.sinks + self.window:
            note += (f" (the calibration inputs' {p.shape[-1]} keys fit in sinks + window: nothing falls outside; "
                     "give longer inputs to choose from)")
        return full, note

    def diag_skip_reason(self, site, diag=None) -> str | None:
        """Said where every KV group of the site keeps the full cache: nothing streams."""
        if self.full_heads is None:
            return None
        full, note = self.full_groups(site, diag)
        return f"every KV group keeps the full cache, nothing streams here ({note})" \
            if len(full) == site.kv_heads else None

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
        limit = self.sinks + self.window
        if self.full_heads is not None:
            full, why = self.full_groups(site, diag)
            per = site.heads // site.kv_heads
            dense = tuple(h for g in full for h in range(g * per, (g + 1) * per))
            pattern = Pattern("window", True, self.window, 1, sinks=self.sinks, dense_heads=dense)
            notes = [why, f"the other groups' cache kept to {self.sinks} sink + {self.window} recent positions "
                     f"({limit} in all) as {site.cache.past_key}_stream / {site.cache.present_key}_stream; the full "
                     "groups' keeps its names and every position"]
            return Form(pattern=pattern, normaliser=site.normaliser,
                        stream=StreamCache(self.sinks, self.window, None, full_groups=full), notes=tuple(notes))
        pattern = Pattern("window", True, self.window, 1, sinks=self.sinks)
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
                    stream=StreamCache(self.sinks, self.window, rot, target=target),
                    notes=tuple(notes))
