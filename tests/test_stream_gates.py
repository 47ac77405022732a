"""DuoAttention's gates for stream:...,full_heads=auto with --calibrate: the gate model at
α = 0 is the stream form and at α = 1 the model; the fit lowers its loss; no L1 keeps every
group full (nothing streams, said, exit 0), a large L1 streams every group; the choice is
reported; torch.fx refuses in words."""

from __future__ import annotations

import numpy as np
import pytest

import attn_opt
from attn_opt.core.errors import NotSupported
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.tools import zoo
from conftest import _cached


def _prefill(batch: int, length: int, seed: int) -> dict:
    """A first step: `length` random tokens, every cache empty."""
    r = np.random.default_rng(seed)
    f = {"input_ids": r.integers(1, zoo.VOCAB, (batch, length)), "attention_mask": np.ones((batch, length), np.int64),
         "position_ids": np.broadcast_to(np.arange(length), (batch, length)).copy()}
    return f | {f"past_key_values.{i}.{kv}": np.zeros((batch, 2, 0, 8), np.float32)
                for i in range(2) for kv in ("key", "value")}


CAL, HELD = _prefill(2, 40, 1), _prefill(2, 40, 2)


@pytest.fixture(scope="session")
def step(cache_dir):
    return _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))


def _gates(step, l1: float):
    out, rep = attn_opt.optimize(str(step), [f"stream:sinks=2,window=8,full_heads=auto,gate_l1={l1}"],
                                 feeds=HELD, calibrate=CAL, force=True)
    return out, rep.passes[0]


def test_mix_is_the_model_at_one_and_the_stream_form_at_zero(step, tmp_path):
    from attn_opt.pipeline.onnx_steps import OnnxSteps
    from attn_opt.pipeline.stream_gates import fit_gates

    om = OnnxSteps().upgrade(onnx_adapter.load(str(step)), 18, "the lowering")  # as the pass's prepare step does
    fit = fit_gates(om, ["a0", "a1"], CAL, 2, 8, 0.05)
    assert fit.error_all_dense < 1e-10
    stream, _ = attn_opt.optimize(str(step), ["stream:sinks=2,window=8"], force=True)
    ref, got = om.run(CAL)["logits"].astype(np.float64), stream.run(CAL)["logits"].astype(np.float64)
    expected = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
    assert expected > 1e-3  # the window drops keys on 40 tokens
    assert fit.error_all_stream == pytest.approx(expected, rel=1e-4)
    assert fit.loss[-1] < fit.loss[0]  # the fit moved off all-dense
    assert all(g.shape == (2,) and ((0 <= g) & (g <= 1)).all() for g in fit.gates.values())


def test_no_l1_keeps_every_group_full(step):
    _, p = _gates(step, 0.0)
    assert not p.sites_rewritten
    assert all("every KV group keeps the full cache" in k.reason and "DuoAttention gates" in k.reason
               for k in p.sites_skipped)
    assert "DuoAttention gates fitted" in p.calibration.note


def test_large_l1_streams_every_group(step):
    out, p = _gates(step, 100.0)
    assert p.sites_rewritten == ["a0", "a1"]
    assert all("KV groups none keep the full cache: DuoAttention gates [0.0, 0.0]" in n for n in p.notes[:2])
    assert {v.name for v in out.ir.graph.inputs} >= {"past_key_values.0.key_stream", "past_key_values.1.value_stream"}


def test_a_middle_l1_reports_each_sites_gates(step):
    _, p = _gates(step, 1.0)
    said = [n for n in p.notes if "DuoAttention gates [" in n]
    assert said and len(said) == len(p.sites_rewritten)
    assert "of 4 KV groups above 0.5" in p.calibration.note


def test_torch_fx_refuses_in_words():
    from types import SimpleNamespace

    from attn_opt.pipeline.fx_steps import FxSteps

    with pytest.raises(NotSupported, match="implemented on ONNX models only"):
        FxSteps().stream_gates(None, ["a0"], {}, SimpleNamespace(name="stream"))
