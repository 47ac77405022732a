"""Decoder steps with a KV cache (inputs past_key_values.*, outputs present.*), exported
both ways: every site is found with its cache, the generation loop in ONNX Runtime is
the model's own greedy decoding, fuse is exact on the step and through the loop, and
bad decoder inputs are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import attn_opt
from attn_opt.tools import zoo
from conftest import _cached
from test_pipeline import cli

CASES = [(name, exporter) for name in zoo.DECODERS for exporter in ("torchscript", "dynamo")]


@pytest.fixture(scope="session")
def step_onnx(cache_dir):
    def get(name: str, exporter: str):
        return _cached(cache_dir / f"step-{name}-{exporter}.onnx",
                       lambda tmp: zoo.export_decoder_step(name, exporter, tmp))

    return get


@pytest.mark.parametrize("name,exporter", CASES)
def test_sites_and_their_cache(step_onnx, name, exporter):
    sites = attn_opt.inspect(str(step_onnx(name, exporter))).sites
    cfg = zoo.DECODERS[name][2]
    kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads", cfg.get("n_head")))
    assert [(s.kind, s.kv_heads, s.causal) for s in sites] == [("self", kv, True)] * 2
    assert [(s.cache.past_key, s.cache.present_value) for s in sites] == \
        [(f"past_key_values.{i}.key", f"present.{i}.value") for i in range(2)]


@pytest.mark.parametrize("name,exporter", CASES)
def test_fuse_is_exact_through_the_loop(step_onnx, tmp_path, name, exporter):
    """The pipeline checks four loop steps itself; `generate --compare` runs 32 more."""
    src, out, rep = step_onnx(name, exporter), tmp_path / "f.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", "fuse", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    p = report["passes"][0]
    assert "decode x4" in report["inputs"]["variants"] and any("@decode x4" in k for k in p["per_output"])
    assert p["sites_rewritten"] == ["a0", "a1"] and p["step_fidelity_all"]["max_rel_error"] <= 1e-4
    assert sum(n.op_type == "Attention" for n in onnx.load(str(out)).graph.node) == 2
    np.save(tmp_path / "p.npy", np.array([[5, 6, 7, 8]]))
    r = cli("generate", src, "--prompt-ids", tmp_path / "p.npy", "--max-new-tokens", 33, "--compare", out, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["compare"]["steps"] == 33 and got["compare"]["max_rel_error"] <= 1e-4
    assert got["compare"]["token_agreement"] == 1.0 and got["total_tokens"] == 36


def test_the_loop_is_the_models_own_greedy_decoding(step_onnx):
    """ONNX Runtime's loop (cache fed back) picks the tokens torch's step module picks."""
    from attn_opt.rewriter.ir import onnx as onnx_adapter
    from attn_opt.rewriter.ir.onnx_decode import generate, loop_of

    om, _, gv = onnx_adapter.load_view(str(step_onnx("llama", "torchscript")))
    prompt = np.array([[5, 6, 7, 8]])
    got = generate(om, loop_of(gv, onnx_adapter.input_specs(gv)), prompt, 12).tokens
    step, *_ = zoo.decoder_step("llama")
    past = [torch.zeros(1, 2, 0, 8) for _ in range(4)]
    ids, want = torch.from_numpy(prompt), []
    with torch.no_grad():
        for i in range(12):
            done = past[0].shape[2]
            out = step(ids, torch.ones(1, done + ids.shape[1], dtype=torch.long),
                       torch.arange(done, done + ids.shape[1])[None], *past)
            ids, past = out[0][:, -1].argmax(-1, keepdim=True), list(out[1:])
            want.append(int(ids))
    assert got.tolist() == [want]


def test_bad_decoder_inputs(step_onnx, tmp_path):
    src = step_onnx("gpt2", "torchscript")
    np.save(tmp_path / "p.npy", np.array([[5, 6]]))
    m = onnx.load(str(src))  # the same step without its present outputs
    del m.graph.output[1:]
    onnx.save(m, str(tmp_path / "no-present.onnx"))
    r = cli("generate", tmp_path / "no-present.onnx", "--prompt-ids", tmp_path / "p.npy")
    assert r.returncode == 2 and "does not return it" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    m = onnx.load(str(src))  # a static past length
    for i in m.graph.input:
        if i.name.startswith("past"):
            i.type.tensor_type.shape.dim[2].dim_value = 3
    onnx.save(m, str(tmp_path / "static.onnx"))
    r = cli("generate", tmp_path / "static.onnx", "--prompt-ids", tmp_path / "p.npy")
    assert r.returncode == 2 and "static length" in r.stderr
    r = cli("generate", zoo_path := tmp_path / "p.npy", "--prompt-ids", zoo_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    np.save(tmp_path / "f.npy", np.zeros((1, 2), np.float32))
    r = cli("generate", src, "--prompt-ids", tmp_path / "f.npy")
    assert r.returncode == 2 and "integer token ids" in r.stderr
