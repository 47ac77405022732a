"""Per-head streaming (stream:...,full_heads=) in ONNX: each site's cache split in two
and the attention computed per part, so a streaming group's step really reads only its
sinks + window.

`split_cache` turns the cache Concat(past, new) of every KV group into two: the full
groups' Concat(past, new[:, full]) (the past input and present output keep their names,
every position) and the streaming groups' Concat(past_stream, new[:, rest]), returned
capped at sinks + window (`<past>_stream` in, `<present>_stream` out). `emit_split`
computes the full groups' query heads densely over the first (the site's masks as they
are) and the streaming groups' over the second: at most sinks + window + new keys, the
mask terms cut to the same key columns (the first `sinks`, then the most recent ones), the
window read in the streamed keys' own positions (the window is contiguous, so distances
are the same as in the full sequence). The old Concat becomes the groups reassembled at
the full length (each streaming group's dropped positions as zeros) for any reader left
after the rewrite (a Shape, say); the sweep removes it where none is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import LOW_PRECISION, SiteEdit
from attn_opt.backends.onnx.explicit import emit_explicit
from attn_opt.patterns.form import Form, Pattern, StreamCache
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.errors import NotSupported
from attn_opt.core.ir.onnx_model import SPLIT_KEY

_COPIES = ("Identity", "Cast")


@dataclass(frozen=True)
class Part:
    """One part of a split cache: its KV groups and the K/V tensors [B, len(groups), L, D]
    as the cache Concat computes them (L: every position, or sinks + window + new)."""

    groups: tuple[int, ...]
    k: ir.Value
    v: ir.Value
    streams: bool


def limits(site: AttentionSite, form: Form) -> str | None:
    """Why this site's heads cannot be split into full and streaming parts, or None."""
    n = form.normaliser
    if n.calibrated or any(np.ndim(getattr(n, f)) for f in ("bias", "p", "alpha")) or n.heads:
        return (f"per-head streaming splits the heads in two; a normaliser with per-head values "
                f"({n.describe()}) is not split yet")
    for name, op in (("K", site.k), ("V", site.v)):
        if op.packed or op.fold:
            return f"its {name} is not [B, H, S, D] after the cache (packed or heads in the batch)"
    for m in site.additive + ((site.bool_mask,) if site.bool_mask is not None else ()):
        shape = site.mask_shapes.get(m.name) or m.shape
        if shape is not None and len(shape) == 4 and shape[1] not in (1, site.heads):
            return f"mask term {m.name} has {shape[1]} heads, neither 1 nor the site's {site.heads}"
    return None


def capped(e: SiteEdit, x: ir.Value, stream: StreamCache) -> ir.Value:
    """[B, h, L, D] -> the first `sinks` and the last `window` positions (all while L fits)."""
    start = e.op("Max", [e.ints(stream.sinks), e.op("Sub", [e.shape_dim(x, 2), e.ints(stream.window)])])
    head = e.op("Slice", [x, e.ints(0), e.ints(stream.sinks), e.ints(2)])
    return e.op("Concat", [head, e.op("Slice", [x, start, e.ints(2 ** 62), e.ints(2)])], {"axis": 2})


def _source(v: ir.Value) -> ir.Value | None:
    """The graph input `v` is, through copies and Concats with empty tensors."""
    for _ in range(8):
        n = v.producer()
        if n is None:
            return v
        if n.op_type in _COPIES:
            v = n.inputs[0]
            continue
        full = [i for i in n.inputs if i is not None and not (i.const_value is not None and i.const_value.size == 0)]
        if n.op_type != "Concat" or len(full) != 1:
            return None
        v = full[0]
    return None


def _drop_unused(v: ir.Value) -> None:
    """Remove `v`'s producer, and theirs, while nothing reads what they compute."""
    n = v.producer()
    if n is None or any(o.uses() or o.is_graph_output() for o in n.outputs):
        return
    inputs = [i for i in n.inputs if i is not None]
    n.graph.remove(n, safe=True)
    for i in inputs:
        _drop_unused(i)


