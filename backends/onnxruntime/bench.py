"""Micro-benchmarks that pick a lowering: time candidate single-op models in ONNX
Runtime's CPU provider on the shapes a site actually runs at."""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from attn_opt.rewriter.ir.onnx import session


def _attention_model(b, h, kvh, t, d) -> onnx.ModelProto:
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, h, t, d])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, kvh, t, d])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, kvh, t, d])
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    node = helper.make_node("Attention", ["q", "k", "v"], ["o"])
    return helper.make_model(helper.make_graph([node], "a", [q, k, v], [o]), opset_imports=[helper.make_opsetid("", 23)])


def _mha_model(b, h, t, d) -> onnx.ModelProto:
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, t, h * d])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, h, t, d])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, h, t, d])
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h)
    return helper.make_model(helper.make_graph([node], "m", [q, k, v], [o]),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _time(model: onnx.ModelProto, repeat: int = 15) -> float:
    sess = session(model)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([int(d) for d in i.shape]).astype(np.float32) for i in sess.get_inputs()}
    sess.run(None, feeds)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@functools.lru_cache(maxsize=64)
def fastest_fused(b: int, h: int, kvh: int, t: int, d: int) -> tuple[str, str]:
    """("onnx" | "ort", why) for one shape."""
    if kvh != h:
        return "onnx", "grouped-query attention: MultiHeadAttention has no kv-head count"
    a = _time(_attention_model(b, h, kvh, t, d))
    m = _time(_mha_model(b, h, t, d))
    pick = "onnx" if a <= m else "ort"
    return pick, f"Attention {a * 1e3:.3f} ms vs MultiHeadAttention {m * 1e3:.3f} ms at B={b} H={h} T={t} d={d}"
