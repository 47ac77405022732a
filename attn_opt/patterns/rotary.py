"""Rotary position embeddings (RoPE) on a site's queries, read from the graph.

    x_rot = x · cos(p ω) + rotate_half(x) · sin(p ω),  rotate_half(x) = [−x₂, x₁]

with the angle table Cos(Concat(f, f)), f = positions × ω, ω the inverse frequencies (a
constant of d/2 values), as every Hugging Face rotary model exports it (the tables may
be scaled, Unsqueezed, Cast on the way). Rotations compose, R(a) R(b) = R(a + b), so a
rotated query is moved to another position by one more rotation: what `stream`'s
positions=cache needs (backends/onnx/stream.py). Where the graph does not have this form
(no rotary, interleaved pairs, a partial rotary that leaves dimensions unrotated) the
reader returns why not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attn_opt.core.graph import Value

_PASS = ("Transpose", "Reshape", "Identity", "Cast", "Contiguous")  # between the rotation and the Q·Kᵀ product
_TABLE = ("Unsqueeze", "Cast", "Mul", "Identity", "Expand", "Slice", "Gather", "Reshape", "Transpose", "Squeeze")


@dataclass(frozen=True)
class Rotary:
    inv_freq: np.ndarray  # [d/2] ω: dimension i and i + d/2 turn by p·ω_i
    positions: Value  # the float positions the graph multiplies by ω (for each query)

    def angles(self) -> np.ndarray:
        """ω for every dimension, [d] (rotate_half pairs i with i + d/2)."""
        return np.concatenate([self.inv_freq, self.inv_freq]).astype(np.float64)


def _scaled(v: Value) -> Value:
    """Back through ops that keep the rotation's form: layout ops and a multiplication by
    a constant (the softmax scale folded into Q)."""
    for _ in range(6):
        n = v.producer
        if n is None:
            return v
        if n.op in _PASS:
            v = n.input(0)
        elif n.op in ("Mul", "Div") and any(i is not None and i.const is not None and i.const.size == 1
                                             for i in n.inputs):
            v = next(i for i in n.inputs if i is not None and i.const is None)
        else:
            return v
    return v


def _reaches(v: Value, op: str, budget: int = 6):
    """The `op` node `v` is computed from through table ops (scaling, reshapes), or None."""
    for _ in range(budget):
        n = v.producer
        if n is None:
            return None
        if n.op == op:
            return n
        if n.op not in _TABLE:
            return None
        v = next((i for i in n.inputs if i is not None and i.const is None), None)
        if v is None:
            return None
    return None


def _is_rotate_half(v: Value, x: Value) -> bool:
    """`v` = Concat(−x[..., d/2:], x[..., :d/2])."""
    n = v.producer
    if n is None or n.op != "Concat" or len(n.inputs) != 2 or n.input(0) is None or n.input(0).producer is None:
        return False
    neg = n.input(0).producer
    if neg.op != "Neg":
        return False
    halves = [neg.input(0), n.input(1)]
    return all(h is not None and h.producer is not None and h.producer.op == "Slice"
               and _scaled(h.producer.input(0)) is _scaled(x) for h in halves)


def _frequencies(cos_node, head_dim: int):
    """(ω [d/2], positions) from Cos(Concat(f, f)), f = positions × ω; or a reason."""
    cat = cos_node.input(0).producer
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or cat.input(0) is not cat.input(1):
        return "the angle table is not Concat(f, f) (interleaved pairs, or a partial rotary)"
    f = cat.input(0)
    for _ in range(4):  # f = positions · ω (Mul), or ω·positions as a MatMul, then layout ops
        n = f.producer
        if n is None:
            break
        if n.op in ("Mul", "MatMul"):
            consts = [i for i in n.inputs if i is not None and i.const is not None]
            if len(consts) == 1 and consts[0].const.size * 2 == head_dim:
                pos = next(i for i in n.inputs if i is not None and i is not consts[0])
                return np.asarray(consts[0].const, np.float64).reshape(-1), pos
            break
        if n.op not in ("Transpose", "Reshape", "Cast", "Identity"):
            break
        f = n.input(0)
    return f"no constant of {head_dim // 2} inverse frequencies multiplies the positions"


def rotary(q: Value, head_dim: int) -> Rotary | str:
    """The RoPE that rotated `q` (a site's query operand), or why it is not one attn-opt reads."""
    v = _scaled(q)
    n = v.producer
    if n is None or n.op != "Add" or len(n.inputs) != 2:
        return "its queries are not rotated by a rotary embedding (no x·cos + rotate_half(x)·sin before Q·Kᵀ)"
    terms = {}
    for t in n.inputs:
        m = t.producer if t is not None else None
        if m is None or m.op != "Mul" or len(m.inputs) != 2:
            return "its queries are not rotated by a rotary embedding (no x·cos + rotate_half(x)·sin before Q·Kᵀ)"
        for a, b in ((m.input(0), m.input(1)), (m.input(1), m.input(0))):
            for op in ("Cos", "Sin"):
                node = _reaches(b, op)
                if node is not None and op not in terms:
                    terms[op] = (a, node)
    if set(terms) != {"Cos", "Sin"}:
        return "its queries are not rotated by a rotary embedding (no x·cos + rotate_half(x)·sin before Q·Kᵀ)"
    x, cos_node = terms["Cos"]
    if not _is_rotate_half(terms["Sin"][0], x):
        return "the rotary embedding does not pair dimension i with i + d/2 (rotate_half)"
    got = _frequencies(cos_node, head_dim)
    if isinstance(got, str):
        return got
    return Rotary(*got)
