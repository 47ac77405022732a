"""Decoder steps with a KV cache (inputs past_key_values.*, outputs present.*), exported
both ways: every site is found with its cache, the generation loop in ONNX Runtime is
the model's own greedy decoding, fuse is exact on the step and through the loop (as
ONNX Attention, or as ORT GroupQueryAttention with fuse:target=ort, a sink logit as its
head_sink), and bad decoder inputs are one-line errors."""

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
SINK_LOGITS = {"gpt-oss"}  # decoders whose attention concatenates a learned sink logit per head


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
    if name in SINK_LOGITS:  # Attention has no sink logit: GroupQueryAttention's head_sink is it
        fused = _gqa_nodes(out)
        assert [(n.input[3], n.output[1], n.input[11]) for n in fused] == \
            [(f"past_key_values.{i}.key", f"present.{i}.key", f"attn_opt.a{i}.sink_logit") for i in range(2)]
    else:
        fused = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Attention"]
        assert [(n.input[4], n.output[1]) for n in fused] == \
            [(f"past_key_values.{i}.key", f"present.{i}.key") for i in range(2)]
    assert all(s.cache is not None for s in attn_opt.inspect(str(out)).sites)  # the fused step is still a loop
    _same_loop(src, out, tmp_path)


def _same_loop(src, out, tmp_path):
    """`generate --compare`: 33 greedy steps of `out` against `src`, the same tokens."""
    np.save(tmp_path / "p.npy", np.array([[5, 6, 7, 8]]))
    r = cli("generate", src, "--prompt-ids", tmp_path / "p.npy", "--max-new-tokens", 33, "--compare", out, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["compare"]["steps"] == 33 and got["compare"]["max_rel_error"] <= 1e-4
    assert got["compare"]["token_agreement"] == 1.0 and got["total_tokens"] == 36


def _gqa_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("name,exporter", CASES)
def test_fuse_ort_is_group_query_attention_through_the_loop(step_onnx, tmp_path, name, exporter):
    """fuse:target=ort: each step site becomes GroupQueryAttention reading the step's own
    past inputs and writing its present outputs (GPT-2's MHA too), exact on the step, on
    the padded batch (a row that sees one key, a row that sees none) and the longer one,
    and through the loop."""
    src, out, rep = step_onnx(name, exporter), tmp_path / "g.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", "fuse:target=ort", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    p = report["passes"][0]
    assert {"padded", "length+5", "decode x4"} <= set(report["inputs"]["variants"])
    assert any(k.endswith("@padded") for k in p["per_output"]) and any(k.endswith("@length+5") for k in p["per_output"])
    assert p["sites_rewritten"] == ["a0", "a1"] and p["step_fidelity_all"]["max_rel_error"] <= 1e-4
    assert all("GroupQueryAttention (com.microsoft) with past_key/past_value in and present_key/present_value out"
               in note and note.endswith("asked for") for note in p["notes"])
    fused = _gqa_nodes(out)
    assert [(n.input[3], n.input[4], n.output[1], n.output[2]) for n in fused] == \
        [(f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")
         for i in range(2)]
    cfg = zoo.DECODERS[name][2]
    kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads", cfg.get("n_head")))
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in fused]
    assert all(a["kv_num_heads"] == kv and a["do_rotary"] == 0 for a in attrs)
    assert not any(n.op_type == "Attention" for n in onnx.load(str(out)).graph.node)
    sites = attn_opt.inspect(str(out)).sites  # the fused step is still a loop, its mask read back
    assert [(s.rule, s.cache.past_key, s.mask) for s in sites] == \
        [("ms-gqa", f"past_key_values.{i}.key", "additive") for i in range(2)]
    _same_loop(src, out, tmp_path)


def test_fuse_on_a_step_chooses_and_says_why(step_onnx, tmp_path):
    """target=onnx keeps Attention; auto times both at the site's shape and says so; a
    step GroupQueryAttention cannot take gets Attention with the reason."""
    import dataclasses

    from attn_opt.backends.onnx.fused import choose

    src = step_onnx("llama", "torchscript")
    site = attn_opt.inspect(str(src)).sites[0]
    assert choose(site, "ort") == ("gqa", "asked for") and choose(site, "onnx")[0] == "onnx"
    pick, why = choose(dataclasses.replace(site, causal=False), "ort")
    assert pick == "onnx" and why.startswith("not GroupQueryAttention: not causal")
    pick, why = choose(site, "auto")
    assert pick in ("onnx", "gqa") and "ms vs GroupQueryAttention" in why and "S=16 past=8" in why
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "fuse:target=auto", "-o", tmp_path / "a.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert all("ms vs GroupQueryAttention" in note for note in p["notes"])
    assert p["step_fidelity_all"]["max_rel_error"] <= 1e-4


def test_a_sink_logit_step_fuses_to_head_sink(step_onnx, tmp_path):
    """sinkfree:mode=logit, then (in a second run: fuse after a form pass is refused in one)
    fuse:target=ort: GroupQueryAttention's head_sink is the sink logit, exact through the
    loop; Attention has no sink logit, so target=onnx skips the sites, saying so."""
    src, sf = step_onnx("llama", "torchscript"), tmp_path / "sf.onnx"
    r = cli(src, "--pass", "sinkfree:mode=logit,bias=0.5", "--pass", "fuse:target=ort", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "would undo that form" in r.stderr
    assert cli(src, "--pass", "sinkfree:mode=logit,bias=0.5", "-o", sf).returncode == 0
    out, rep = tmp_path / "g.onnx", tmp_path / "r.json"
    r = cli(sf, "--pass", "fuse:target=ort", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"] and p["step_fidelity_all"]["max_rel_error"] <= 1e-4
    assert all("the sink logit as head_sink" in note for note in p["notes"])
    assert all(len(n.input) > 11 and n.input[11] for n in _gqa_nodes(out))
    assert [s.normaliser.bias for s in attn_opt.inspect(str(out)).sites] == [(0.5,) * 4] * 2
    _same_loop(sf, out, tmp_path)
    r = cli(sf, "--pass", "fuse:target=onnx", "-o", tmp_path / "o.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and not p["sites_rewritten"]
    assert all("sink logit" in s["reason"] for s in p["sites_skipped"])


def test_the_loop_is_the_models_own_greedy_decoding(step_onnx):
    """ONNX Runtime's loop (cache fed back) picks the tokens torch's step module picks."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import generate, loop_of

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
    rep = tmp_path / "r.json"  # stream skips each site of it, saying why; the step itself still runs
    r = cli(tmp_path / "static.onnx", "--pass", "stream:window=4", "-o", tmp_path / "s.onnx", "--report", rep,
            "--input-shape", "input_ids=1x2", "--input-shape", "attention_mask=1x5", "--input-shape", "position_ids=1x2")
    assert r.returncode == 0, r.stderr
    assert all("static length" in s["reason"] for s in json.loads(rep.read_text())["passes"][0]["sites_skipped"])
    r = cli("generate", zoo_path := tmp_path / "p.npy", "--prompt-ids", zoo_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    np.save(tmp_path / "f.npy", np.zeros((1, 2), np.float32))
    r = cli("generate", src, "--prompt-ids", tmp_path / "f.npy")
    assert r.returncode == 2 and "integer token ids" in r.stderr


@pytest.mark.parametrize("name,exporter", [("llama", "torchscript"), ("llama", "dynamo"), ("gpt2", "torchscript"),
                                           ("gpt-oss", "torchscript")])
def test_stream_caps_the_cache_and_is_exact_while_it_fits(step_onnx, tmp_path, name, exporter):
    """stream:sinks=2,window=6: present holds 8 positions however long the loop runs;
    the logits equal the dense step's while prompt + generated tokens fit in 8."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    src, out, rep = step_onnx(name, exporter), tmp_path / "s.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", "stream:sinks=2,window=6", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"] and "exact while a sequence fits in 8 tokens" in " ".join(p["notes"])
    dense, _, gv = onnx_adapter.load_view(str(src))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    got = compare(dense, onnx_adapter.load(str(out)), loop, np.array([[5, 6, 7, 8]]), 20)
    fits = 8 - 4 + 1  # steps whose sequence (prompt + tokens fed so far) is at most 8 long
    assert max(got["per_step_error"][:fits]) <= 1e-5
    assert max(got["per_step_error"][fits:]) > 1e-3  # beyond: the sink + window approximation
    per_layer = 2 * 2 * 8 * got["b"].cache_bytes // (2 * 2 * 8 * 1)  # bytes of the capped cache
    assert got["b"].cache_bytes == per_layer and got["b"].cache_bytes < got["a"].cache_bytes
    kv = 4 if name == "gpt2" else 2
    assert got["b"].cache_bytes == 4 * (1 * kv * 8 * 8) * 4  # 4 tensors [1, kv, 8 positions, 8] of float32
    before, after = attn_opt.inspect(str(src)).sites, attn_opt.inspect(str(out)).sites
    assert [s.normaliser for s in after] == [s.normaliser for s in before]  # a sink logit stays one


def _step_logits(sess, ids, positions, past):
    """One step in ONNX Runtime: (last logits, the present cache as the next past)."""
    n = past["past_key_values.0.key"].shape[2] + len(ids)
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, n), np.int64), "position_ids": positions[None], **past}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out["logits"][0, -1], {k.replace("present", "past_key_values"): v for k, v in out.items()
                                  if k.startswith("present")}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_stream_positions_cache_is_streaming_llm(cache_dir, tmp_path, name):
    """positions=cache: once tokens are dropped, every step's logits equal the untouched
    model's on the kept tokens (S sinks, the W most recent) at positions 0..S+W−1, which is
    StreamingLLM's re-indexing (one layer, so a cached key depends on its token alone);
    positions=original gives other logits there; both are exact before anything is dropped."""
    import onnxruntime as ort

    src = _cached(cache_dir / f"step1-{name}-torchscript.onnx",
                  lambda tmp: zoo.export_decoder_step(name, "torchscript", tmp, num_hidden_layers=1))
    sinks, window = 2, 4
    dense = ort.InferenceSession(str(src))
    cfg = zoo.DECODERS[name][2]
    empty = {f"past_key_values.0.{x}": np.zeros((1, cfg["num_key_value_heads"], 0, cfg["hidden_size"] //
                                                  cfg["num_attention_heads"]), np.float32) for x in ("key", "value")}
    toks = np.random.default_rng(0).integers(1, zoo.VOCAB, 12)
    for positions in ("cache", "original"):
        out = tmp_path / f"{positions}.onnx"
        r = cli(src, "--pass", f"stream:sinks={sinks},window={window},positions={positions}", "-o", out, "--force")
        assert r.returncode == 0, r.stderr
        sess, past, errs = ort.InferenceSession(str(out)), dict(empty), []
        for p, t in enumerate(toks):
            got, past = _step_logits(sess, np.array([t]), np.array([p]), past)
            kept = list(range(min(sinks, p + 1))) + list(range(max(sinks, p - window + 1), p + 1))
            want, _ = _step_logits(dense, toks[kept], np.arange(len(kept)), dict(empty))
            errs.append(float(np.abs(got - want).max() / np.abs(want).max()))
            assert past["past_key_values.0.key"].shape[2] == min(p + 1, sinks + window)
        fits = sinks + window
        assert max(errs[:fits]) <= 1e-5  # nothing dropped yet: exact either way
        if positions == "cache":
            assert max(errs[fits:]) <= 1e-5
        else:
            assert min(errs[fits:]) > 1e-5


def test_stream_refuses_what_it_cannot_do(step_onnx, zoo_onnx, tmp_path):
    r = cli(step_onnx("llama", "torchscript"), "--pass", "stream:window=0", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "window" in r.stderr and not (tmp_path / "o.onnx").exists()
    rep = tmp_path / "g.json"  # positions=cache on learned absolute positions (GPT-2): skipped, with the reason
    r = cli(step_onnx("gpt2", "torchscript"), "--pass", "stream:sinks=2,window=8,positions=cache", "-o",
            tmp_path / "g.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and not p["sites_rewritten"]
    assert all("re-indexes rotary positions: its queries are not rotated" in s["reason"] for s in p["sites_skipped"])
    rep = tmp_path / "r.json"  # not a decoder step: every site skipped, with the reason
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "stream:window=8", "-o", tmp_path / "b.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and not p["sites_rewritten"]
    assert all("not a decoder step" in s["reason"] for s in p["sites_skipped"])
    step, args, *_ = zoo.decoder_step("llama")  # torch: traced at the example's fixed past length
    _, report = attn_opt.optimize(step, ["stream:window=8"], example_inputs=args)
    p = report.passes[0]
    assert not p.sites_rewritten and all("static length" in s.reason for s in p.sites_skipped)


def test_torch_decoder_step_with_a_cache():
    """On torch (torch.export of a step module that fills a DynamicCache from its inputs):
    the sites and their cache are found, fuse is exact, and the torch.compile backend runs it."""
    step, args, *_ = zoo.decoder_step("llama")
    sites = attn_opt.inspect(step, example_inputs=args).sites
    assert all(s.cache is not None and s.cache.present_key for s in sites) and len(sites) == 2
    _, report = attn_opt.optimize(step, ["fuse"], example_inputs=args)
    p = report.passes[0]
    assert p.sites_rewritten == ["a0", "a1"] and p.step_fidelity_all["max_rel_error"] <= 1e-4
    compiled = torch.compile(step, backend="attn_opt")
    with torch.no_grad():
        want, got = step(*args), compiled(*args)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gpt_oss_sink_logits_are_read_and_kept(step_onnx, tmp_path, exporter):
    """gpt-oss concatenates a learned logit per head to the scores and slices its column
    off the probabilities: the site's normaliser is that sink logit (the model's own values),
    the sliding layer's window is read from its mask, fuse:target=onnx refuses it (Attention
    has no sink), and sinkfree, which replaces the sink, is not exact there."""
    src = step_onnx("gpt-oss", exporter)
    sites = attn_opt.inspect(str(src)).sites
    step, *_ = zoo.decoder_step("gpt-oss")
    want = [tuple(float(x) for x in layer.self_attn.sinks.detach()) for layer in step.model.model.layers]
    assert [s.normaliser.kind for s in sites] == ["logit"] * 2
    assert np.allclose([s.normaliser.bias for s in sites], want, atol=1e-6) and np.ptp(want) > 1
    assert [s.window for s in sites] == [4, None] and all(s.causal for s in sites)
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "fuse:target=onnx", "-o", tmp_path / "o.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and not p["sites_rewritten"]
    assert all("a sink logit, which ONNX Attention has not" in s["reason"] for s in p["sites_skipped"])
    r = cli(src, "--pass", "sinkfree:mode=logit,bias=-inf", "-o", tmp_path / "s.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"] and p["exact"] is False
    assert p["step_fidelity_all"]["max_rel_error"] > 1e-3  # the sinks are gone: not the same function
