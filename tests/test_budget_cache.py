"""`--budget cache=F` on a decoder step (the zoo's random-weight LLaMA step, 2 layers x 2 KV
groups): the plan streams the KV groups it chose and keeps the others' full cache, the
step's caches say so, the cache the loop holds is the one the plan reports, `attn-opt
generate` runs it through 64 tokens, a per-layer mix runs in the loop, and an unreachable
budget is one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import attn_opt
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.pipeline import budget_cache
from attn_opt.pipeline.onnx_decode import loop_of, teacher_forced
from attn_opt.tools import zoo
from conftest import _cached
from test_pipeline import cli


@pytest.fixture(scope="session")
def step(cache_dir):
    path = _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))
    _, _, gv = onnx_adapter.load_view(str(path))
    return path, loop_of(gv, onnx_adapter.input_specs(gv))


@pytest.fixture(scope="session")
def planned(step, tmp_path_factory):
    path, _ = step
    out = tmp_path_factory.mktemp("cache") / "out.onnx"
    r = cli(path, "--budget", "cache=0.25", "--candidates", "stream:sinks=4,window=8|16", "--force", "-o", out)
    assert r.returncode == 0, r.stderr
    return out, json.loads(out.with_suffix(".plan.json").read_text()), r.stdout


def _streamed_groups(spec: str, kv_heads: int) -> set[int]:
    if spec == "dense":
        return set()
    full = dict(x.split("=") for x in spec.split(":")[1].split(",")).get("full_heads", "empty")
    return set(range(kv_heads)) - ({int(g) for g in full.split("+")} if full != "empty" else set())


def test_plan_meets_the_budget_and_the_caches_follow_it(step, planned):
    path, loop = step
    out, plan, stdout = planned
    assert "plan for --budget cache=0.25" in stdout
    assert plan["cost"] <= 0.25 and plan["cache_bytes"]["plan"] < plan["cache_bytes"]["original"]
    # the cache is the sum of the sites' own: the predicted fraction is the measured one
    assert plan["cost"] == pytest.approx(plan["cache_bytes"]["plan_fraction_measured"], abs=1e-12)
    shapes = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in onnx.load(str(out)).graph.input}
    for sid, e in plan["sites"].items():
        i = int(sid[1:])
        streamed = _streamed_groups(e["spec"], 2)
        assert shapes[f"past_key_values.{i}.key"] == 2 - len(streamed)
        assert shapes.get(f"past_key_values.{i}.key_stream", 0) == len(streamed)
    # the cache the written step holds after the search's tokens is the one the plan reports
    tokens = budget_cache.tokens_for({}, loop, zoo.VOCAB, 0)[0]
    assert tokens.shape == (budget_cache.SEARCH_ROWS, budget_cache.SEARCH_TOKENS)
    got = teacher_forced(onnx_adapter.load(str(out)), loop, tokens)
    assert got.cache_bytes == plan["cache_bytes"]["plan"]
    assert teacher_forced(onnx_adapter.load(str(path)), loop, tokens).cache_bytes == plan["cache_bytes"]["original"]


def test_generate_runs_the_plan_64_tokens(planned, tmp_path):
    out, plan, _ = planned
    np.save(tmp_path / "p.npy", np.random.default_rng(0).integers(1, zoo.VOCAB, (1, 4)))
    r = cli("generate", out, "--prompt-ids", tmp_path / "p.npy", "--max-new-tokens", "64", "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert g["new_tokens"] == 64 and len(g["tokens"][0]) == 64
    # 4 + 64 - 1 tokens: a streamed group holds 4 sinks + its window, a full one every position
    held = 0
    for e in plan["sites"].values():
        streamed = _streamed_groups(e["spec"], 2)
        window = int(dict(x.split("=") for x in e["spec"].split(":")[1].split(","))["window"]) if streamed else 0
        held += len(streamed) * (4 + window) + (2 - len(streamed)) * 67
    assert g["cache_bytes"] == 2 * held * 8 * 4  # key and value, head dim 8, float32


def test_a_per_layer_mix_runs_in_the_loop(step):
    """One layer streaming every group, the other one group, and a full layer: each runs in
    the loop and holds what its groups keep (the mask stays over every position)."""
    path, loop = step
    tokens = np.random.default_rng(3).integers(1, zoo.VOCAB, (2, 40))
    for plan, held in (({"a0": "stream:sinks=2,window=8,full_heads=empty", "a1": "dense"}, 2 * 10 + 2 * 39),
                       ({"a0": "stream:sinks=2,window=8,full_heads=1", "a1": "dense"}, 10 + 39 + 2 * 39)):
        model, _ = attn_opt.optimize(str(path), plan=plan, force=True, check="none")
        got = teacher_forced(model, loop, tokens)  # a path in, the OnnxModel out
        assert got.cache_bytes == 2 * 2 * held * 8 * 4, plan
        assert np.isfinite(got.logprob).all()


def test_unreachable_cache_budget_refused(step, tmp_path):
    path, _ = step
    out = tmp_path / "o.onnx"
    r = cli(path, "--budget", "cache=0.05", "--candidates", "stream:sinks=4,window=8", "--force", "-o", out)
    assert r.returncode != 0 and "cannot be met: the cheapest the candidates reach is cache=0.19" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = cli(path, "--budget", "cache=0.5", "--candidates", "sparse:window=8", "-o", out)
    assert r.returncode != 0 and "give stream candidates" in r.stderr and not out.exists()
