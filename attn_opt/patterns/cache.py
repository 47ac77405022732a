"""The KV cache of a decoder-step site: K and V are Concat(past, new) along the sequence
axis, `past` a graph input and the Concat's result a graph output (`present`), which the
generation loop feeds back as the next step's past.

Where the structure no longer shows the pair, the exporters' naming convention does
(`present_by_name`): after `fuse` the Concat is inside the fused op (a leftover Concat
may still read the past for a Shape), and Optimum's merged decoder returns the cache
from an `If` on `use_cache_branch`; both keep Optimum's `past_key_values.N.key` ->
`present.N.key`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from attn_opt.core.graph import Value

_COPIES = ("Identity", "Cast")
# fused attention ops that read a past cache and return the present one: (past_key, past_value) input indices
PAST_INPUTS = {"Attention": (4, 5), "com.microsoft.GroupQueryAttention": (3, 4),
               "com.microsoft.MultiHeadAttention": (6, 7)}


@dataclass(frozen=True)
class Cache:
    past_key: str
    past_value: str
    present_key: str | None  # None: the step does not return its cache
    present_value: str | None
    static_past: bool = False  # the past length is fixed by the graph's input shape

    def to_json(self) -> dict:
        return {"past_key": self.past_key, "past_value": self.past_value, "present_key": self.present_key,
                "present_value": self.present_value, "static_past": self.static_past}

    def describe(self) -> str:
        out = f"{self.present_key} / {self.present_value}" if self.present_key else "not returned"
        return f"{self.past_key} / {self.past_value} -> {out}"


def _back(v: Value) -> Value:
    while v.producer is not None and v.producer.op in _COPIES:
        v = v.producer.input(0)
    return v


def _source(v: Value) -> Value | None:
    """The graph input a past tensor is, through copies and Concats with empty tensors
    (a cache object filled from inputs)."""
    for _ in range(8):
        v = _back(v)
        if v.is_input:
            return v
        n = v.producer
        if n is None or n.op != "Concat":
            return None
        full = [i for i in n.inputs if i is not None and not (i.const is not None and i.const.size == 0)]
        if len(full) != 1:
            return None
        v = full[0]
    return None


past_source = _source  # the graph input a cache Concat's past operand is


def _present(v: Value, depth: int = 3) -> Value | None:
    """The graph output carrying `v`: itself, or through copies and the Slice/Concat of a
    capped cache (stream keeps sinks + a recent window of it)."""
    if v.is_output:
        return v
    if depth == 0:
        return None
    for u in v.users:
        if u.op in _COPIES + ("Slice", "Concat") and (found := _present(u.outputs[0], depth - 1)) is not None:
            return found
    return None


def _split(v: Value) -> tuple[Value, Value | None] | None:
    """(past input, present output) where `v` is Concat(past, new) on the sequence axis, or
    the present key/value output of an ONNX Attention op that reads a past cache."""
    v = _back(v)
    n = v.producer
    if n is not None and n.op in PAST_INPUTS and v in n.outputs[1:3]:  # present_key, present_value
        past = n.input(PAST_INPUTS[n.op][n.outputs.index(v) - 1])
        past = _source(past) if past is not None else None
        return (past, _present(v)) if past is not None else None
    if n is None or n.op != "Concat" or len([i for i in n.inputs if i is not None]) != 2:
        return None
    if n.attrs.get("axis") not in (2, -2):
        return None
    past = _source(n.input(0))
    return (past, _present(v)) if past is not None else None


def new_part(v: Value) -> tuple[Value, Value] | None:
    """(past graph input, new tensor) of a cache Concat `v` (through copies), or None."""
    v = _back(v)
    n = v.producer
    if n is None or n.op != "Concat" or _split(v) is None:
        return None
    return _source(n.input(0)), n.input(1)


def cache_of(k: Value, v: Value) -> Cache | None:
    """The cache of a site whose keys and values are `k` and `v` (before any repeat_kv)."""
    ks, vs = _split(k), _split(v)
    if ks is None or vs is None:
        return None
    static = any(p.shape is not None and len(p.shape) == 4 and isinstance(p.shape[2], int) for p in (ks[0], vs[0]))
    return Cache(ks[0].name, vs[0].name, ks[1].name if ks[1] is not None else None,
                 vs[1].name if vs[1] is not None else None, static)


# (past input, present output) names, as the exporters write them: Optimum / transformers
# (`past_key_values.0.key` -> `present.0.key`), onnxruntime-genai and ORT's own tools
# (`past_key_0` -> `present_key_0`, `past_0` -> `present_0`)
_CONVENTIONS = ((re.compile(r"^past_key_values(?=[._])"), "present"), (re.compile(r"^past(?=[._])"), "present"))


def present_by_name(past, outputs) -> str | None:
    """The graph output that returns the cache input `past` by the exporters' naming
    convention: same rank and dtype, its name the past's with `past_key_values` / `past`
    turned into `present`; None where no output is named so."""
    by_name = {o.name: o for o in outputs}
    for pattern, repl in _CONVENTIONS:
        name = pattern.sub(repl, past.name, count=1)
        out = by_name.get(name)
        if name != past.name and out is not None and out.rank == past.rank and out.dtype == past.dtype:
            return name
    return None


def cache_pairs(gv) -> list[tuple[str | None, str]]:
    """Every (present output, past input) of a decoder step, in the order of its inputs:
    each Concat(past, new) on the sequence axis reading a graph input, or a fused op's
    past/present, where the result is a graph output; then every rank-4 past input the
    structure did not pair, by name (`present_by_name`); None where neither finds the
    output that returns it."""
    found: dict[str, str | None] = {}
    for n in gv.nodes:
        if n.region:  # a cache is read where the model's graph takes and returns it (patterns/regions.py)
            continue
        if n.op == "Concat" and n.attrs.get("axis") in (2, -2):
            outs = n.outputs[:1]
        elif n.op in PAST_INPUTS:  # a fused step: past in, present out
            outs = [o for o in n.outputs[1:3] if o is not None]
        else:
            continue
        for out in outs:
            if (split := _split(out)) is not None:
                past, present = split
                if found.get(past.name) is None:  # a returned present wins over a Concat left for its Shape
                    found[past.name] = present.name if present is not None else None
    taken = {p for p in found.values() if p is not None}
    for v in gv.inputs:
        if found.get(v.name) is None and v.rank == 4 and "past" in v.name.lower():
            name = present_by_name(v, [o for o in gv.outputs if o.name not in taken])
            if name is not None or v.name in found:
                found[v.name] = name
                taken.add(name)
    order = {v.name: i for i, v in enumerate(gv.inputs)}
    return [(found[p], p) for p in sorted(found, key=lambda p: order.get(p, 0))]
