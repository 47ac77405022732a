"""sparse:topk on a decoder step with a KV cache: each new query ranks the key blocks of
the whole cache (its query block stands at the cache's end), so a step attends its
kept blocks only; the cache itself is untouched; exact while the cache holds at most the
kept blocks, an approximation beyond (the generation loop in ONNX Runtime)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attn_opt
from attn_opt.tools import zoo
from conftest import _cached
from test_pipeline import cli


@pytest.fixture(scope="session")
def step(cache_dir):
    return _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))


def test_a_step_selects_blocks_of_its_cache(step, tmp_path):
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    out, rep = tmp_path / "t.onnx", tmp_path / "r.json"
    r = cli(step, "--pass", "sparse:topk=1,block=4,window=1", "-o", out, "--report", rep, "--force")
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"], p["sites_skipped"]
    assert all(s.cache is not None for s in attn_opt.inspect(str(out)).sites)  # still a step with its cache
    dense, _, gv = onnx_adapter.load_view(str(step))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    got = compare(dense, onnx_adapter.load(str(out)), loop, np.array([[5, 6, 7, 8]]), 16)
    fits = 8 - 4 + 1  # steps whose sequence (prompt + tokens fed so far) holds at most 2 blocks of 4
    assert max(got["per_step_error"][:fits]) <= 1e-5
    assert max(got["per_step_error"][fits:]) > 1e-4  # beyond: blocks of the cache dropped
    assert got["b"].cache_bytes == got["a"].cache_bytes  # the cache itself is untouched


def test_a_block_longer_than_the_fidelity_cache_is_taken_on_a_step(step, tmp_path):
    """A step's keys grow with its cache: a block longer than the fidelity inputs' keys is
    no error there (every block is kept while the cache is that short: exact)."""
    errors = {}
    for spec in ("sparse:topk=1,block=64", "sparse:window=1000"):
        out, rep = tmp_path / "t.onnx", tmp_path / "r.json"
        r = cli(step, "--pass", spec, "-o", out, "--report", rep, "--force")
        assert r.returncode == 0, r.stderr
        p = json.loads(rep.read_text())["passes"][0]
        assert p["sites_rewritten"] == ["a0", "a1"]
        errors[spec] = {k: v["max_rel_error"] for k, v in p["per_output"].items()}
    for spec, errs in errors.items():  # unpadded, padded (a fully padded row over past + new), longer, the loop
        assert "logits@padded" in errs and any("decode" in k for k in errs), (spec, sorted(errs))
        assert max(errs.values()) <= 1e-5, (spec, errs)


def test_a_window_keeping_every_key_is_exact_on_every_input_set_of_a_step(step, tmp_path):
    """A fully padded row hides past + new keys with finite values: the original spreads it
    uniformly over all of them, and so does the lowering (the window's causality aside)."""
    out, rep = tmp_path / "w.onnx", tmp_path / "r.json"
    r = cli(step, "--pass", "sparse:window=1000", "-o", out, "--report", rep)  # no --force: enforced exact
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    p = report["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"]
    assert {"padded", "length+5"} <= set(report["inputs"]["variants"]), report["inputs"]["variants"]
    assert p["step_fidelity_all"]["max_rel_error"] <= 1e-5
    assert max(v["max_rel_error"] for v in p["per_output"].values()) <= 1e-5


def test_pyramid_and_routing_on_a_step_are_refused_in_words(step, tmp_path):
    for spec in ("sparse:pyramid=1,topk=1,block=4", "sparse:routing=2"):
        r = cli(step, "--pass", spec, "-o", tmp_path / "x.onnx", "--report", tmp_path / "r.json", "--force")
        skipped = json.loads((tmp_path / "r.json").read_text())["passes"][0]["sites_skipped"]
        assert r.returncode in (0, 1, 3) and "decoder step" in skipped[0]["reason"], (spec, r.stderr)
