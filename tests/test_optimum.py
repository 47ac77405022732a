"""Hugging Face Optimum exports (tests/fixtures/optimum/, built by tools/optimum_fixtures.py
with optimum-onnx 0.1 in a venv of its own, from tiny configs with random weights):
every site found (inside the merged decoder's If too), a folder listed file by file,
the forms rewrite them, and `attn-opt generate` drives Optimum's names
(`past_key_values.N.key` -> `present.N.key`, `use_cache_branch`) before and after every
pass: fuse exact through 33 generated tokens, stream caps the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import attn_opt
from attn_opt.tools.cli import main

FIX = Path(__file__).parent / "fixtures" / "optimum"
LLAMA, MERGED = FIX / "llama" / "model.onnx", FIX / "llama-merged" / "decoder_model_merged.onnx"
SITES = {  # file -> (kind, causal) per site; None where the branch not taken leaves it unknown
    "bert/model.onnx": [("self", False)] * 2,
    "t5/encoder_model.onnx": [("self", False)] * 2,
    "t5/decoder_model.onnx": [("self", True), ("cross", False)] * 2,
    "t5/decoder_with_past_model.onnx": [("self", True), ("cross", False)] * 2,
    "t5/decoder_model_merged.onnx": [("self", True), ("cross", False)] * 4,
    "llama/model.onnx": [("self", True)] * 2,
    "llama-merged/decoder_model_merged.onnx": [("self", None)] * 2 + [("self", True)] * 2,
}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # what a session fixture's rewrite printed in this test
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def prompt(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompt") / "p.npy"
    np.save(p, np.array([[3, 17, 42, 9, 77, 5]], dtype=np.int64))
    return p


@pytest.fixture(scope="session")
def rewritten(tmp_path_factory):
    """The decoder after a chain of passes, each written once per session."""
    made = {}

    def get(src: Path, *specs: str) -> tuple[Path, dict]:
        key = (src, specs)
        if key not in made:
            d = tmp_path_factory.mktemp("rewritten")
            out, rep = d / "out.onnx", d / "report.json"
            args = [str(src)] + [a for s in specs for a in ("--pass", s)] + ["-o", str(out), "--report", str(rep),
                                                                           "--force"]
            assert main(args) == 0
            made[key] = (out, json.loads(rep.read_text()))
        return made[key]

    return get


def generate(capsys, model, prompt, other=None, tokens=33) -> dict:
    code, out, err = run_cli(capsys, "generate", model, "--prompt-ids", prompt, "--max-new-tokens", tokens, "--json",
                             *(("--compare", other) if other else ()))
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", list(SITES))
def test_every_site_found(name):
    sites = attn_opt.inspect(str(FIX / name)).sites
    assert [s.kind for s in sites] == [k for k, _ in SITES[name]]
    assert all(s.kind == k and (c is None or s.causal == c) for s, (k, c) in zip(sites, SITES[name]))


def test_merged_sites_are_in_both_branches():
    ids = [s.id for s in attn_opt.inspect(str(MERGED)).sites]
    assert ids == ["optimum::if/then/a0", "optimum::if/then/a1", "optimum::if/else/a0", "optimum::if/else/a1"]
    # the branch the inputs do not take is run alone (ORT's optimizations off: they broke T5's no-cache branch)
    for name, heads in ((MERGED, 4), (FIX / "t5/decoder_model_merged.onnx", 4)):
        assert [s.heads for s in attn_opt.inspect(str(name)).sites] == [heads] * len(SITES[str(name.relative_to(FIX))])


def test_decoder_sites_carry_their_cache():
    sites = attn_opt.inspect(str(LLAMA)).sites
    assert [(s.kv_heads, s.heads) for s in sites] == [(2, 4)] * 2
    assert [(s.cache.past_key, s.cache.present_key, s.cache.present_value) for s in sites] == \
        [(f"past_key_values.{i}.key", f"present.{i}.key", f"present.{i}.value") for i in range(2)]


def test_folder_lists_every_onnx_file(capsys):
    code, out, err = run_cli(capsys, "inspect", FIX, "--json")
    assert code == 0, err
    got = {str(Path(m["model"]).relative_to(FIX)): len(m["sites"]) for m in json.loads(out)["models"]}
    assert got == {k: len(v) for k, v in SITES.items()}
    code, out, _ = run_cli(capsys, "inspect", FIX / "t5")
    assert code == 0 and "4 ONNX file(s)" in out and "18 attention site(s) in all" in out


def test_folder_without_onnx_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 2 and err.strip().count("\n") == 0 and "no .onnx file" in err
    code, _, err = run_cli(capsys, "inspect", FIX, "--attention")
    assert code == 2 and "folder" in err


def test_fused_step_keeps_its_cache_pairs(rewritten):
    """The bug: after fuse, the Concat that paired past_key_values.N.key with present.N.key
    is inside the Attention op (a leftover Concat still reads the past for a Shape), and
    the loop found no present for the keys."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import loop_of

    out, report = rewritten(LLAMA, "fuse")
    assert report["passes"][0]["sites_rewritten"] == ["a0", "a1"]
    _, _, gv = onnx_adapter.load_view(str(out))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    assert sorted(loop.pairs) == sorted((f"present.{i}.{kv}", f"past_key_values.{i}.{kv}")
                                        for i in range(2) for kv in ("key", "value"))


def test_fuse_exact_through_33_tokens(capsys, rewritten, prompt):
    out, _ = rewritten(LLAMA, "fuse")
    assert any(n.op_type == "Attention" for n in onnx.load(str(out)).graph.node)
    got = generate(capsys, LLAMA, prompt, out)
    c = got["compare"]
    assert c["steps"] == 33 and c["max_rel_error"] <= 1e-5 and c["token_agreement"] == 1.0
    assert got["total_tokens"] == 6 + 33 - 1


