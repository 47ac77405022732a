"""Attention diagnostics agree with the probabilities PyTorch computes on the same inputs,
whether the ONNX graph has them (eager export) or not (a fused Attention op)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import attn_opt
from attn_opt.patterns.diagnostics import head_stats, probabilities
from attn_opt.core.ir import load
from attn_opt.tools import zoo


def torch_attentions(name):
    model, args, names = zoo.MODELS[name].build()
    with torch.no_grad():
        out = model.model(**dict(zip(names, args)), output_attentions=True)
    return [a.numpy() for a in out.attentions], {n: a.numpy() for n, a in zip(names, args)}


@pytest.mark.parametrize("name,exporter", [("bert-eager", "dynamo"), ("bert-eager", "torchscript"),
                                           ("bert-sdpa", "dynamo23"), ("gpt2-eager", "dynamo")])
def test_probabilities_match_pytorch(zoo_onnx, name, exporter):
    want, feeds = torch_attentions(name.replace("sdpa", "eager"))  # same seed: same weights
    path = zoo_onnx(name, exporter)
    det = attn_opt.inspect(str(path), feeds=feeds)
    probs = probabilities(load(str(path)).view, det.sites, feeds)
    assert len(probs) == len(want)
    for site, w in zip(det.sites, want):
        np.testing.assert_allclose(probs[site.id], w, atol=2e-6)
        ours = head_stats(site, probs[site.id], window=4)
        theirs = head_stats(site, w.astype(np.float64), window=4)
        for a, b in zip(ours, theirs):
            assert a.sinks == b.sinks and a.state == b.state
            assert a.entropy == pytest.approx(b.entropy, abs=1e-4)
            assert a.outside_window == pytest.approx(b.outside_window, abs=1e-5)
            np.testing.assert_allclose(a.first_tokens, b.first_tokens, atol=1e-5)


def test_cli_attention_json_and_heatmaps(zoo_onnx, tmp_path):
    path = zoo_onnx("llama-eager", "dynamo")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    r = subprocess.run([sys.executable, "-m", "attn_opt", "inspect", str(path), "--attention", "--json",
                        "--window", "4", "--heatmaps", str(tmp_path / "hm")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    heads = json.loads(r.stdout)["attention"]
    assert len(heads) == 2 * 4 and all(h["state"] in ("active", "dormant") for h in heads)
    assert all(0 <= h["outside_window"] <= 1 for h in heads)
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == ["a0_layer0.png", "a1_layer1.png"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the model file is untouched


def test_cli_attention_without_sites(tmp_path):
    from test_cli import _no_attention_model

    p = tmp_path / "relu.onnx"
    _no_attention_model(p)
    r = subprocess.run([sys.executable, "-m", "attn_opt", "inspect", str(p), "--attention"], capture_output=True, text=True)
    assert r.returncode == 2 and "no attention sites" in r.stderr
