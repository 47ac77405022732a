"""The latent form in ONNX (passes/latent.py): K/V projections through one low-rank latent.

    c = x · W_down                         one MatMul for both projections
    K = c · W_up,k (+ bias), V = c · W_up,v  in place of each factorised projection's MatMul

On a decoder step the cache of each factorised projection becomes the latent's:
c_all = Concat(past_latent [B, 1, P, R], c), returned as the present latent, and the
attention reads K/V up-projected from c_all (reshaped to [B, Hkv, P + T, d]) where it read
Concat(past, new), or, absorbed (`Latent.absorb`), computes in the latent space: scores
(q·W_ukᵀ)·[c, 1]ᵀ (beside the kept rotated dims' own scores) and P·[c, 1] then W_uv per
head; the replaced cache inputs/outputs leave the graph, the new ones are named after
them (…value → …latent) and take their place in the input/output lists.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from attn_opt.backends.onnx.edit import LOW_PRECISION, SiteEdit, find_node
from attn_opt.core.errors import NotSupported
from attn_opt.patterns.form import Latent


def latent_name(name: str) -> str:
    """The latent cache tensor's name, after the value cache's it replaces."""
    if "value" in name:
        return "latent".join(name.rsplit("value", 1))
    return f"{name}.latent"


def emit_latent(e: SiteEdit, lat: Latent) -> str | None:
    site, graph = e.site, e.model.graph
    projs = {w: find_node(e.model, p.node) for w, p in (("k", lat.k), ("v", lat.v))}
    low = LOW_PRECISION.get(lat.x.dtype)
    x = lat.x.native
    if low is not None:
        x = e.op("Cast", [x], {"to": ir.DataType.FLOAT})
    c = e.op("MatMul", [x, e.initializer("latent_down", lat.down)])  # [B, T, R]
    ups = {w: u for w, u in (("k", lat.up_k), ("v", lat.up_v)) if u is not None}
    replaced = []
    if not lat.cache:
        for w in ups:
            node = projs[w]
            y = e.op("MatMul", [c, e.initializer(f"latent_up_{w}", ups[w])])
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                y = e.op("Add", [y, node.inputs[2]])
            replaced.append((node.outputs[0], e.op("Cast", [y], {"to": low}) if low is not None else y))
    else:
        absorb_k = lat.absorb and lat.up_k is not None  # K's part of the latent absorbed into the queries too
        up = {w: u for w, u in ups.items() if not lat.absorb or (w == "k" and not absorb_k)}
        replaced, flat, rope = _cached(e, lat, c, up, low, drop_key="k" in ups)
        if lat.absorb:
            dtype = next(v for v in graph.inputs if v.name == site.cache.past_value).dtype or ir.DataType.FLOAT
            qk = _absorbed_scores(e, lat, flat, rope, dtype) if absorb_k else None
            replaced.append((site.output.native, _absorbed(e, lat, flat, qk)))
    first = min((projs["k"], projs["v"]), key=lambda n: _index(graph, n))
    first.graph.insert_before(first, e.nodes)
    ours = {id(n) for n in e.nodes}
    for old, new in replaced:
        keep = [(u.node, u.idx) for u in old.uses() if id(u.node) in ours]  # Q' is computed from Q
        old.replace_all_uses_with(new)
        for node, idx in keep:
            node.replace_input_with(idx, old)
    if lat.cache:
        _drop_replaced_cache(e, ups)
    if lat.rope is not None or lat.absorb:
        graph.sort()  # the rope part and the absorbed attention read Q and K, which come after the projections
    return None


def _absorbed(e: SiteEdit, lat: Latent, flat, qk=None):
    """The site's output with V's up-projection absorbed: P·V_h = (P·[c, 1])·[W_uv,h; b_v,h]
    (the ones column carries Σ_j P_ij for the bias, exact for any normaliser), the
    attention computed on the site's own Q, K and masks (explicit.py), V = the latent;
    `qk`: (Q', K', their width) scoring in the latent space where K's part is absorbed too."""
    import dataclasses

    from attn_opt.backends.onnx.explicit import emit_explicit
    from attn_opt.backends.onnx.lower import normaliser_fn

    site = e.site
    h, hkv, rank = site.heads, site.kv_heads, lat.down.shape[1]
    dv = lat.up_v.shape[1] // hkv
    ones = e.op("ConstantOfShape", [e.op("Concat", [e.op("Shape", [flat], {"end": -1}), e.ints(1)], {"axis": 0})],
                {"value": ir.tensor(np.ones(1, np.float32))})
    v = e.op("Unsqueeze", [e.op("Concat", [flat, ones], {"axis": -1}), e.ints(1)])  # [B, 1, T, R + 1]
    v = e.op("Expand", [v, e.ints(1, hkv, 1, 1)])
    if qk is None:
        q, k, scored = e.bhsd(site.q), e.bhsd(site.k), site
    else:
        q, k, width = qk
        scored = dataclasses.replace(site, head_dim=width)  # the scores' inner width; the scale stays the site's
    o = emit_explicit(e, scored, normaliser_fn(site.normaliser, site, 5), qkv=(q, k, v))  # [B, H, Tq, R + 1]
    per_head = lat.up_v.reshape(rank, hkv, dv).transpose(1, 0, 2)[np.arange(h) // (h // hkv)]  # [H, R, dv]
    w = np.concatenate([per_head, np.zeros((h, 1, dv)) if lat.bias_v is None else
                        lat.bias_v.reshape(hkv, 1, dv)[np.arange(h) // (h // hkv)]], axis=1)  # [H, R + 1, dv]
    out = e.op("MatMul", [o, e.initializer("latent_up_v_heads", w[None])])  # [B, H, Tq, dv]
    out = e.back(out) if e.in_fp32 else out
    return e.fold(out) if site.q.fold else out


def _absorbed_scores(e: SiteEdit, lat: Latent, flat, rope, dtype):
    """(Q', K', width) with K's up-projection absorbed into the queries: per query head h of
    KV group g, q_nope·k_nopeᵀ = (q_nope·[W_uk,g; b_k,g]ᵀ)·[c, 1]ᵀ, so the step scores R + 1
    latent values per cached token instead of up-projecting the cache to K. With partial
    RoPE the kept rotated dims score against their own cache beside them (Q' = [q_rope,
    q̃], K' = [k_rope, [c, 1]]); without, K' = [c, 1] shared by every KV group."""
    site = e.site
    h, hkv, rank = site.heads, site.kv_heads, lat.down.shape[1]
    keep = list(lat.rope or ())
    nope = [i for i in range(site.head_dim) if i not in keep]
    w = lat.up_k.reshape(rank, hkv, len(nope)).transpose(1, 0, 2)  # [Hkv, R, d_nope]
    b = np.zeros((hkv, 1, len(nope))) if lat.bias_k is None else np.asarray(lat.bias_k).reshape(hkv, 1, len(nope))
    absorbed = np.concatenate([w, b], axis=1).transpose(0, 2, 1)[np.arange(h) // (h // hkv)]  # [H, d_nope, R + 1]
    ones = e.op("ConstantOfShape", [e.op("Concat", [e.op("Shape", [flat], {"end": -1}), e.ints(1)], {"axis": 0})],
                {"value": ir.tensor(np.ones(1, np.float32))})
    latent = e.op("Unsqueeze", [e.op("Concat", [flat, ones], {"axis": -1}), e.ints(1)])  # [B, 1, T, R + 1]
    if lat.rope is not None:
        q = _rope_queries(e, lat, dtype)  # [B, H, Tq, d]: the kept dims first, then the others turned back
        q_nope = e.op("Slice", [q, e.ints(len(keep)), e.ints(site.head_dim), e.ints(3)])
        q_tilde = e.op("MatMul", [q_nope, e.initializer("latent_up_k_heads", absorbed[None])])
        if rope is None:  # no rotated dim kept
            return q_tilde, latent, rank + 1
        if dtype != ir.DataType.FLOAT:
            rope = e.op("Cast", [rope], {"to": ir.DataType.FLOAT})
        k = e.op("Concat", [rope, e.op("Expand", [latent, e.ints(1, hkv, 1, 1)])], {"axis": 3})
        q = e.op("Concat", [e.op("Slice", [q, e.ints(0), e.ints(len(keep)), e.ints(3)]), q_tilde], {"axis": 3})
    else:
        q = e.op("MatMul", [e.bhsd(site.q), e.initializer("latent_up_k_heads", absorbed[None])])
        k = latent
    return q, k, len(keep) + rank + 1


def _index(graph, node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return -1


def _cached(e: SiteEdit, lat: Latent, c, ups: dict, low, drop_key: bool) -> list:
    """The latent cache of a step: a new input and output beside the ones it replaces;
    (old cache Concat output, K/V up-projected from the whole latent) pairs for `ups`, and
    the latent [B, T, R] in float32, and the kept rotated K dims' own cache (partial RoPE;
    else None). `drop_key`: K's cache is replaced too (K in the latent)."""
    site, graph, cache = e.site, e.model.graph, e.site.cache
    past_v = next(v for v in graph.inputs if v.name == cache.past_value)
    dims = list(past_v.shape) if past_v.shape is not None else ["batch", None, "past_sequence", None]
    rank = lat.down.shape[1]
    dtype = past_v.dtype or ir.DataType.FLOAT
    past = ir.Value(name=latent_name(cache.past_value), shape=ir.Shape([dims[0], 1, dims[2], rank]),
                    type=ir.TensorType(dtype))
    graph.inputs.insert(list(graph.inputs).index(past_v), past)
    c4 = e.op("Unsqueeze", [c, e.ints(1)])
    if dtype != ir.DataType.FLOAT:
        c4 = e.op("Cast", [c4], {"to": dtype})
    full = e.op("Concat", [past, c4], {"axis": 2})  # [B, 1, P + T, R]
    present = e.op("Identity", [full])
    present.name, present.type = latent_name(cache.present_value), ir.TensorType(dtype)
    present.shape = ir.Shape([dims[0], 1, "total_sequence", rank])
    outs = list(graph.outputs)
    graph.outputs.insert(next(i for i, v in enumerate(outs) if v.name == cache.present_value), present)
    for name in [cache.present_value] + ([cache.present_key] if drop_key else []):  # replaced by the latent
        graph.outputs.pop(next(i for i, v in enumerate(graph.outputs) if v.name == name))
    flat = e.op("Squeeze", [full, e.ints(1)])
    if dtype != ir.DataType.FLOAT:
        flat = e.op("Cast", [flat], {"to": ir.DataType.FLOAT})
        e.in_fp32 = True
    out, rope = [], None
    if drop_key and lat.rope is not None:  # the kept rotated dims' own cache, whether or not K is up-projected
        rope = _rope_cache(e, lat, find_node(e.model, _concat_name(site, "k")), dims, dtype)
    for w, up in ups.items():
        bias = lat.bias_k if w == "k" else lat.bias_v
        y = e.op("MatMul", [flat, e.initializer(f"latent_up_{w}", up)])
        if bias is not None:
            y = e.op("Add", [y, e.const(bias.astype("float32"))])
        d = up.shape[1] // site.kv_heads
        y = e.op("Transpose", [e.op("Reshape", [y, e.ints(0, -1, site.kv_heads, d)])], {"perm": [0, 2, 1, 3]})
        if dtype != ir.DataType.FLOAT:
            y = e.op("Cast", [y], {"to": dtype})
        concat = find_node(e.model, _concat_name(site, w))
        if w == "k" and lat.rope is not None:
            y, q = _partial_rope(e, lat, rope, y, dtype)
            out.append((site.q.value.native, q))
        out.append((concat.outputs[0], y))
    return out, flat, rope


def _rope_cache(e: SiteEdit, lat: Latent, concat, dims, dtype):
    """The kept rotated K dims through their own cache (…key → …key_rope), [B, Hkv, T,
    len(rope)] in the step's dtype; None where no dim is kept."""
    site, graph, cache = e.site, e.model.graph, e.site.cache
    keep = list(lat.rope)
    if not keep:
        return None
    past_k = next(v for v in graph.inputs if v.name == cache.past_key)
    past = ir.Value(name=f"{cache.past_key}_rope", shape=ir.Shape([dims[0], site.kv_heads, dims[2], len(keep)]),
                    type=ir.TensorType(dtype))
    graph.inputs.insert(list(graph.inputs).index(past_k), past)
    new = e.op("Gather", [concat.inputs[1], e.ints(*keep)], {"axis": 3})
    full = e.op("Concat", [past, new], {"axis": 2})
    present = e.op("Identity", [full])
    present.name, present.type = f"{cache.present_key}_rope", ir.TensorType(dtype)
    present.shape = ir.Shape([dims[0], site.kv_heads, "total_sequence", len(keep)])
    at = next(i for i, v in enumerate(graph.outputs) if v.name == latent_name(cache.present_value))
    graph.outputs.insert(at, present)
    return full


def _rope_queries(e: SiteEdit, lat: Latent, dtype) -> ir.Value:
    """The queries [B, H, Tq, d] in float32: the kept rotated dims as they are, then the
    other dims turned back to unrotated (R(−p) q), in that order."""
    site = e.site
    d = site.head_dim
    keep = list(lat.rope)
    nope = [i for i in range(d) if i not in lat.rope]
    q = site.q.value.native  # [B, H, Tq, d] (the pass checked the layout)
    if site.q.perm is not None:
        q = e.op("Transpose", [q], {"perm": list(site.q.perm)})
    if dtype != ir.DataType.FLOAT:
        q = e.op("Cast", [q], {"to": ir.DataType.FLOAT})
    rot = lat.rotary
    pos = e.op("Cast", [rot.positions.native], {"to": ir.DataType.FLOAT})
    pos = e.op("Reshape", [pos, e.op("Concat", [e.shape_dim(pos, 0), e.ints(-1, 1)], {"axis": 0})])  # [B, Tq, 1]
    angle = e.op("Mul", [e.op("Unsqueeze", [pos, e.ints(1)]), e.const(rot.angles().astype("float32"))])
    half = d // 2
    x1 = e.op("Slice", [q, e.ints(0), e.ints(half), e.ints(-1)])
    x2 = e.op("Slice", [q, e.ints(half), e.ints(d), e.ints(-1)])
    rotated_half = e.op("Concat", [e.op("Neg", [x2]), x1], {"axis": -1})
    plain = e.op("Sub", [e.op("Mul", [q, e.op("Cos", [angle])]), e.op("Mul", [rotated_half, e.op("Sin", [angle])])])
    q_parts = ([e.op("Gather", [q, e.ints(*keep)], {"axis": 3})] if keep else []) + \
        [e.op("Gather", [plain, e.ints(*nope)], {"axis": 3})]
    return e.op("Concat", q_parts, {"axis": 3}) if len(q_parts) > 1 else q_parts[0]


def _partial_rope(e: SiteEdit, lat: Latent, rope, k_nope, dtype):
    """(K', Q'): the kept rotated K dims from their own cache, then K's other dims from the
    latent; Q's kept dims as they are, its other dims turned back to unrotated, in the same
    order, so Q'·K'ᵀ = q_rope·k_rope + q_nope·k_nope."""
    site = e.site
    k = e.op("Concat", [rope, k_nope], {"axis": 3}) if rope is not None else k_nope
    q2 = _rope_queries(e, lat, dtype)
    if dtype != ir.DataType.FLOAT:
        q2 = e.op("Cast", [q2], {"to": dtype})
    if site.q.perm is not None:
        inverse = [list(site.q.perm).index(i) for i in range(4)]
        q2 = e.op("Transpose", [q2], {"perm": inverse})
    return k, q2


def _concat_name(site, which: str) -> str:
    from attn_opt.patterns.cache import new_part  # noqa: F401  (the same structure detection read)

    v = getattr(site, which).value
    for _ in range(10):
        n = v.producer
        if n is None:
            break
        if n.op == "Concat":
            return n.name
        v = n.input(0)
    raise ValueError(f"no cache Concat for {which.upper()} of {site.id}")


def _drop_replaced_cache(e: SiteEdit, ups: dict) -> None:
    """The cache inputs/outputs the latent replaced leave the graph (their nodes first)."""
    graph, cache = e.model.graph, e.site.cache
    pairs = [(cache.past_value, cache.present_value)] + ([(cache.past_key, cache.present_key)] if "k" in ups else [])
    RemoveUnusedNodesPass()(e.model)
    latent = next(v for v in graph.inputs if v.name == latent_name(cache.past_value))
    for past, _ in pairs:
        v = next(v for v in graph.inputs if v.name == past)
        _sizes_from(v, latent)
        RemoveUnusedNodesPass()(e.model)
        if not v.uses():
            graph.inputs.remove(v)
        else:
            raise NotSupported(f"latent: the step reads its cache input {past} other than as the cache "
                               f"({', '.join(u.node.op_type for u in v.uses())}); nothing written")


def _sizes_from(past: ir.Value, latent: ir.Value) -> None:
    """A step that reads the past length from a replaced cache input (HF: Shape(past)[2]
    through the cache's one-input Concat) reads it from the latent cache instead, which
    has the same batch and length axes (0 and 2)."""
    todo = [past]
    while todo:
        v = todo.pop()
        for u in list(v.uses()):
            n = u.node
            if n.op_type in ("Identity", "Cast") or (n.op_type == "Concat" and len(n.inputs) == 1):
                todo.append(n.outputs[0])
            elif n.op_type == "Shape" and not n.attributes and all(_reads_axes(w, {0, 2, -2, -4})
                                                                   for w in n.outputs[0].uses()):
                n.replace_input_with(0, latent)


def _reads_axes(use, axes: set) -> bool:
    """A use of a Shape that only Gathers constant indices in `axes`."""
    n = use.node
    if n.op_type != "Gather" or use.idx != 0:
        return False
    t = ir.convenience.get_const_tensor(n.inputs[1])
    return t is not None and set(t.numpy().reshape(-1).tolist()) <= axes
