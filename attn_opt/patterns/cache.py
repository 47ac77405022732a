"""The KV cache of a decoder-step site: K and V are Concat(past, new) along the sequence
axis, `past` a graph input and the Concat's result a graph output (`present`), which the
generation loop feeds back as the next step's past."""

from __future__ import annotations

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


def cache_pairs(gv) -> list[tuple[str | None, str]]:
    """Every (present output, past input) of a decoder step, in the order of its inputs:
    each Concat(past, new) on the sequence axis reading a graph input (None where the
    step does not return the result)."""
    found = {}
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
                found.setdefault(past.name, present.name if present is not None else None)
    order = {v.name: i for i, v in enumerate(gv.inputs)}
    return [(found[p], p) for p in sorted(found, key=lambda p: order.get(p, 0))]
