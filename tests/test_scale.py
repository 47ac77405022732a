"""The pipeline on models whose weights live outside the graph: external data (also in a
subfolder), every pass end to end with checks, outputs with external data, the input
files untouched; --check=model|sites|none; the same options on .pt2 as on .onnx; FX and
ONNX FLOPs agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import attn_opt
from attn_opt.core.ir.onnx_model import OnnxModel
from attn_opt.tools import zoo
from test_pipeline import cli, digest

PASSES = ["fuse", "sparse:window=4,sinks=1", "gated", "softplus:n_train=16"]


@pytest.fixture(scope="module", params=["flat", "subfolder"])
def external_model(request, zoo_onnx, tmp_path_factory):
    """bert-eager saved with its weights in a data file next to it, or in a subfolder."""
    d = tmp_path_factory.mktemp(f"ext-{request.param}")
    location = "ext.onnx.data" if request.param == "flat" else "weights/ext.bin"
    (d / "weights").mkdir()
    proto = onnx.load(str(zoo_onnx("bert-eager", "dynamo")))
    onnx.save_model(proto, str(d / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=128)
    return d / "ext.onnx", d / location


def _snapshot(model: Path, data: Path):
    return digest(model), digest(data), data.stat().st_mtime_ns


@pytest.mark.parametrize("spec", PASSES)
def test_every_pass_on_external_data(external_model, tmp_path, spec):
    src, data = external_model
    before = _snapshot(src, data)
    out, rep = tmp_path / "out" / "m.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", spec, "-o", out, "--report", rep, "--force")
    assert r.returncode == 0, r.stderr
    assert _snapshot(src, data) == before
    assert (tmp_path / "out" / "m.onnx.data").exists(), "an input with external data gives an output with it"
    from onnx.external_data_helper import uses_external_data

    written = onnx.load(str(out), load_external_data=False)
    big = [t for t in written.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(uses_external_data(t) for t in big)
    onnx.checker.check_model(str(out), full_check=True)
    p = json.loads(rep.read_text())["passes"][0]
    assert len(p["sites_rewritten"]) == 2 and p["fidelity"]["max_rel_error"] is not None
    if spec == "fuse":
        assert p["step_fidelity"]["max_rel_error"] <= 1e-4
    assert len(attn_opt.inspect(str(out)).sites) == 2
    if spec in ("fuse", "gated"):  # exact: the written file computes what the input does
        feeds = {"input_ids": np.arange(1, 13).reshape(2, 6), "attention_mask": np.ones((2, 6), np.int64)}
        want, got = OnnxModel.load(src).run(feeds), OnnxModel.load(out).run(feeds)
        assert all(np.allclose(want[k], got[k], atol=1e-5) for k in want)


def test_weights_are_not_loaded(external_model):
    """Loading keeps the weights in their file: the graph proto the steps work on is small."""
    src, data = external_model
    om = OnnxModel.load(src)
    from onnx.external_data_helper import uses_external_data

    proto = om.graph_proto()
    assert proto.ByteSize() <= src.stat().st_size + 4096
    assert all(uses_external_data(t) for t in proto.graph.initializer if np.prod(t.dims) * 4 >= 1024)
    assert om.weight_bytes() > 0.9 * data.stat().st_size


def test_inline_model_weights_stay_in_the_file(tmp_path, monkeypatch):
    """A large inline model is read without its weights (they are referenced where they
    lie in the file), runs, and is written back inline weight for weight; a large
    ModelProto held in memory has its weights moved once to a temporary file instead."""
    from onnx.external_data_helper import uses_external_data

    from attn_opt.core.ir import onnx_model

    monkeypatch.setattr(onnx_model, "SPILL_MODEL_BYTES", 1)  # every model counts as large
    model, args, names = zoo.MODELS["bert-eager"].build()
    src = tmp_path / "m.onnx"
    zoo.export_module(model, args, names, "torchscript", src)
    feeds = {n: x.numpy() for n, x in zip(names, args)}
    want = onnx_model.OnnxModel.from_proto(onnx.load(str(src)), None).run(feeds)
    before = digest(src)

    om = OnnxModel.load(src)
    proto = om.graph_proto()
    big = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 >= onnx_model.SPILL_BYTES]
    assert big and all(uses_external_data(t) and t.external_data[0].value == "m.onnx" for t in big)
    assert all(np.allclose(want[k], v, atol=1e-6) for k, v in om.run(feeds).items())
    om.save(tmp_path / "back.onnx")
    assert not (tmp_path / "back.onnx.data").exists() and digest(src) == before
    a, b = onnx.load(str(src)), onnx.load(str(tmp_path / "back.onnx"))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)

    mine = onnx.load(str(src))
    mine_bytes = mine.SerializeToString()
    held = OnnxModel.from_proto(mine)
    assert mine.SerializeToString() == mine_bytes, "the caller's ModelProto is not modified"
    assert attn_opt.inspect(mine).sites and mine.SerializeToString() == mine_bytes  # and can be used again
    assert held.folder and Path(held.folder, "weights.bin").exists()
    assert all(np.allclose(want[k], v, atol=1e-6) for k, v in held.run(feeds).items())
    folder = held.folder
    del held
    import gc

    gc.collect()
    assert not Path(folder).exists(), "the temporary weight folder goes with the model"


@pytest.mark.parametrize("spec", ["fuse", "sparse:window=4"])
def test_check_sites(external_model, tmp_path, spec):
    """--check=sites: every rewritten site compared alone; exact for fuse, not for sparse."""
    src, _ = external_model
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", spec, "--check", "sites", "-o", tmp_path / "m.onnx", "--report", rep, "--force")
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["check"] == "sites" and sorted(p["per_site"]) == ["a0", "a1"]
    worst = max(s["max_rel_error"] for s in p["per_site"].values())
    assert (worst <= 1e-5) if spec == "fuse" else (worst > 1e-3)
    assert p["step_fidelity"]["max_rel_error"] == worst


def test_check_none_compares_nothing(external_model, tmp_path):
    src, _ = external_model
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "sparse:window=4", "--check", "none", "-o", tmp_path / "m.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["fidelity"] == {} and any("outputs not compared" in n for n in p["notes"])
    assert p["attention_flops_after"] < p["attention_flops_before"]


def test_check_sites_catches_a_wrong_lowering(external_model):
    """A site check that cannot fail is worth nothing: break fuse's scale, see it caught."""
    import onnx_ir as ir

    from attn_opt.pipeline import onnx_steps
    from attn_opt.core.ir.onnx_segments import check_sites
    from attn_opt import passes

    src, _ = external_model
    steps = onnx_steps.OnnxSteps()
    om = OnnxModel.load(src)
    feeds = {"input_ids": np.ones((1, 6), np.int64), "attention_mask": np.ones((1, 6), np.int64)}
    state = steps.observe(om, feeds)
    state = steps.prepare(state, passes.parse("fuse:target=onnx"), feeds)
    before = steps.snapshot(state)
    from attn_opt.pipeline.run import rewrite

    rewrite(steps, state, passes.parse("fuse:target=onnx"))
    for n in state.model.ir.graph:
        if n.op_type == "Attention":
            n.attributes["scale"] = ir.Attr("scale", ir.AttributeType.FLOAT, 500.0)
    errs = check_sites(before, state.model, ["a0", "a1"], feeds)
    assert len(errs) == 2 and all(e.max_rel_error > 1e-3 for e in errs.values()), errs


