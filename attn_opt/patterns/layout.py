"""Operand layouts: follow Transposes back to the tensor that holds Q, K or V, and
see through the repeat_kv expansion of grouped-query attention."""

from __future__ import annotations

from attn_opt.patterns.site import Operand
from attn_opt.core.graph import Value

_SHAPE_ONLY = ("Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze")


def weight_like(v: Value | None, depth: int = 3) -> bool:
    """A compile-time constant, possibly transposed/reshaped (a weight, not an activation)."""
    if v is None:
        return False
    if v.const is not None:
        return True
    n = v.producer  # a dequantized constant (QDQ models) is a weight too
    return depth > 0 and n is not None and n.op in _SHAPE_ONLY + ("DequantizeLinear",) \
        and weight_like(n.input(0), depth - 1)


def _swap_last(rank: int) -> list[int]:
    p = list(range(rank))
    p[-1], p[-2] = p[-2], p[-1]
    return p


def _reshape_transpose_reshape(v: Value) -> tuple[Value, bool] | None:
    """x (4-D) → Reshape(3-D) → Transpose(0,2,1) → Reshape(4-D): x with its last two axes
    swapped. torch's SDPA decomposition (dynamo exporter, opset < 23) transposes K so;
    with enable_gqa the first Reshape also folds repeat_kv's Expand (then x is the kv
    heads, and the flag says so)."""
    r2 = v.producer
    if r2 is None or r2.op != "Reshape":
        return None
    t = r2.input(0).producer
    if t is None or t.op != "Transpose" or list(t.attrs.get("perm", [])) != [0, 2, 1]:
        return None
    r1 = t.input(0).producer
    if r1 is None or r1.op != "Reshape":
        return None
    if r1.input(0).rank == 4:
        return r1.input(0), False
    src = _expand_source(r1.input(0))
    return (src, True) if src is not None else None


def operand(v: Value, transposed: bool) -> Operand:
    """`v` as it enters a MatMul (as Kᵀ when `transposed`), traced back through layout ops."""
    rank = v.rank or 4
    perm = _swap_last(rank) if transposed else list(range(rank))
    cur = v
    for _ in range(8):
        n = cur.producer
        if n is not None and n.op == "Transpose" and sorted(n.attrs.get("perm", [])) == list(range(rank)):
            p_in = list(n.attrs["perm"])  # a permutation of the axes (a damaged file may hold anything)
            perm = [p_in[i] for i in perm]
            cur = n.input(0)
            continue
        if rank == 4 and (hit := _reshape_transpose_reshape(cur)) is not None:
            p_in = _swap_last(4)
            perm = [p_in[i] for i in perm]
            cur, repeated = hit
            if repeated:
                return Operand(cur, None if perm == list(range(rank)) else tuple(perm), repeated=True)
            continue
        break
    return Operand(cur, None if perm == list(range(rank)) else tuple(perm))


def unexpanded(op: Operand) -> Operand | None:
    """The key/value heads before repeat_kv (Unsqueeze → Expand → Reshape, or
    RepeatInterleave on the head axis), where `op` is such an expansion."""
    v = op.value
    n = v.producer
    if n is None or op.perm not in (None,):
        return None
    if n.op == "RepeatInterleave" and n.attrs.get("dim") in (1, -3):
        return Operand(n.input(0), None, repeated=True)
    if n.op != "Reshape":
        return None
    src = _expand_source(n.input(0))
    return Operand(src, None, repeated=True) if src is not None else None


def _expand_source(v: Value) -> Value | None:
    """x where v = Expand|Tile(Unsqueeze(x, axis=2)) (a 5-D repeat of the kv heads)."""
    e = v.producer
    if e is None or e.op not in ("Expand", "Tile"):
        return None
    if e.op == "Tile":  # TorchScript's repeat_interleave: Tile only the new axis
        reps = e.input(1).const if e.input(1) is not None else None
        if reps is None or [int(r) for i, r in enumerate(reps.reshape(-1)) if i != 2] != [1] * (reps.size - 1):
            return None
    u = e.input(0).producer
    if u is not None and u.op == "Unsqueeze" and u.input(0).rank in (4, None):
        axes = u.attrs.get("axes")
        if axes is None and u.input(1) is not None and u.input(1).const is not None:
            axes = u.input(1).const.reshape(-1).tolist()
        if axes is not None and list(axes) in ([2], [-3]):
            return u.input(0)
    return None
