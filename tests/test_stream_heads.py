"""Per-head streaming (`stream:...,full_heads=`): the named KV groups keep the full cache
under the old names, the others a capped `_stream` cache; through the generation loop it
computes what the model computes with each head's scores masked to what it keeps, is exact
while a sequence fits, keeps a cache between dense and stream; auto chooses from the
attention a window drops; a step whose groups all stay full says so and exits 0; bad
lists are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import attn_opt
from attn_opt.core.errors import UserError
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.patterns.detect import detect
from attn_opt.patterns.diagnostics import for_pass, outside_stream
from attn_opt.pipeline.onnx_decode import loop_of, teacher_forced
from attn_opt.tools import zoo
from conftest import _cached
from test_pipeline import cli

TOKENS = np.random.default_rng(0).integers(1, zoo.VOCAB, (2, 40))


@pytest.fixture(scope="session")
def step(cache_dir):
    """The random-weight LLaMA step (4 heads, 2 KV groups, 2 layers) and its loop."""
    path = _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))
    om, _, gv = onnx_adapter.load_view(str(path))
    return path, loop_of(gv, onnx_adapter.input_specs(gv))


@pytest.fixture(scope="session")
def forced(step, tmp_path_factory):
    """spec -> (teacher-forced result on TOKENS, rewritten model path)."""
    path, lp = step
    folder, memo = tmp_path_factory.mktemp("heads"), {}

    def get(spec: str | None):
        if spec not in memo:
            out = path
            if spec:
                out = folder / f"{len(memo)}.onnx"
                attn_opt.optimize(str(path), [spec], force=True)[0].save(str(out))
            memo[spec] = (teacher_forced(onnx_adapter.load(str(out)), lp, TOKENS), out)
        return memo[spec]

    return get


def test_caches_named_after_the_old_ones(forced):
    _, out = forced("stream:sinks=2,window=8,full_heads=1")
    g = onnx.load(str(out)).graph
    shape = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    ins, outs = {v.name: shape(v) for v in g.input}, {v.name: shape(v) for v in g.output}
    for i in range(2):
        for kv in ("key", "value"):
            assert ins[f"past_key_values.{i}.{kv}"][1] == 1 and ins[f"past_key_values.{i}.{kv}_stream"][1] == 1
            assert outs[f"present.{i}.{kv}"][1] == 1 and outs[f"present.{i}.{kv}_stream"][1] == 1


def test_equals_the_model_with_a_per_head_mask(forced):
    """The reference: the torch model on the whole sequence, each head's scores masked to
    what it keeps (group 0 = query heads 0, 1 streams with 2 sinks + a window of 8;
    group 1 = heads 2, 3 sees every earlier token)."""
    import torch

    dense, _ = forced(None)
    heads, _ = forced("stream:sinks=2,window=8,full_heads=1")
    uniform, _ = forced("stream:sinks=2,window=8")
    t = TOKENS.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    causal = j <= i
    stream = causal & ((i - j < 8) | (j < 2))
    mask = torch.from_numpy(np.where(np.stack([stream, stream, causal, causal]), 0.0, -1e9)).float()
    with torch.no_grad():
        logits = zoo.decoder_step("llama")[0].model.eval()(input_ids=torch.from_numpy(TOKENS),
                                                           attention_mask=mask[None].expand(2, -1, -1, -1)).logits
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, torch.from_numpy(TOKENS[:, 1:, None]))[..., 0]
    np.testing.assert_allclose(heads.logprob, ref.numpy(), atol=1e-5)
    assert np.abs(heads.logprob - dense.logprob).max() > 1e-3  # it does drop keys past 10 tokens
    assert np.abs(heads.logprob[:, :8] - dense.logprob[:, :8]).max() < 1e-5  # exact while 2 + 8 hold them
    assert uniform.cache_bytes < heads.cache_bytes < dense.cache_bytes
    # 2 layers x key/value x batch 2: 1 full group of 39 positions (the last step's) + 1 group of 10, head dim 8
    assert heads.cache_bytes == 2 * 2 * 2 * (39 + 10) * 8 * 4


def test_layer_qualified_groups(forced):
    dense, _ = forced(None)
    one, out = forced("stream:sinks=2,window=8,full_heads=0:0+1:1")
    assert np.abs(one.logprob - dense.logprob).max() > 1e-3
    assert one.cache_bytes == forced("stream:sinks=2,window=8,full_heads=1")[0].cache_bytes


def test_auto_keeps_the_groups_the_window_drops_most_from(step, tmp_path):
    path, _ = step
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(1, zoo.VOCAB, (1, 4)), "attention_mask": np.ones((1, 44), np.int64),
             "position_ids": np.arange(40, 44)[None],
             **{f"past_key_values.{i}.{kv}": rng.standard_normal((1, 2, 40, 8)).astype(np.float32) * (1 + 3 * g)
                for i in range(2) for g, kv in enumerate(("key", "value"))}}
    om, _, gv = onnx_adapter.load_view(str(path))
    sites = attn_opt.inspect(str(path)).sites
    diag = for_pass(gv, sites, feeds, 8)
    per_group = {s.id: outside_stream(diag[s.id].probs, 2, 8).reshape(2, -1).max(1) for s in sites}
    flat = sorted(v for g in per_group.values() for v in g)
    threshold = (flat[1] + flat[2]) / 2  # two groups above, two below
    _, rep = attn_opt.optimize(str(path), [f"stream:sinks=2,window=8,full_heads=auto,full_above={threshold}"],
                               feeds=feeds, force=True)
    p = rep.passes[0]
    chosen = {s.id: [g for g in range(2) if per_group[s.id][g] > threshold] for s in sites}
    for s in sites:
        said = [n for n in p.notes if n.startswith(f"{s.id}:")]
        if len(chosen[s.id]) == 2:
            assert any(k.id == s.id and "every KV group keeps the full cache" in k.reason for k in p.sites_skipped)
        else:
            assert any(f"KV groups {chosen[s.id] or 'none'} keep the full cache" in n for n in said), said


def test_all_full_says_so_and_exits_0(step, tmp_path):
    path, _ = step
    r = cli(path, "--pass", "stream:sinks=2,window=8,full_heads=0+1", "-o", tmp_path / "o.onnx",
            "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    skipped = rep["passes"][0]["sites_skipped"]
    assert len(skipped) == 2 and all("every KV group keeps the full cache" in s["reason"] for s in skipped)
    assert "every KV group keeps the full cache" in r.stdout + r.stderr


@pytest.mark.parametrize("spec,words", [("full_heads=x", "expected auto, or KV groups"),
                                        ("full_heads=0+-1", "groups and layers are >= 0"),
                                        ("full_heads=2", "has 2 KV groups"),
                                        ("full_heads=0,positions=cache", "not implemented yet")])
def test_bad_lists_are_one_line(step, tmp_path, spec, words):
    r = cli(step[0], "--pass", f"stream:sinks=2,window=8,{spec}", "-o", tmp_path / "o.onnx")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_generate_drives_both_caches(step, forced, tmp_path):
    path, _ = step
    _, out = forced("stream:sinks=2,window=8,full_heads=1")
    np.save(tmp_path / "p.npy", TOKENS[:1, :5])
    r = cli("generate", path, "--prompt-ids", tmp_path / "p.npy", "--max-new-tokens", "20", "--compare", out, "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["compare"]
    assert c["steps"] == 20 and c["per_step_error"][0] < 1e-5
    assert c["cache_bytes"] == 2 * 2 * (24 + 10) * 8 * 4  # batch 1: 24 positions in the full group, 10 capped


def test_pass_options_refused_before_running():
    from attn_opt.passes.stream import Stream

    with pytest.raises(UserError, match="expected auto"):
        Stream(window=8, full_heads="a:b")


@pytest.mark.parametrize("spec", ["{bad", '{"past.key_stream": {"of": 2}}', '{"past.key_stream": 3}'])
def test_malformed_split_metadata_is_one_line(spec):
    """A model whose cache-split metadata was edited by hand is refused in words, not
    with a traceback from the JSON or its keys."""
    from types import SimpleNamespace

    from attn_opt.core.ir.onnx_model import SPLIT_KEY, split_feeds

    model = SimpleNamespace(metadata_props={SPLIT_KEY: spec})
    with pytest.raises(UserError, match="not a valid cache split"):
        split_feeds(model, {"past.key": np.zeros((1, 2, 3, 4), np.float32)})


def _attention_flops(path, past: int, stream_past: int | None) -> int:
    """Attention matmul FLOPs of one decode step after `past` cached tokens (the
    `_stream` caches, where the model has them, hold `stream_past`)."""
    from attn_opt.core.ir.onnx_flops import count

    om, _, gv = onnx_adapter.load_view(str(path))
    feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.array([[past]])}
    for v in gv.inputs:
        if "past" in v.name:
            length = stream_past if v.name.endswith("_stream") else past
            feeds[v.name] = np.zeros((1, v.shape[1], length, v.shape[3]), np.float32)
    nodes = {n for s in detect(gv).sites for n in s.nodes}
    return count(om, feeds, nodes).attention_matmul


def test_streaming_groups_read_only_their_window(step, forced):
    """The step skips the work of what it dropped: with one of the two KV groups full, the
    attention's matrix products at a 400-token cache are about half of dense (the full
    group over 401 keys, the streaming one over 2 + 8 + 1), and growing the cache to 800
    grows them by half of what it grows dense's."""
    path, _ = step
    _, heads = forced("stream:sinks=2,window=8,full_heads=1")
    dense = {n: _attention_flops(path, n, None) for n in (400, 800)}
    split = {n: _attention_flops(heads, n, 10) for n in (400, 800)}
    assert split[400] < 0.55 * dense[400], (split, dense)
    assert abs((split[800] - split[400]) - (dense[800] - dense[400]) / 2) <= 0.01 * (dense[800] - dense[400])


def test_torch_fx_refuses_per_head_streaming_in_words():
    """torch.fx caps a stream step's whole cache: with full_heads the full groups would lose
    their positions, so the backend refuses the form and says why."""
    from attn_opt.backends.torch.fx import CAPABILITIES
    from attn_opt.patterns.form import Form, Pattern, StreamCache

    form = Form(pattern=Pattern("window", True, 8, 1, sinks=2, dense_heads=(2, 3)),
                stream=StreamCache(2, 8, full_groups=(1,)))
    assert "per-head streaming (full_heads) on torch.fx" in CAPABILITIES.limits(None, form)
    assert "per-head streaming" not in (CAPABILITIES.limits(None, Form(stream=StreamCache(2, 8))) or "")
