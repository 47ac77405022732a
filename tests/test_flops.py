"""FLOP counts from ONNX graphs: hand counts on small graphs, and agreement with torch's
FlopCounterMode on the PyTorch model the ONNX came from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from attn_opt.core.ir import onnx_flops
from attn_opt.tools import zoo
from onnx_attention import attention_model, feeds

F = TensorProto.FLOAT


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_counts_small_graph():
    x = helper.make_tensor_value_info("x", F, ["B", 3, 4])
    y = helper.make_tensor_value_info("y", F, None)
    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "w")
    b = numpy_helper.from_array(np.ones((5,), np.float32), "b")
    m = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Add", ["h", "b"], ["a"]),
                helper.make_node("Softmax", ["a"], ["y"], axis=-1)], [x], [y], [w, b])
    f = onnx_flops.count(m, {"x": np.zeros((2, 3, 4), np.float32)})
    assert f.matmul == 2 * 2 * 3 * 4 * 5
    assert f.total == 2 * 2 * 3 * 4 * 5 + 2 * 3 * 5 + 5 * 2 * 3 * 5
    assert onnx_flops.params(m) == 4 * 5 + 5


def test_hand_counts_gemm_and_attention():
    x = helper.make_tensor_value_info("x", F, [6, 4])
    y = helper.make_tensor_value_info("y", F, None)
    w = numpy_helper.from_array(np.ones((5, 4), np.float32), "w")
    m = _graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [x], [y], [w])
    assert onnx_flops.count(m, {"x": np.zeros((6, 4), np.float32)}).matmul == 2 * 6 * 4 * 5
    b, h, t, d = 2, 4, 37, 8
    att = attention_model(b=b, h=h, t=t, d=d)
    f = onnx_flops.count(att, feeds(b=b, h=h, t=t, d=d))
    assert f.matmul == 2 * b * h * t * t * d * 2  # Q·Kᵀ and P·V


@pytest.mark.parametrize("name", ["bert-eager", "gpt2-eager", "llama-eager", "t5-eager"])
def test_matches_flop_counter_mode(zoo_onnx, name):
    """Same model, same inputs: the graph count of matrix FLOPs equals what torch counts."""
    model, args, names = zoo.MODELS[name].build()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    proto = onnx.load(str(zoo_onnx(name, "dynamo")))
    feeds_ = {n: a.numpy() for n, a in zip(names, args)}
    ours = onnx_flops.count(proto, feeds_).matmul
    theirs = counter.get_total_flops()
    assert ours == pytest.approx(theirs, rel=0.01), (ours, theirs)


def test_flop_counter_mode_misses_cpu_sdpa(zoo_onnx):
    """On CPU, FlopCounterMode does not see torch's SDPA kernel: it counts only the
    projections. The graph count has them plus exactly the attention products."""
    model, args, names = zoo.MODELS["llama-sdpa"].build()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    proto = onnx.load(str(zoo_onnx("llama-sdpa", "dynamo")))
    ours = onnx_flops.count(proto, {n: a.numpy() for n, a in zip(names, args)}).matmul
    b, t = args[0].shape
    e = zoo.MODELS["llama-sdpa"].expected
    attention = e.sites * 2 * (2 * b * e.heads * t * t * 8)  # Q·Kᵀ and P·V, head dim 8
    assert ours == counter.get_total_flops() + attention