def _concat_of(v: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """The node `v` comes from through copies, and the copies on the way (last first)."""
    copies = []
    while v.producer() is not None and v.producer().op_type in _COPIES:
        copies.append(v.producer())
        v = v.producer().inputs[0]
    return v.producer(), copies


def split_cache(e: SiteEdit, stream: StreamCache) -> tuple[Part, Part]:
    """Split the site's cache (module docstring); the (full, streaming) parts, each K/V as
    the site's K/V operands read them (through the copies between the cache and them)."""
    c, graph, site = e.site.cache, e.model.graph, e.site
    full = list(stream.full_groups)
    rest = [g for g in range(site.kv_heads) if g not in full]
    inverse = [(full + rest).index(g) for g in range(site.kv_heads)]
    got = {}
    for kv, past_name, present_name in (("k", c.past_key, c.present_key), ("v", c.past_value, c.present_value)):
        past = next(v for v in graph.inputs if v.name == past_name)
        out = next(v for v in graph.outputs if v.name == present_name)
        node, _ = _concat_of(out)
        if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or _source(node.inputs[0]) is not past:
            raise NotSupported(f"stream full_heads: {present_name} is not Concat({past_name}, new) at the top level")
        read, copies = _concat_of(getattr(site, kv).value.native)
        if read is not node:
            raise NotSupported(f"stream full_heads: the attention's {kv.upper()} is not the cache {present_name} "
                               "(through copies)")
        new = node.inputs[1]
        dims = list(past.shape) if past.shape is not None else ["batch", site.kv_heads, "past", "head_dim"]
        dtype = past.type.dtype.numpy() if past.type is not None else np.float32
        past_stream = ir.Value(name=f"{past_name}_stream", type=past.type,
                               shape=ir.Shape([dims[0], len(rest), f"{past_name}_stream_len", dims[3]]))
        graph.inputs.append(past_stream)
        split = json.loads(e.model.metadata_props.get(SPLIT_KEY, "{}"))  # how a feed of the old input splits
        split[past_stream.name] = {"from": past_name, "of": site.kv_heads, "groups": rest,
                                   "cap": [stream.sinks, stream.window]}
        split[past_name] = {"from": past_name, "of": site.kv_heads, "groups": full, "cap": None}
        e.model.metadata_props[SPLIT_KEY] = json.dumps(split)
        past.shape = ir.Shape([dims[0], len(full), dims[2], dims[3]])
        kept = e.op("Concat", [past, e.op("Gather", [new, e.ints(*full)], {"axis": 1})], {"axis": 2})
        streamed = e.op("Concat", [past_stream, e.op("Gather", [new, e.ints(*rest)], {"axis": 1})], {"axis": 2})
        present_stream = capped(e, streamed, stream)
        got[kv] = [_copied(e, x, copies) for x in (kept, streamed)]  # as the attention read the cache
        grouped = _reassembled(e, kept, streamed, stream, len(rest), inverse, dtype)
        node.graph.insert_before(node, e.nodes)
        e.nodes = []
        # the old Concat(past, new) on the sequence axis becomes Concat(grouped, nothing) on the head axis
        was = node.inputs[0]
        node.replace_input_with(0, grouped)
        _drop_unused(was)
        while was is not past and was.producer() is not None:  # copies of the past others may read: fewer heads now
            was.shape = None
            was = next(i for i in was.producer().inputs if i is not None and not (
                i.const_value is not None and i.const_value.size == 0))
        node.replace_input_with(1, e.op("Slice", [grouped, e.ints(0), e.ints(0), e.ints(1)]))
        node.graph.insert_before(node, e.nodes)
        e.nodes = []
        node.attributes["axis"] = ir.AttrInt64("axis", 1)
        i = next(i for i, v in enumerate(graph.outputs) if v is out)
        out.name = f"{present_name}__full"
        kept.name, kept.type = present_name, out.type
        kept.shape = ir.Shape([dims[0], len(full), "total", dims[3]])
        graph.outputs[i] = kept
        present_stream.name, present_stream.type = f"{present_name}_stream", out.type
        present_stream.shape = ir.Shape([dims[0], len(rest), "cache_len", dims[3]])
        graph.outputs.append(present_stream)
    return (Part(tuple(full), got["k"][0], got["v"][0], False), Part(tuple(rest), got["k"][1], got["v"][1], True))


def _copied(e: SiteEdit, x: ir.Value, copies: list[ir.Node]) -> ir.Value:
    """`x` through the same Casts the attention's operand went through after the cache."""
    for n in reversed(copies):
        if n.op_type == "Cast":
            x = e.op("Cast", [x], {"to": n.attributes["to"].as_int()})
    return x


def _reassembled(e, kept, streamed, stream: StreamCache, n_rest: int, inverse, dtype) -> ir.Value:
    """Every group at the full length, in order, each streaming group's dropped positions
    as zeros: what the old Concat's other readers (if any) see."""
    gap = e.op("Sub", [e.shape_dim(kept, 2), e.shape_dim(streamed, 2)])  # positions dropped so far
    zeros = e.op("ConstantOfShape", [e.op("Concat", [e.shape_dim(streamed, 0), e.ints(n_rest), gap,
                                                     e.shape_dim(streamed, 3)], {"axis": 0})],
                 {"value": ir.tensor(np.zeros(1, dtype))})
    sinks = e.op("Slice", [streamed, e.ints(0), e.ints(stream.sinks), e.ints(2)])
    recent = e.op("Slice", [streamed, e.ints(stream.sinks), e.ints(2 ** 62), e.ints(2)])
    padded = e.op("Concat", [sinks, zeros, recent], {"axis": 2})
    return e.op("Gather", [e.op("Concat", [kept, padded], {"axis": 1}), e.ints(*inverse)], {"axis": 1})


def emit_split(e: SiteEdit, parts: tuple[Part, Part], pattern: Pattern, normaliser_fn: Callable,
               normaliser) -> ir.Value:
    """The site's output [B, H, Tq, Dv]: each part's query heads attend over that part's
    keys (the streaming part with `pattern`, its masks cut to its keys), heads put back in
    order."""
    site = e.site
    per = site.heads // site.kv_heads
    q = e.bhsd(site.q)
    outs, order = [], []
    for part in parts:
        if not part.groups:
            continue
        heads = [h for g in part.groups for h in range(g * per, (g + 1) * per)]
        sub = dataclasses.replace(site, heads=len(heads), kv_heads=len(part.groups))
        k, v = (_operand(e, op, x) for op, x in ((site.k, part.k), (site.v, part.v)))
        keys = _recent_columns(e, k, part.k, pattern.sinks) if part.streams else None
        masks = Masks(site.heads, tuple(heads), keys)
        outs.append(emit_explicit(e, sub, normaliser_fn(normaliser, sub, 5),
                                  qkv=(e.op("Gather", [q, e.ints(*heads)], {"axis": 1}), k, v),
                                  pattern=pattern.sparse_heads() if part.streams else None, masks=masks))
        order += heads
    out = e.op("Concat", outs, {"axis": 1}) if len(outs) > 1 else outs[0]
    if order == list(range(site.heads)):
        return out
    return e.op("Gather", [out, e.ints(*[order.index(h) for h in range(site.heads)])], {"axis": 1})


def _operand(e: SiteEdit, op, x: ir.Value) -> ir.Value:
    """A cache part `x` (the layout of the site's operand before its perm) as [B, h, S, D]
    in the dtype the lowering computes in."""
    if e.in_fp32 and op.value.dtype in LOW_PRECISION:
        x = e.op("Cast", [x], {"to": ir.DataType.FLOAT})
    return e.op("Transpose", [x], {"perm": list(op.perm)}) if op.perm else x


def _recent_columns(e: SiteEdit, k: ir.Value, raw: ir.Value, sinks: int):
    """mask [.., Tk] -> its columns for the streamed keys: the first `sinks`, then the last
    (streamed length − sinks)."""
    n = e.op("Max", [e.op("Sub", [e.shape_dim(raw, 2), e.ints(sinks)]), e.ints(0)])

    def keys(x: ir.Value) -> ir.Value:
        width = e.op("Shape", [x], {"start": -1})
        start = e.op("Sub", [width, n])
        head = e.op("Slice", [x, e.ints(0), e.ints(sinks), e.ints(-1)])
        cut = e.op("Concat", [head, e.op("Slice", [x, start, e.ints(2 ** 62), e.ints(-1)])], {"axis": -1})
        return cut

    return keys


@dataclass(frozen=True)
class Masks:
    """How a part of a site's heads reads the site's mask terms: a per-head term ([B, H,
    Tq, Tk]) gathered to `heads` of the site's `of`, and `keys` (a function of a term, or
    None) to keep only the part's key columns (a term that broadcasts over the keys, one
    column, is read as it is)."""

    of: int
    heads: tuple[int, ...]
    keys: Callable | None = None
