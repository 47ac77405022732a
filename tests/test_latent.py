"""latent (MHA → latent attention): K/V through one low-rank latent. Exact at full rank on
an encoder (ONNX and torch.fx) and on a decoder step through the generation loop, whose
cache then holds the latent under names derived from the old ones; approximate below full
rank (closer with --calibrate); bad ranks and rope_dims refused in one line."""

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


@pytest.fixture(scope="session")
def llama_step(cache_dir):
    return _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))


def _report(path):
    return json.loads(path.read_text())["passes"][0]


def test_encoder_full_rank_is_exact_and_lower_ranks_are_not(zoo_onnx, tmp_path):
    src = zoo_onnx("bert-eager", "dynamo")
    out, rep = tmp_path / "l.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", "latent:rank=32", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    p = _report(rep)
    assert p["sites_rewritten"] == ["a0", "a1"] and p["fidelity_all"]["max_rel_error"] <= 1e-5
    assert "rank 32 of 32 (exact: full rank)" in p["notes"][0]
    g = onnx.load(str(out)).graph
    names = {i.name for i in g.initializer}
    assert {f"attn_opt.a{i}.latent_{w}" for i in range(2) for w in ("down", "up_k", "up_v")} <= names
    downs = [i for i in g.initializer if i.name.endswith("latent_down")]
    assert all(list(d.dims) == [32, 32] for d in downs)
    errs = []
    for rank in (16, 4):
        rep = tmp_path / f"r{rank}.json"
        r = cli(src, "--pass", f"latent:rank={rank}", "-o", tmp_path / f"l{rank}.onnx", "--report", rep, "--force")
        assert r.returncode == 0, r.stderr
        errs.append(_report(rep)["fidelity"]["max_rel_error"])
    assert 1e-4 < errs[0] < errs[1]  # approximate, and worse with less rank


def test_calibration_fits_the_svd_on_activations(zoo_onnx, tmp_path):
    from attn_opt.core.inputs import make_inputs
    from attn_opt.core.ir import onnx as onnx_adapter

    src = zoo_onnx("bert-eager", "dynamo")
    gv = onnx_adapter.view(onnx_adapter.load(str(src)))
    cal = make_inputs(onnx_adapter.input_specs(gv), {}, seed=3, pad=False)
    _, plain = attn_opt.optimize(str(src), ["latent:rank=6"], force=True)
    _, fitted = attn_opt.optimize(str(src), ["latent:rank=6"], calibrate=cal, force=True)
    a, b = plain.passes[0], fitted.passes[0]
    assert "SVD of the weights" in a.notes[0] and "activations on the calibration inputs" in b.notes[0]
    assert b.fidelity["max_rel_error"] < a.fidelity["max_rel_error"]  # what K/V carry, not what W could


