"""What is specific to ONNX Runtime: its `com.microsoft.MultiHeadAttention` and
`com.microsoft.GroupQueryAttention` ops, and the micro-benchmarks that pick between each
and ONNX `Attention` by timing single-op models in ONNX Runtime's CPU provider at the
shapes a site actually runs at (a decoder step: with its past cache, and the nodes each
lowering writes around its op)."""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from attn_opt.backends.onnx.edit import MS, SiteEdit
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.ir.onnx import session


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


@functools.lru_cache(maxsize=1)
def gqa_has_causal() -> bool:
    """The installed ONNX Runtime's GroupQueryAttention has the `causal` attribute (0: bidirectional)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return any(s.name == "GroupQueryAttention" and s.domain == MS and "causal" in s.attributes
               for s in C.get_all_operator_schema())


def _bidirectional_gqa_model(b, h, kvh, t, d) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [b, t, h * d])]
    ins += [helper.make_tensor_value_info(n, f, [b, t, kvh * d]) for n in ("k", "v")]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["o"], domain=MS,
                            num_heads=h, kv_num_heads=kvh, causal=0)
    consts = [helper.make_tensor("seqlens", TensorProto.INT32, [b], [t - 1] * b),
              helper.make_tensor("total", TensorProto.INT32, [], [t])]
    return helper.make_model(helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("o", f, None)], consts),
                             opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)])


@functools.lru_cache(maxsize=64)
def fastest_bidirectional(b: int, h: int, kvh: int, t: int, d: int) -> tuple[str, str]:
    """("onnx" | "gqa", why): Attention vs GroupQueryAttention causal=0 for one shape."""
    a = _time(_attention_model(b, h, kvh, t, d))
    g = _time(_bidirectional_gqa_model(b, h, kvh, t, d))
    pick = "onnx" if a <= g else "gqa"
    return pick, (f"Attention {a * 1e3:.3f} ms vs GroupQueryAttention causal=0 {g * 1e3:.3f} ms at B={b} H={h} "
                  f"kvH={kvh} T={t} d={d}")


def bidirectional_gqa(e: SiteEdit, s: AttentionSite, q, k, v, mask, is_bool: bool):
    """A bidirectional grouped-query site (an encoder) as GroupQueryAttention causal=0, no
    past: seqlens_k = T − 1 for every row, the mask as attention_bias."""
    e.ensure_opset(MS, 1)
    i32 = lambda x: e.op("Cast", [x], {"to": ir.DataType.INT32})  # noqa: E731
    t, batch = e.shape_dim(q, 2), e.shape_dim(q, 0)
    if mask is not None and is_bool:
        mask = e.op("Where", [mask, e.const(np.float32(0)), e.const(np.float32(-np.inf))])
    attrs = {"num_heads": int(s.heads), "kv_num_heads": int(s.kv_heads), "scale": float(s.scale), "causal": 0}
    if s.softcap:
        attrs["softcap"] = float(s.softcap)
    inputs = [_packed(e, q), _packed(e, k), _packed(e, v), None, None,
              i32(e.op("Expand", [e.op("Sub", [t, e.ints(1)]), batch])), i32(e.op("Squeeze", [t, e.ints(0)])),
              None, None, None, mask]
    y3 = e.op("GroupQueryAttention", inputs, attrs, domain=MS)
    y3 = e.op("Where", [e.op("IsNaN", [y3]), e.const(np.float32(0)), y3])  # a row with no key: 0, not NaN
    return e.op("Transpose", [e.op("Reshape", [y3, e.ints(0, 0, int(s.heads), -1)])], {"perm": [0, 2, 1, 3]})


def multi_head_attention(e: SiteEdit, s: AttentionSite, q, k, v, mask, is_bool: bool):
    """MultiHeadAttention wants Q [B, S, H*D] and takes K/V as [B, H, S, D]; bias additive."""
    e.ensure_opset(MS, 1)
    q3 = e.op("Reshape", [e.op("Transpose", [q], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])
    if mask is not None and is_bool:  # a row hidden by a boolean mask gives zeros, as with -inf
        mask = e.op("Where", [mask, e.const(np.float32(0)), e.const(np.float32(-np.inf))])
    inputs = [q3, k, v, None, None, mask]
    out3 = e.op("MultiHeadAttention", inputs, {"num_heads": int(s.heads), "scale": float(s.scale),
                                                "unidirectional": int(s.mask == "causal")}, domain=MS)
    out3 = e.op("Where", [e.op("IsNaN", [out3]), e.const(np.float32(0)), out3])  # a row with no key: 0, not NaN
    b_s_h_d = e.op("Reshape", [out3, e.ints(0, 0, int(s.heads), -1)])
    return e.op("Transpose", [b_s_h_d], {"perm": [0, 2, 1, 3]})


def _step_models(b, h, kvh, s, p, d, masked: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(Attention with past/present, GroupQueryAttention with past/present) as the fused
    lowering writes a decoder step: the same inputs, each with the nodes around its op."""
    t, g = p + s, h // kvh
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [b, h, s, d])]
    ins += [helper.make_tensor_value_info(n, f, [b, kvh, s, d]) for n in ("k", "v")]
    ins += [helper.make_tensor_value_info(n, f, [b, kvh, p, d]) for n in ("pk", "pv")]
    if masked:
        ins.append(helper.make_tensor_value_info("mask", f, [b, 1, s, t]))
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    ints = lambda name, *v: helper.make_tensor(name, TensorProto.INT64, [len(v)], list(v))  # noqa: E731
    causal = helper.make_tensor("causal", TensorProto.BOOL, [s, t], np.tril(np.ones((s, t), bool), p).reshape(-1))
    att = helper.make_node("Attention", ["q", "k", "v", "mask" if masked else "causal", "pk", "pv"], ["o", "ok", "ov"])
    a = helper.make_graph([att], "a", ins, outs, [] if masked else [causal])

    nodes = [n for x in ("q", "k", "v") for n in (
        helper.make_node("Transpose", [x], [f"{x}t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{x}t", "flat"], [f"{x}3"]))]
    nodes.append(helper.make_node(
        "GroupQueryAttention", ["q3", "k3", "v3", "pk", "pv", "seqlens", "total", "", "", "", "mask" if masked else "",
                                "", "", "", "", "", "qlens"], ["o3", "ok", "ov"],
        domain=MS, num_heads=h, kv_num_heads=kvh))
    nodes += [helper.make_node("Reshape", ["o3", "heads"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["o" if not masked else "oq"], perm=[0, 2, 1, 3])]
    if masked:  # the rows every key of which is hidden (fused.py: _hidden_rows)
        nodes += [helper.make_node("ReduceMax", ["mask", "last"], ["rowmax"]),
                  helper.make_node("LessOrEqual", ["rowmax", "hide"], ["dead"]),
                  helper.make_node("CumSum", ["v", "seq1"], ["after"], exclusive=1, reverse=1),
                  helper.make_node("Unsqueeze", ["after", "seq"], ["after5"]),
                  helper.make_node("Expand", ["after5", "group"], ["afterg"]),
                  helper.make_node("Reshape", ["afterg", "by_head"], ["afterh"]),
                  helper.make_node("Mul", ["oq", "seen"], ["sum"]),
                  helper.make_node("Add", ["sum", "afterh"], ["all"]),
                  helper.make_node("Div", ["all", "t"], ["fixed"]),
                  helper.make_node("Where", ["dead", "fixed", "oq"], ["o"])]
    consts = [ints("flat", 0, 0, -1), ints("heads", 0, 0, h, -1), ints("last", -1), ints("seq", 2),
              ints("group", 1, 1, g, 1, 1), ints("by_head", 0, h, -1, d),
              helper.make_tensor("seq1", TensorProto.INT64, [], [2]),
              helper.make_tensor("hide", f, [], [-1e30]), helper.make_tensor("t", f, [], [float(t)]),
              helper.make_tensor("seen", f, [s, 1], [float(p + i + 1) for i in range(s)]),
              helper.make_tensor("seqlens", TensorProto.INT32, [b], [t - 1] * b),
              helper.make_tensor("total", TensorProto.INT32, [], [t]),
              helper.make_tensor("qlens", TensorProto.INT32, [b], [s] * b)]
    q = helper.make_graph(nodes, "g", ins, outs, consts)
    return (helper.make_model(a, opset_imports=[helper.make_opsetid("", 23)]),
            helper.make_model(q, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)]))