# ---- .pt2: every option means what it means on .onnx ----------------------------------

@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    model, args, _ = zoo.MODELS["bert-eager"].build()
    path = tmp_path_factory.mktemp("pt2") / "bert.pt2"
    torch.export.save(torch.export.export(model, args), str(path))
    return path


def _pt2_report(pt2, tmp_path, *extra):
    rep = tmp_path / "r.json"
    r = cli(pt2, *extra, "-o", tmp_path / "o.pt2", "--report", rep)
    return r, (json.loads(rep.read_text()) if rep.exists() else None)


def test_pt2_layers_and_sites(pt2, tmp_path):
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "sparse:window=4", "--layers", "1")
    assert r.returncode == 0, r.stderr
    p = rep["passes"][0]
    assert p["sites_rewritten"] == ["a1"] and p["sites_skipped"][0]["reason"] == "layer 0 not in --layers"
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "sparse:window=4", "--sites", "a0")
    assert rep["passes"][0]["sites_rewritten"] == ["a0"]


def test_pt2_inputs_and_shapes(pt2, tmp_path):
    ids = np.random.default_rng(0).integers(1, zoo.VOCAB, (2, 8))
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "fuse", "--inputs", tmp_path / "in.npz")
    assert r.returncode == 0, r.stderr
    assert rep["inputs"]["source"].endswith("in.npz")
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "fuse", "--input-shape", "input_ids=2x8")
    assert r.returncode == 0, r.stderr
    assert rep["inputs"]["shapes"]["input_ids"] == [2, 8]


def test_pt2_max_error_html_and_check(pt2, tmp_path):
    r, _ = _pt2_report(pt2, tmp_path, "--pass", "sparse:window=2", "--max-error", "1e-6")
    assert r.returncode == 2 and "exceeds --max-error" in r.stderr and not (tmp_path / "o.pt2").exists()
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "sparse:window=2", "--html", tmp_path / "d.html")
    assert r.returncode == 0, r.stderr
    assert "sparse" in (tmp_path / "d.html").read_text()
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "fuse", "--check", "none")
    assert r.returncode == 0 and rep["passes"][0]["fidelity"] == {}
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "sparse:window=2", "--check", "sites", "--force")
    assert r.returncode == 0, r.stderr
    per_site = rep["passes"][0]["per_site"]
    assert sorted(per_site) == ["a0", "a1"] and all(s["max_rel_error"] > 1e-3 for s in per_site.values())
    r, rep = _pt2_report(pt2, tmp_path, "--pass", "fuse", "--check", "sites")
    assert r.returncode == 0, r.stderr
    per_site = rep["passes"][0]["per_site"]
    assert sorted(per_site) == ["a0", "a1"] and all(s["max_rel_error"] <= 1e-5 for s in per_site.values())


@pytest.mark.parametrize("name", ["bert-sdpa", "llama-eager"])
def test_fx_and_onnx_flops_agree(zoo_onnx, name):
    """One definition of FLOPs (matrix products) on both IRs: within 1% on the same model,
    SDPA included (torch's CPU kernel is counted)."""
    model, args, names = zoo.MODELS[name].build()
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    _, fx = attn_opt.optimize(model, ["fuse"], example_inputs=args)
    _, ox = attn_opt.optimize(str(zoo_onnx(name, "dynamo")), ["fuse"], feeds=feeds)
    f, o = fx.passes[0], ox.passes[0]
    assert f.flops_before == pytest.approx(o.flops_before, rel=0.01)
    assert f.attention_flops_before == pytest.approx(o.attention_flops_before, rel=0.01)
    assert f.attention_flops_after == pytest.approx(o.attention_flops_after, rel=0.01) and o.attention_flops_after > 0
