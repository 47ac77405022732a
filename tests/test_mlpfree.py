"""mlpfree: collapse-qk / collapse-vo are exact on the zoo models whose Q/K/V are plain
projections, skipped with the reason elsewhere; drop_mlp finds exactly the feed-forward
blocks (by graph regions) and nothing in the attention."""

from __future__ import annotations

import onnx
import pytest

import attn_opt
from attn_opt import passes
from attn_opt.patterns.mlp import mlp_blocks
from attn_opt.core.ir import onnx as onnx_adapter
import attn_opt
from attn_opt.core.inputs import make_inputs


def _feeds(proto):
    return make_inputs(onnx_adapter.input_specs(onnx_adapter.load_view(proto)[2]), pad=False)


@pytest.mark.parametrize("name,exporter", [("bert-eager", "dynamo"), ("bert-sdpa", "torchscript"),
                                           ("vit-sdpa", "dynamo23"), ("t5-eager", "dynamo"),
                                           ("vit-eager", "torchscript")])
@pytest.mark.parametrize("spec", ["mlpfree:collapse=qk", "mlpfree:collapse=vo", "mlpfree:collapse=qk+vo"])
def test_collapse_is_exact(zoo_onnx, name, exporter, spec):
    proto = onnx.load(str(zoo_onnx(name, exporter)))
    _, report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=_feeds(proto))
    p = report.passes[0]
    assert p.sites_rewritten and not p.sites_skipped, p.sites_skipped
    assert p.step_fidelity["max_rel_error"] <= 1e-4
    assert all("BIGGER" in n for n in p.notes)  # D=32, d=8: collapsing costs parameters, and it says so
    assert p.params_after > p.params_before


def test_collapse_skips_rotary_with_reason(zoo_onnx):
    proto = onnx.load(str(zoo_onnx("llama-eager", "dynamo")))
    _, report = attn_opt.optimize(proto, [passes.parse("mlpfree:collapse=qk")], feeds=_feeds(proto))
    assert [s.reason for s in report.passes[0].sites_skipped] == [
        "Q is not a projection reshaped to heads (rotary embedding or another op in between)"] * 2


def test_symmetric_is_approximate(zoo_onnx):
    import numpy as np
    from onnx import numpy_helper

    proto = onnx.load(str(zoo_onnx("bert-eager", "dynamo")))
    out, report = attn_opt.optimize(proto, [passes.parse("mlpfree:collapse=qk,symmetric=true")], feeds=_feeds(proto))
    p = report.passes[0]
    assert not p.exact and p.fidelity["max_rel_error"] > 1e-6  # reported as approximate, and it moved
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["attn_opt.a0.w_qk"]
    per_head = w.reshape(w.shape[0], 4, w.shape[0]).transpose(1, 0, 2)
    assert np.allclose(per_head, per_head.transpose(0, 2, 1))


@pytest.mark.parametrize("name,blocks", [("bert-eager", 2), ("gpt2-eager", 2), ("llama-eager", 2), ("vit-eager", 2),
                                         ("t5-eager", 4), ("torch-encoder", 2)])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_mlp_blocks_found(zoo_onnx, name, blocks, exporter):
    from attn_opt.tools import zoo

    if exporter in zoo.MODELS[name].unsupported:
        pytest.skip(zoo.MODELS[name].unsupported[exporter])
    proto = onnx.load(str(zoo_onnx(name, exporter)))
    gv = onnx_adapter.load_view(proto)[2]
    found = mlp_blocks(gv)
    assert len(found) == blocks
    for _, _, nodes in found:
        assert not any(n.op == "Softmax" for n in nodes)
    _, report = attn_opt.optimize(proto, [passes.parse("mlpfree:drop_mlp=true")], feeds=_feeds(proto))
    p = report.passes[0]
    assert sum(n.startswith("dropped the feed-forward block") for n in p.notes) == blocks
    assert p.params_after < p.params_before and p.flops_after < p.flops_before
    assert len(attn_opt.inspect(proto).sites) == zoo.MODELS[name].expected.sites  # attention untouched