@functools.lru_cache(maxsize=64)
def fastest_step(b: int, h: int, kvh: int, s: int, p: int, d: int, masked: bool) -> tuple[str, str]:
    """("onnx" | "gqa", why) for one decoder step's shape: S new tokens after P cached."""
    a, g = (_time(m) for m in _step_models(b, h, kvh, s, p, d, masked))
    pick = "onnx" if a <= g else "gqa"
    return pick, (f"Attention {a * 1e3:.3f} ms vs GroupQueryAttention {g * 1e3:.3f} ms at B={b} H={h} kvH={kvh} "
                  f"S={s} past={p} d={d}")


def _window_models(b, h, kvh, p, d, window: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(ONNX Attention opset 25 with left_window_size, GroupQueryAttention with
    local_window_size): one new token after a cache of `p` positions."""
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [b, h, 1, d])]
    ins += [helper.make_tensor_value_info(n, f, [b, kvh, 1, d]) for n in ("k", "v")]
    ins += [helper.make_tensor_value_info(n, f, [b, kvh, p, d]) for n in ("pk", "pv")]
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    att = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "ok", "ov"],
                           left_window_size=window - 1, right_window_size=0)
    a = helper.make_model(helper.make_graph([att], "a", ins, outs), opset_imports=[helper.make_opsetid("", 25)])
    nodes = [n for x in ("q", "k", "v") for n in (
        helper.make_node("Transpose", [x], [f"{x}t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{x}t", "flat"], [f"{x}3"]))]
    nodes += [helper.make_node("GroupQueryAttention", ["q3", "k3", "v3", "pk", "pv", "seqlens", "total"],
                               ["o3", "ok", "ov"], domain=MS, num_heads=h, kv_num_heads=kvh, local_window_size=window),
              helper.make_node("Reshape", ["o3", "heads"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3])]
    consts = [helper.make_tensor("flat", TensorProto.INT64, [3], [0, 0, -1]),
              helper.make_tensor("heads", TensorProto.INT64, [4], [0, 0, h, -1]),
              helper.make_tensor("seqlens", TensorProto.INT32, [b], [p] * b),
              helper.make_tensor("total", TensorProto.INT32, [], [p + 1])]
    g = helper.make_model(helper.make_graph(nodes, "g", ins, outs, consts),
                          opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)])
    return a, g


@functools.lru_cache(maxsize=64)
def fastest_window(b: int, h: int, kvh: int, p: int, d: int, window: int) -> tuple[str, str]:
    """("onnx" | "ort", why): the faster windowed op for one new token after `p` cached."""
    a, g = (_time(m) for m in _window_models(b, h, kvh, p, d, window))
    pick = "onnx" if a <= g else "ort"
    return pick, (f"Attention-25 window {a * 1e3:.3f} ms vs GroupQueryAttention local_window_size "
                  f"{g * 1e3:.3f} ms at B={b} H={h} kvH={kvh} cache={p} d={d}")


@functools.lru_cache(maxsize=None)
def has_attribute(op: str, name: str, domain: str = MS) -> bool:
    """The installed ONNX Runtime's schema of `op` has attribute `name`."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return any(s.name == op and s.domain == domain and name in s.attributes for s in C.get_all_operator_schema())


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def window_cache_attention(e: SiteEdit, s: AttentionSite, q, cached, mask, window: int):
    """The step as GroupQueryAttention with its windowed KV cache (sliding_window_cache=1,
    capacity = window): (output [B, H, S, D], present key, present value), the present
    holding the min(T, window) most recent positions, as stream caps them. The op wants a
    past of the capacity from the first call, so a shorter past (the loop starts empty) is
    padded with zeros at its end; its rows past the P valid ones are never read. T, the
    tokens seen, is taken as P + S: once the cache is full the op works in cache-relative
    positions (the rotary is applied before it), so any T >= window gives the same result,
    and the mask the loop feeds (past + new) has exactly T columns as attention_bias wants."""
    e.ensure_opset(MS, 1)
    k_new, v_new, past_k, past_v = cached
    i32 = lambda x: e.op("Cast", [x], {"to": ir.DataType.INT32})  # noqa: E731
    new, batch, past = e.shape_dim(q, 2), e.shape_dim(q, 0), e.shape_dim(past_k, 2)
    total = e.op("Add", [past, new])
    pad = e.op("Max", [e.op("Sub", [e.ints(window), past]), e.ints(0)])
    pads = e.op("Concat", [e.ints(0, 0, 0, 0, 0, 0), pad, e.ints(0)], {"axis": 0})
    padded = [e.op("Pad", [x, pads]) for x in (past_k, past_v)]
    attrs = {"num_heads": int(s.heads), "kv_num_heads": int(s.kv_heads), "scale": float(s.scale), "do_rotary": 0,
             "local_window_size": int(window), "sliding_window_cache": 1}
    if s.softcap:
        attrs["softcap"] = float(s.softcap)
    inputs = [_packed(e, q), _packed(e, k_new), _packed(e, v_new), *padded,
              i32(e.op("Expand", [e.op("Sub", [total, e.ints(1)]), batch])), i32(e.op("Squeeze", [total, e.ints(0)])),
              None, None, None, mask, None, None, None, None, None, i32(e.op("Expand", [new, batch]))]
    y3, present_k, present_v = e.op("GroupQueryAttention", inputs, attrs, domain=MS, outputs=3)
    y = e.op("Transpose", [e.op("Reshape", [y3, e.ints(0, 0, int(s.heads), -1)])], {"perm": [0, 2, 1, 3]})
    kept = e.op("Min", [total, e.ints(window)])  # rows [0, L) are the window, the rest unspecified
    return y, *(e.op("Slice", [x, e.ints(0), kept, e.ints(2)]) for x in (present_k, present_v))


def group_query_attention(e: SiteEdit, s: AttentionSite, q, cached, mask, window: int | None = None):
    """The decoder step as one GroupQueryAttention reading the step's own past cache:
    (output [B, H, S, D], present key, present value). seqlens_k is total - 1 for every
    row, so the op's present equals the step's Concat(past, new) (a smaller seqlens_k
    would write the new keys over the past at seqlens_k + 1 - S); the mask, padding
    included, goes in as attention_bias. query_seqlens (= S) lets a batch of several
    rows take a multi-token step after a past (ORT refuses that without it)."""
    e.ensure_opset(MS, 1)
    k_new, v_new, past_k, past_v = cached
    i32 = lambda x: e.op("Cast", [x], {"to": ir.DataType.INT32})  # noqa: E731
    new, batch = e.shape_dim(q, 2), e.shape_dim(q, 0)
    total = e.op("Add", [e.shape_dim(past_k, 2), new])
    seqlens = i32(e.op("Expand", [e.op("Sub", [total, e.ints(1)]), batch]))
    sink = None
    if s.normaliser.kind == "logit":  # exp(S) / (exp(b_h) + Σ exp(S)): head_sink is b_h
        sink = e.weight("sink_logit", s.normaliser.per_head_bias(s.heads))
    attrs = {"num_heads": int(s.heads), "kv_num_heads": int(s.kv_heads), "scale": float(s.scale), "do_rotary": 0}
    if window is not None:  # keys j with i - j < window (the query itself included)
        attrs["local_window_size"] = int(window)
    if s.softcap:
        attrs["softcap"] = float(s.softcap)
    inputs = [_packed(e, q), _packed(e, k_new), _packed(e, v_new), past_k, past_v, seqlens,
              i32(e.op("Squeeze", [total, e.ints(0)])), None, None, None, mask, sink, None, None, None, None,
              i32(e.op("Expand", [new, batch]))]
    y3, present_k, present_v = e.op("GroupQueryAttention", inputs, attrs, domain=MS, outputs=3)
    y = e.op("Transpose", [e.op("Reshape", [y3, e.ints(0, 0, int(s.heads), -1)])], {"perm": [0, 2, 1, 3]})
    return y, present_k, present_v


def _packed(e: SiteEdit, x):
    """[B, H, S, D] -> [B, S, H*D]."""
    return e.op("Reshape", [e.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])