def test_decoder_step_caches_the_latent_and_is_exact_through_the_loop(llama_step, tmp_path):
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    out, rep = tmp_path / "l.onnx", tmp_path / "r.json"
    r = cli(llama_step, "--pass", "latent:rank=16", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    p = _report(rep)
    assert p["sites_rewritten"] == ["a0", "a1"]
    assert any("@decode x4" in k for k in p["per_output"]) and p["fidelity_all"]["max_rel_error"] <= 1e-5
    assert "cache per token per layer: 32 → 32 values" in " ".join(p["notes"])
    m = onnx.load(str(out)).graph
    ins, outs = [i.name for i in m.input], [o.name for o in m.output]
    assert ins[3:] == ["past_key_values.0.key", "past_key_values.0.latent", "past_key_values.1.key",
                       "past_key_values.1.latent"]
    assert outs[1:] == ["present.0.key", "present.0.latent", "present.1.key", "present.1.latent"]
    dense, _, gv = onnx_adapter.load_view(str(llama_step))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    got = compare(dense, onnx_adapter.load(str(out)), loop, np.array([[5, 6, 7, 8]]), 24)
    assert got["max_rel_error"] <= 1e-5 and got["token_agreement"] == 1.0
    assert got["b"].cache_bytes == got["a"].cache_bytes  # rank 16 = 2 kv heads x 8: as big as the V cache
    low = tmp_path / "l4.onnx"
    assert cli(llama_step, "--pass", "latent:rank=4", "-o", low, "--force").returncode == 0
    got = compare(dense, onnx_adapter.load(str(low)), loop, np.array([[5, 6, 7, 8]]), 24)
    k, v_old, v_new = 2 * 8, 2 * 8, 4  # per token per layer: the rotated K, the V it replaced, the latent
    assert got["b"].cache_bytes * (k + v_old) == got["a"].cache_bytes * (k + v_new)
    assert got["max_rel_error"] > 1e-4  # rank 4 < 16: approximate


def test_refused_in_one_line(zoo_onnx, llama_step, tmp_path):
    bert = zoo_onnx("bert-eager", "dynamo")
    for src, spec, words in ((bert, "latent:rank=0", "rank must be >= 1"),
                             (bert, "latent:rank=33", "above the full rank 32"),
                             (llama_step, "latent:rank=16,rope_dims=9", "above the head dim (8)"),
                             (bert, "latent", "rank=R is required")):
        r = cli(src, "--pass", spec, "-o", tmp_path / "o.onnx")
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o.onnx").exists()
    r = cli(llama_step, "--pass", "latent:rank=8,rope_dims=3", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "odd" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    rep = tmp_path / "g.json"
    gpt2 = _cached(tmp_path / "gpt2.onnx", lambda tmp: zoo.export_decoder_step("gpt2", "torchscript", tmp))
    r = cli(gpt2, "--pass", "latent:rank=8", "-o", tmp_path / "g.onnx", "--report", rep)
    assert r.returncode == 0 and all("fused QKV" in s["reason"] for s in _report(rep)["sites_skipped"])


def test_torch_fx_factorised_weights_are_parameters():
    model, args, _ = zoo.MODELS["bert-eager"].build()
    gm, report = attn_opt.optimize(model, ["latent:rank=32"], example_inputs=args)
    p = report.passes[0]
    assert p.sites_rewritten == ["a0", "a1"] and p.fidelity["max_rel_error"] <= 1e-5
    params = dict(gm.named_parameters())
    assert tuple(params["attn_opt_a0_latent_down"].shape) == (32, 32)
    with torch.no_grad():
        params["attn_opt_a0_latent_down"].zero_()  # the graph reads them: zeroed, the output moves
        assert not torch.allclose(gm(*args), model(*args), atol=1e-3)
    step, args, *_ = zoo.decoder_step("llama")  # the torch step's cache: refused in words
    _, report = attn_opt.optimize(step, ["latent:rank=16"], example_inputs=args)
    assert not report.passes[0].sites_rewritten and report.passes[0].sites_skipped


def _first_call(sess, ids, positions, past=None):
    """Logits of one call and its cache as the next past (by the model's own names)."""
    feeds = {"input_ids": ids, "position_ids": positions}
    held = 0
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = past[i.name] if past else np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            held = feeds[i.name].shape[2]
    feeds["attention_mask"] = np.ones((1, held + ids.shape[1]), np.int64)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["logits"], {k.replace("present", "past_key_values"): v for k, v in out.items() if k != "logits"}


def test_partial_rope_keeps_some_rotated_dims_in_their_own_cache(llama_step, tmp_path):
    """rope_dims=4 of 8: a [B, 2, T, 4] key_rope cache and a rank-24 latent (the full rank of
    the 8 unrotated K columns + 16 V columns). Exact where rotation is the identity (every
    position 0); elsewhere the dropped rotation moves the logits; and the step's cache is
    consistent: a prompt in one call equals it fed through the cache token by token."""
    import onnxruntime as ort

    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = cli(llama_step, "--pass", "latent:rank=24,rope_dims=4", "-o", out, "--report", rep, "--force")
    assert r.returncode == 0, r.stderr
    p = _report(rep)
    assert p["sites_rewritten"] == ["a0", "a1"] and "32 → 32 values" in " ".join(p["notes"])  # 2 x 4 rotated + 24
    dense, new = ort.InferenceSession(str(llama_step)), ort.InferenceSession(str(out))
    shapes = {i.name: i.shape for i in new.get_inputs()}
    assert shapes["past_key_values.0.key_rope"][1:] == [2, "past", 4] and shapes["past_key_values.0.latent"][3] == 24
    ids = np.array([[5, 6, 7, 8, 9]])
    zero, pos = np.zeros((1, 5), np.int64), np.arange(5)[None]
    a, _ = _first_call(dense, ids, zero)
    b, _ = _first_call(new, ids, zero)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    a, _ = _first_call(dense, ids, pos)
    whole, _ = _first_call(new, ids, pos)
    assert np.abs(a - whole).max() > 1e-4 * np.abs(a).max()  # the nope dims lost their rotation
    logits, past = _first_call(new, ids[:, :2], pos[:, :2])
    for t in range(2, 5):
        logits, past = _first_call(new, ids[:, t:t + 1], pos[:, t:t + 1], past)
        assert np.abs(logits[0, -1] - whole[0, t]).max() <= 1e-5 * np.abs(whole).max()


def test_partial_rope_step_scores_in_the_latent_space(llama_step, tmp_path):
    """K's and V's up-projections absorbed: no step up-projects the cache, so the attention's
    matrix products grow by 2·H·(kept + 2R + 2) per cached token and layer (scores over the
    kept rotated dims and [c, 1], then P·[c, 1]), not by the up-projection's R·Hkv·(d_nope + dv)."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.core.ir.onnx_flops import count

    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    assert cli(llama_step, "--pass", "latent:rank=24,rope_dims=4", "-o", out, "--report", rep, "--force").returncode == 0
    notes = " ".join(_report(rep)["notes"])
    assert "K's and V's up-projections absorbed" in notes
    m = onnx.load(str(out), load_external_data=False).graph
    inits = {i.name for i in m.initializer}
    assert any(n.endswith("latent_up_k_heads") for n in inits) and not any(n.endswith("latent_up_k") for n in inits)
    om = onnx_adapter.load(str(out))

    def flops(past: int) -> int:
        feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, past + 1), np.int64),
                 "position_ids": np.array([[past]])}
        for i in range(2):
            feeds[f"past_key_values.{i}.key_rope"] = np.zeros((1, 2, past, 4), np.float32)
            feeds[f"past_key_values.{i}.latent"] = np.zeros((1, 1, past, 24), np.float32)
        return count(om, feeds).attention_matmul

    heads, kept, rank, layers = 4, 4, 24, 2
    assert flops(300) - flops(100) == 200 * layers * 2 * heads * (kept + 2 * rank + 2)
