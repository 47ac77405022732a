"""Hand-built single-attention ONNX models and an independent NumPy reference.

The model's inputs are Q, K, V (and a mask), so a test can feed exactly the tensors the
reference formula gets: MatMul(Q, Kᵀ) → Mul(scale) → Add(mask) → Softmax → MatMul(V),
with repeat_kv (Unsqueeze → Expand → Reshape) for GQA.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def attention_model(b=2, h=4, kvh=4, t=37, d=8, mask: str | None = "padding", causal=False,
                    dynamic=False) -> onnx.ModelProto:
    """mask: None, "padding" ([B,1,1,T] additive), "full" ([B,1,T,T] additive) or "bool" ([B,1,1,T])."""
    T = "T" if dynamic else t
    B = "B" if dynamic else b
    inputs = [helper.make_tensor_value_info("q", F, [B, h, T, d]),
              helper.make_tensor_value_info("k", F, [B, kvh, T, d]),
              helper.make_tensor_value_info("v", F, [B, kvh, T, d])]
    nodes, inits = [], [numpy_helper.from_array(np.float32(d ** -0.5), "scale")]
    k, v = "k", "v"
    if kvh != h:
        g = h // kvh
        inits += [numpy_helper.from_array(np.array([2], np.int64), "ax2"),
                  numpy_helper.from_array(np.array([1, 1, g, 1, 1], np.int64), "rep"),
                  numpy_helper.from_array(np.array([0, h, -1, d], np.int64), "bhsd")]
        for name in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [name, "ax2"], [f"{name}5"]),
                      helper.make_node("Tile", [f"{name}5", "rep"], [f"{name}_tiled"]),
                      helper.make_node("Reshape", [f"{name}_tiled", "bhsd"], [f"{name}r"])]
        k, v = "kr", "vr"
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["s"])]
    scores = "s"
    if mask in ("padding", "full"):
        shape = [B, 1, 1, T] if mask == "padding" else [B, 1, T, T]
        inputs.append(helper.make_tensor_value_info("mask", F, shape))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["sm"]))
        scores = "sm"
    elif mask == "bool":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, 1, T]))
        inits.append(numpy_helper.from_array(np.float32(np.finfo(np.float32).min), "fill"))
        nodes.append(helper.make_node("Where", ["mask", scores, "fill"], ["sm"]))
        scores = "sm"
    if causal:
        tri = np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), 1)
        inits.append(numpy_helper.from_array(tri, "causal"))
        nodes.append(helper.make_node("Add", [scores, "causal"], ["sc"]))
        scores = "sc"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", v], ["o"])]
    out = helper.make_tensor_value_info("o", F, [B, h, T, d])
    graph = helper.make_graph(nodes, "attention", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feeds(b=2, h=4, kvh=4, t=37, d=8, mask="padding", pad=5, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal((b, h, t, d)).astype(np.float32),
         "k": rng.standard_normal((b, kvh, t, d)).astype(np.float32),
         "v": rng.standard_normal((b, kvh, t, d)).astype(np.float32)}
    keep = np.ones((b, t), bool)
    keep[-1, t - pad:] = False  # the last row is padded
    if mask == "padding":
        f["mask"] = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    elif mask == "full":
        bias = rng.standard_normal((b, 1, t, t)).astype(np.float32)
        f["mask"] = np.where(keep[:, None, None, :], bias, np.finfo(np.float32).min).astype(np.float32)
    elif mask == "bool":
        f["mask"] = keep[:, None, None, :]
    return f


def reference(f: dict, visible: np.ndarray | bool = True, causal=False, normalise=None) -> np.ndarray:
    """`normalise` (default softmax) over the keys each row may see (pattern ∧ mask); a row
    that sees none gives 0. GQA repeats K/V to the query heads."""
    q, k, v = (f[x].astype(np.float64) for x in "qkv")
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
    t = q.shape[2]
    vis = np.broadcast_to(visible, s.shape).copy()
    m = f.get("mask")
    if m is not None and m.dtype == bool:
        vis &= m
    elif m is not None:
        s = s + m
        vis &= m > -1e4
    if causal:
        vis &= np.tril(np.ones((t, t), bool))
    from attn_opt.patterns import reference as forms

    p = (normalise or forms.softmax)(s, vis)
    return p @ v
