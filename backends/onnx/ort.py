"""What is specific to ONNX Runtime: its `com.microsoft.MultiHeadAttention` op, and the
micro-benchmark that picks between it and ONNX `Attention` by timing single-op models
in ONNX Runtime's CPU provider at the shapes a site actually runs at."""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from attn_opt.backends.onnx.edit import MS, SiteEdit, ensure_opset
from attn_opt.patterns.site import AttentionSite
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


def multi_head_attention(e: SiteEdit, s: AttentionSite, q, k, v, mask, is_bool: bool):
    """MultiHeadAttention wants Q [B, S, H*D] and takes K/V as [B, H, S, D]; bias additive."""
    ensure_opset(e.model, MS, 1)
    q3 = e.op("Reshape", [e.op("Transpose", [q], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])
    if mask is not None and is_bool:  # a row hidden by a boolean mask gives zeros, as with -inf
        mask = e.op("Where", [mask, e.const(np.float32(0)), e.const(np.float32(-np.inf))])
    inputs = [q3, k, v, None, None, mask]
    out3 = e.op("MultiHeadAttention", inputs, {"num_heads": int(s.heads), "scale": float(s.scale),
                                                "unidirectional": int(s.mask == "causal")}, domain=MS)
    out3 = e.op("Where", [e.op("IsNaN", [out3]), e.const(np.float32(0)), out3])  # a row with no key: 0, not NaN
    b_s_h_d = e.op("Reshape", [out3, e.ints(0, 0, int(s.heads), -1)])
    return e.op("Transpose", [b_s_h_d], {"perm": [0, 2, 1, 3]})
