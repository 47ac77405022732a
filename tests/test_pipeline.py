"""The pass pipeline on ONNX: fuse on every zoo export, sparse on zoo models, the report,
and the CLI's guarantees (one-line errors, the input never touched, bounds enforced)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

import attn_opt
from attn_opt.tools import zoo

FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn_opt", *map(str, args)], capture_output=True, text=True)


def digest(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_fuse_every_zoo_model(zoo_onnx, tmp_path, name, exporter, target):
    src = zoo_onnx(name, exporter)
    before = digest(src)
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    r = cli(src, "--pass", f"fuse:target={target}", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert digest(src) == before
    report = json.loads(rep.read_text())
    p = report["passes"][0]
    assert p["exact"] and p["fidelity"]["max_rel_error"] <= 1e-4
    sites = zoo.MODELS[name].expected.sites
    assert len(p["sites_rewritten"]) + len(p["sites_skipped"]) == sites
    assert all(s["reason"].startswith("already one op") for s in p["sites_skipped"])
    m = onnx.load(str(out))
    ops = Counter(n.op_type for n in m.graph.node)
    assert sum(ops[o] for o in FUSED) == sites  # one fused op per site
    assert ops["Softmax"] == 0
    det = attn_opt.inspect(str(out))
    assert len(det.sites) == sites  # the fused model still reads as the same sites
    if target == "ort" and not zoo.MODELS[name].expected.kv_heads < zoo.MODELS[name].expected.heads:
        assert ops["MultiHeadAttention"] == len(p["sites_rewritten"])


def test_fuse_auto_says_why(zoo_onnx, tmp_path):
    rep = tmp_path / "r.json"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "fuse", "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    notes = json.loads(rep.read_text())["passes"][0]["notes"]
    assert len(notes) == 2 and all(" ms vs MultiHeadAttention " in n for n in notes)


@pytest.mark.parametrize("name", ["bert-eager", "gpt2-sdpa", "llama-eager", "t5-eager", "vit-sdpa"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_sparse_on_zoo(zoo_onnx, tmp_path, name, exporter):
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    r = cli(zoo_onnx(name, exporter), "--pass", "sparse:window=4", "-o", out, "--report", rep,
            "--input-shape", "input_ids=1x32" if name != "vit-sdpa" else "pixel_values=1x3x16x16")
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    expected = zoo.MODELS[name].expected
    assert len(p["sites_rewritten"]) == expected.sites - expected.cross
    assert all("self-attention" in s["reason"] for s in p["sites_skipped"])
    assert p["fidelity"]["nonfinite"] == 0 and 0 < p["fidelity"]["cosine"] <= 1.0 + 1e-9
    if name != "vit-sdpa":  # 17 ViT tokens: too few for a window of 4 to pay off
        assert p["attention_flops_after"] < p["attention_flops_before"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_passes_compose(zoo_onnx, tmp_path):
    rep = tmp_path / "r.json"
    r = cli(zoo_onnx("llama-eager", "dynamo"), "--pass", "fuse", "--pass", "sparse:window=8,sinks=1",
            "-o", tmp_path / "o.onnx", "--report", rep, "--input-shape", "input_ids=1x32")
    assert r.returncode == 0, r.stderr
    fuse, sparse = json.loads(rep.read_text())["passes"]
    assert fuse["sites_rewritten"] == ["a0", "a1"] and sparse["sites_rewritten"] == ["a0", "a1"]
    assert sparse["flops_before"] == fuse["flops_after"]


def test_layers_and_sites(zoo_onnx, tmp_path):
    rep = tmp_path / "r.json"
    src = zoo_onnx("t5-eager", "dynamo")
    assert cli(src, "--pass", "fuse:target=onnx", "--layers", "1", "-o", tmp_path / "o.onnx", "--report", rep).returncode == 0
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a1", "a4", "a5"]
    assert cli(src, "--pass", "fuse:target=onnx", "--sites", "a2", "-o", tmp_path / "o.onnx", "--report", rep).returncode == 0
    assert json.loads(rep.read_text())["passes"][0]["sites_rewritten"] == ["a2"]


@pytest.mark.parametrize("args,msg", [
    (["--pass", "fuse:target=gpu"], "one of onnx|ort|auto"),
    (["--pass", "nope"], "unknown pass"),
    (["--pass", "sparse:window=8,colour=red"], "unknown option"),
    ([], "no --pass"),
    (["--pass", "fuse", "--layers", "one"], "bad --layers"),
    (["--pass", "fuse", "--input-shape", "input_ids=axb"], "bad --input-shape"),
])
def test_bad_options_one_line(zoo_onnx, tmp_path, args, msg):
    src = zoo_onnx("bert-eager", "dynamo")
    before = digest(src)
    r = cli(src, *args, "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert digest(src) == before and not (tmp_path / "o.onnx").exists()


def test_missing_output_and_same_path(zoo_onnx, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(zoo_onnx("bert-eager", "dynamo").read_bytes())
    before = digest(src)
    r = cli(src, "--pass", "fuse")
    assert r.returncode == 2 and "missing -o" in r.stderr
    r = cli(src, "--pass", "fuse", "-o", src)
    assert r.returncode == 2 and "input model" in r.stderr
    assert digest(src) == before


def test_missing_and_corrupt_model(tmp_path):
    r = cli(tmp_path / "none.onnx", "--pass", "fuse", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and r.stderr.startswith("error: no such file")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    r = cli(bad, "--pass", "fuse", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_fidelity_bound_refuses_to_write(zoo_onnx, tmp_path):
    src = zoo_onnx("bert-eager", "dynamo")
    before = digest(src)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", "sparse:window=2", "--max-error", "1e-6", "-o", out, "--report", rep)
    assert r.returncode == 2 and "exceeds --max-error" in r.stderr and "nothing written" in r.stderr
    assert not out.exists() and digest(src) == before
    assert json.loads(rep.read_text())["passes"][0]["fidelity"]["max_rel_error"] > 1e-6  # the report says why
    r = cli(src, "--pass", "sparse:window=2", "--max-error", "1e-6", "--force", "-o", out)
    assert r.returncode == 0 and out.exists()


def test_npz_inputs(zoo_onnx, tmp_path):
    ids = np.random.default_rng(3).integers(1, zoo.VOCAB, (1, 24))
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    rep = tmp_path / "r.json"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "fuse", "--inputs", tmp_path / "in.npz",
            "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert json.loads(rep.read_text())["inputs"]["shapes"]["input_ids"] == [1, 24]
    np.savez(tmp_path / "bad.npz", tokens=ids)
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "fuse", "--inputs", tmp_path / "bad.npz", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "lacks" in r.stderr


def test_external_data_model(zoo_onnx, tmp_path):
    """A model whose weights live in a separate file is read whole, rewritten, and the
    input files are left as they were."""
    src = tmp_path / "ext.onnx"
    proto = onnx.load(str(zoo_onnx("bert-eager", "dynamo")))
    onnx.save_model(proto, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    before = (digest(src), digest(tmp_path / "ext.onnx.data"))
    assert len(attn_opt.inspect(str(src)).sites) == 2
    out = tmp_path / "out" / "fused.onnx"
    r = cli(src, "--pass", "fuse", "-o", out)
    assert r.returncode == 0, r.stderr
    assert (digest(src), digest(tmp_path / "ext.onnx.data")) == before
    assert len(attn_opt.inspect(str(out)).sites) == 2


def test_check_none_on_torch_runs_nothing(monkeypatch):
    """check=none on a torch program computes nothing of the model: its one pass is over
    fake tensors; the only real values are the small cone of nodes detection reads
    (masks, scale factors), never a whole run, never an output comparison."""
    from torch._subclasses.fake_tensor import FakeTensor

    from attn_opt.pipeline import fx_steps
    from attn_opt.tools import zoo

    runs, whole = [], []
    real_run = fx_steps._Run.run

    def spy(self, *args, **kw):
        runs.append((any(isinstance(a, FakeTensor) for a in args), self.only))
        return real_run(self, *args, **kw)

    monkeypatch.setattr(fx_steps._Run, "run", spy)
    real_module = fx_steps.run_module
    monkeypatch.setattr(fx_steps, "run_module", lambda *a, **k: whole.append(a) or real_module(*a, **k))
    model, args, _ = zoo.MODELS["bert-eager"].build()
    _, checked = attn_opt.optimize(model, ["fuse"], example_inputs=args)  # the default runs it whole and compares
    assert checked.passes[0].fidelity and any(not fake and only is None for fake, only in runs)
    runs.clear(), whole.clear()
    gm, report = attn_opt.optimize(model, ["fuse"], example_inputs=args, check="none")
    assert report.passes[0].sites_rewritten and report.passes[0].fidelity == {}
    assert not whole and runs
    n_nodes = len(list(gm.graph.nodes))
    for fake, only in runs:  # each run is fake, or real on a cone far smaller than the program
        assert fake or (only is not None and len(only) < n_nodes / 4), (fake, only and len(only))