def test_merged_decoder_drives_use_cache_branch(capsys, prompt):
    """Optimum's merged decoder (an If on use_cache_branch) gives the plain decoder's tokens."""
    c = generate(capsys, LLAMA, prompt, MERGED)["compare"]
    assert c["steps"] == 33 and c["max_rel_error"] <= 1e-5 and c["token_agreement"] == 1.0


def test_fuse_on_merged_decoder(capsys, rewritten, prompt):
    out, report = rewritten(MERGED, "fuse")
    assert len(report["passes"][0]["sites_rewritten"]) == 4
    c = generate(capsys, MERGED, prompt, out)["compare"]
    assert c["max_rel_error"] <= 1e-5 and c["token_agreement"] == 1.0


@pytest.mark.parametrize("specs", [("sparse:window=4",), ("gated",), ("softplus",), ("fuse", "gated")])
def test_forms_rewrite_the_decoder_and_it_still_generates(capsys, rewritten, prompt, specs):
    out, report = rewritten(LLAMA, *specs)
    assert all(p["sites_rewritten"] == ["a0", "a1"] for p in report["passes"]), report["passes"]
    c = generate(capsys, LLAMA, prompt, out, tokens=12)["compare"]
    assert c["steps"] == 12 and np.isfinite(c["max_rel_error"])


def test_stream_caps_the_cache(capsys, rewritten, prompt):
    out, _ = rewritten(LLAMA, "stream:window=8,sinks=2")
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in onnx.load(str(out)).graph.output}
    assert shapes["present.0.key"][1:] == [2, shapes["present.0.key"][2], 8]
    got = generate(capsys, LLAMA, prompt, out)
    c = got["compare"]
    # 2 layers x (key, value) x 2 kv heads x (2 sinks + 8 recent) x 8 dims x 4 bytes
    assert c["cache_bytes"] == 2 * 2 * 2 * 10 * 8 * 4 < got["cache_bytes"]
    first = c["per_step_error"][: 10 - 6]  # exact while the sequence fits in sinks + window
    assert max(first) <= 1e-5 and c["max_rel_error"] > 1e-3


@pytest.mark.parametrize("name", ["bert/model.onnx", "t5/encoder_model.onnx", "t5/decoder_model.onnx"])
def test_forms_rewrite_encoders_and_seq2seq(rewritten, name):
    _, report = rewritten(FIX / name, "fuse", "sparse:window=4")
    n, own = len(SITES[name]), sum(k == "self" for k, _ in SITES[name])
    assert [len(p["sites_rewritten"]) for p in report["passes"]] == [n, own]
    assert all("self-attention" in s["reason"] for s in report["passes"][1]["sites_skipped"])  # T5's cross sites
    assert report["passes"][0]["exact"] and report["passes"][0]["fidelity"]["max_rel_error"] <= 1e-4


def test_a_cache_not_returned_is_one_line(capsys, tmp_path, prompt):
    """Negative: with present.0.key dropped from the outputs neither the structure nor the
    names pair past_key_values.0.key, and generate says so in one line."""
    m = onnx.load(str(LLAMA))
    keep = [o for o in m.graph.output if o.name != "present.0.key"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    code, _, err = run_cli(capsys, "generate", bad, "--prompt-ids", prompt)
    assert code == 2 and "past_key_values.0.key" in err and "does not return it" in err
    assert err.strip().count("\n") == 0


def test_present_by_name_wants_the_same_rank_and_dtype():
    from attn_opt.core.graph import Value
    from attn_opt.patterns.cache import present_by_name

    past = Value("past_key_values.3.key", shape=(1, 2, None, 8), dtype="float32")
    assert present_by_name(past, [Value("present.3.key", shape=(1, 2, None, 8), dtype="float32")]) == "present.3.key"
    assert present_by_name(past, [Value("present.3.key", shape=(1, 2, 8), dtype="float32")]) is None
    assert present_by_name(past, [Value("present.3.key", shape=(1, 2, None, 8), dtype="float16")]) is None
    assert present_by_name(Value("past_key_0", shape=(1, 2, None, 8), dtype="float32"),
                           [Value("present_key_0", shape=(1, 2, None, 8), dtype="float32")]) == "present_key_0"
    assert present_by_name(Value("pastry", shape=(1, 2, None, 8), dtype="float32"),
                           [Value("presentry", shape=(1, 2, None, 8), dtype="float32")]) is None


def test_seq2seq_step_inputs_are_consistent():
    """T5's decoder with past: the cross-attention cache is as long as the encoder's mask
    (Optimum names both encoder_sequence_length), the self-attention cache grows; the
    generated inputs run, so every site is read from a run."""
    from attn_opt.core.inputs import make_inputs
    from attn_opt.core.ir import onnx as onnx_adapter

    for name in ("t5/decoder_with_past_model.onnx", "t5/decoder_model_merged.onnx"):
        om, _, gv = onnx_adapter.load_view(str(FIX / name))
        feeds = make_inputs(onnx_adapter.input_specs(gv))
        assert feeds["encoder_attention_mask"].shape[1] == feeds["past_key_values.0.encoder.key"].shape[2]
        om.run(feeds)  # raises where the shapes disagree
    det = attn_opt.inspect(str(FIX / "t5/decoder_with_past_model.onnx"))
    assert det.probe_error is None and all(s.heads == 4 for s in det.sites)


def test_shape_inference_keeps_the_merged_decoder_runnable():
    """onnx's data propagation gives a 1-D shape tensor in the no-cache branch rank 4; the
    model with inferred shapes must still load in ORT."""
    from attn_opt.core.ir import onnx as onnx_adapter

    om, _, _ = onnx_adapter.load_view(str(MERGED))
    assert om.session() is not None
