"""Calibration (--calibrate): the fit recovers what a per-head affine can represent, it
improves every approximate form on a zoo model without touching the graph's structure,
and bad calibration files are one-line errors with nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import attn_opt
from attn_opt.patterns.form import Normaliser
from attn_opt.patterns.reference import normalise
from attn_opt.pipeline import calibrate
from attn_opt.tools import zoo
from test_pipeline import cli


def test_fit_recovers_a_temperature():
    """Softmax data that a per-head temperature explains (softmax(τ_h S) V, τ = 2, 0.5, 1.5,
    3) is recovered to 1e-4."""
    rng = np.random.default_rng(0)
    s, v = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 5))
    vis = np.ones(s.shape, bool)
    tau = np.array([2.0, 0.5, 1.5, 3.0])
    target = normalise(Normaliser(), s * tau[None, :, None, None], vis) @ v
    values, before, after = calibrate.fit(s, vis, v, target, Normaliser(), steps=2000)
    assert before > 0.05 and after <= 1e-4
    np.testing.assert_allclose(values["temperature"], tau, rtol=1e-3)


@pytest.mark.parametrize("kind,name,truth", [
    ("softplus", "p", [1.0, 2.0, 0.5, 1.5]),
    ("redistribute", "alpha", [0.2, 0.5, 0.9, 1.0]),
    ("logit", "bias", [0.0, 1.0, -1.0, 2.0]),
])
def test_fit_recovers_each_forms_own_parameter(kind, name, truth):
    """Data made by the form with per-head values of its own parameter (softplus power,
    redistribute α, sink logit) is matched, and those values found, from the form's
    defaults."""
    rng = np.random.default_rng(1)
    s, v = rng.standard_normal((4, 4, 8, 8)) * 2, rng.standard_normal((4, 4, 8, 5))
    vis = np.ones(s.shape, bool)
    start = {"softplus": Normaliser("softplus"), "redistribute": Normaliser("redistribute", alpha=0.5, sinks=1),
             "logit": Normaliser("logit", bias=(0.5,) * 4)}[kind]
    true = start.calibrate({name: np.asarray(truth)}, heads=4)
    target = normalise(true, s, vis) @ v
    values, before, after = calibrate.fit(s, vis, v, target, start, steps=1500)
    assert before > 1e-2 and after <= 2e-3, (before, after)
    found = values[name] - values["offset"] if kind == "logit" else values[name]  # a sink logit is b − offset
    np.testing.assert_allclose(found, truth, atol=0.1)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, zoo_onnx):
    from attn_opt.core.inputs import make_inputs
    from attn_opt.core.ir import onnx as onnx_adapter

    src = zoo_onnx("bert-eager", "dynamo")
    f = make_inputs(onnx_adapter.input_specs(onnx_adapter.view(onnx_adapter.load(str(src)))),
                    {"input_ids": (8, 16), "attention_mask": (8, 16)}, seed=3, pad=True)
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(path, **f)
    return src, path


@pytest.mark.parametrize("spec", ["sparse:window=4", "softplus", "sigmoid", "sinkfree:mode=relu"])
def test_calibration_improves_each_form(calib, tmp_path, spec):
    src, cal = calib
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", spec, "--calibrate", cal, "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    c = json.loads(rep.read_text())["passes"][0]["calibration"]
    assert [s["site"] for s in c["sites"]] == ["a0", "a1"] and [s["layer"] for s in c["sites"]] == [0, 1]
    for s in c["sites"]:
        assert s["error_after"] < s["error_before"] and (s["reverted"] or s["heldout_after"] <= s["heldout_before"])
    b, a = c["model_error_before"], c["model_error_after"]
    assert all(x is not None for x in (b["calibration"], b["heldout"], a["calibration"], a["heldout"]))
    if spec != "sparse:window=4":  # the new normalisers gain a lot; the window's loss is mostly what it drops
        assert a["heldout"] < b["heldout"] / 2


def test_calibration_changes_values_not_structure(calib, tmp_path, monkeypatch):
    """The same pass with the fit switched off gives the same graph; only the sites'
    temperature/offset/gain initializers differ."""
    src, cal = calib
    fitted = attn_opt.optimize(str(src), ["softplus"], calibrate=str(cal))[0]
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: [])
    identity = attn_opt.optimize(str(src), ["softplus"], calibrate=str(cal))[0]
    a, b = fitted.graph_proto().graph, identity.graph_proto().graph
    assert [(n.op_type, list(n.input)) for n in a.node] == [(n.op_type, list(n.input)) for n in b.node]
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.initializer}
    changed = sorted(k for k in wa if not np.array_equal(wa[k], wb[k]))
    assert changed and all(k.startswith("attn_opt.a") and k.split(".")[-1] in Normaliser("softplus").tunable()
                           for k in changed)
    assert {k.split(".")[-1] for k in changed} >= {"kappa", "p"}  # softplus's own parameters are fitted too


def test_bad_calibration_files(calib, tmp_path):
    src, cal = calib
    data = dict(np.load(cal))
    cases = {
        "names": {"ids": data["input_ids"], "attention_mask": data["attention_mask"]},
        "rank": {"input_ids": data["input_ids"][0], "attention_mask": data["attention_mask"]},
        "empty": {"input_ids": data["input_ids"][:0], "attention_mask": data["attention_mask"][:0]},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "text.npz").write_text("not an archive")
    for name, want in (("names", "lacks"), ("rank", "has shape"), ("empty", "is empty"), ("text", "not a .npz")):
        out = tmp_path / f"{name}.onnx"
        r = cli(src, "--pass", "softplus", "--calibrate", tmp_path / f"{name}.npz", "-o", out)
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not out.exists()


def test_calibration_and_healing_on_torch():
    """On torch.fx the affine is nn.Parameters: calibration fits them layer by layer, then
    attn_opt.heal trains only them end to end against the original module."""
    model, args, names = zoo.MODELS["bert-eager"].build()
    rng = np.random.default_rng(5)
    cal = {"input_ids": rng.integers(1, zoo.VOCAB, (2, args[0].shape[1])), "attention_mask": np.ones(args[1].shape,
                                                                                                    np.int64)}
    gm, report = attn_opt.optimize(model, ["sigmoid"], example_inputs=args, calibrate=cal)
    c = report.passes[0].calibration
    assert all(s.error_after < s.error_before for s in c.sites)
    assert c.model_error_after["calibration"] < c.model_error_before["calibration"]
    assert {n for n, _ in gm.named_parameters() if n.startswith("attn_opt_")} == {
        f"attn_opt_a{i}_{p}" for i in range(2) for p in ("temperature", "offset", "gain")}
    data = {p: a.numpy() for p, a in zip(names, args)}
    weights = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("attn_opt_")}
    got = attn_opt.heal(gm, data, model, steps=50)
    assert got["loss_after"] < got["loss_before"]
    assert all(torch.equal(p, weights[n]) for n, p in gm.named_parameters() if n in weights)  # the model's own stay
    with pytest.raises(attn_opt.UserError, match="no attn-opt parameters"):
        attn_opt.heal(attn_opt.optimize(model, ["fuse"], example_inputs=args)[0], data, model)


def test_lora_fits_the_output_projection(calib, tmp_path):
    """--lora R adds x·A·B after each rewritten site's output projection (B = 0, the
    function unchanged) and calibration fits it on what error is left: the projection's
    error falls on the calibration rows and on the held-out ones, and the model's too."""
    src, cal = calib
    plain = attn_opt.optimize(str(src), ["sparse:window=4"], calibrate=str(cal))[1].passes[0].calibration
    model, report = attn_opt.optimize(str(src), ["sparse:window=4"], calibrate=str(cal), lora=4)
    c = report.passes[0].calibration
    for s in c.sites:
        lo = s.lora
        assert lo.rank == 4 and lo.error_after < lo.error_before
        assert lo.heldout_after < lo.heldout_before and not lo.reverted
        assert lo.a is None and lo.b is None  # the factors live in the model, not in the report
    assert c.model_error_after["heldout"] < plain.model_error_after["heldout"]
    g = model.graph_proto().graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    assert inits["attn_opt.a0.lora_a"].shape == (32, 4) and inits["attn_opt.a0.lora_b"].shape == (4, 32)
    assert np.abs(inits["attn_opt.a0.lora_b"]).max() > 0
    reads = [n for n in g.node if n.op_type == "MatMul" and "attn_opt.a0.lora_a" in n.input]
    assert len(reads) == 1
    r = cli(src, "--pass", "sparse:window=4", "--lora", "4", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "--calibrate" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_lora_on_torch_is_trained_by_heal():
    model, args, names = zoo.MODELS["bert-eager"].build()
    rng = np.random.default_rng(5)
    cal = {"input_ids": rng.integers(1, zoo.VOCAB, tuple(args[0].shape)), "attention_mask": np.ones(args[1].shape,
                                                                                                 np.int64)}
    gm, report = attn_opt.optimize(model, ["sparse:window=2"], example_inputs=args, calibrate=cal, lora=2)
    sites = report.passes[0].calibration.sites
    assert all(s.lora.error_after < s.lora.error_before for s in sites)
    own = {n for n, _ in gm.named_parameters() if n.startswith("attn_opt_")}
    assert {f"attn_opt_a{i}_lora_{x}" for i in range(2) for x in "ab"} <= own
    got = attn_opt.heal(gm, {p: a.numpy() for p, a in zip(names, args)}, model, steps=20)
    assert got["loss_after"] < got["loss_before"] and "attn_opt_a0_lora_b" in got["parameters"]


def test_pair_ranking_and_what_counts_as_logits(zoo_onnx):
    from attn_opt.core import fidelity
    from attn_opt.pipeline.onnx_steps import OnnxSteps

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 5, 8))
    mask = np.ones((6, 5))
    mask[:, 3:] = 0
    assert fidelity.pair_ranking(ref, ref, mask) == pytest.approx(1.0)
    noisy = ref.copy()
    noisy[:, 3:] = rng.standard_normal((6, 2, 8)) * 10  # only the padded positions change
    assert fidelity.pair_ranking(ref, noisy, mask) == pytest.approx(1.0)
    assert fidelity.pair_ranking(ref, noisy) < 0.99
    assert fidelity.pair_ranking(ref[:2], ref[:2]) is None
    steps = OnnxSteps()
    state = steps.observe(attn_opt.core.ir.onnx.load(str(zoo_onnx("bert-eager", "dynamo"))),
                          {"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64)})
    assert steps.logit_outputs(state) == set()  # hidden states are as wide as weights, not as the vocabulary


def test_padding_rows_are_left_out_of_the_fit():
    """A query row at a padding token (a key no query sees) does not count: data that a
    temperature explains on the real rows, with noise on the padded ones, is still
    recovered."""
    rng = np.random.default_rng(2)
    s, v = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 5))
    vis = np.ones(s.shape, bool)
    vis[1, :, :, 6:] = False  # the second sequence has two padding tokens
    assert calibrate.live_rows(vis).tolist() == [[True] * 8, [True] * 6 + [False] * 2]
    tau = np.array([2.0, 0.5, 1.5, 3.0])
    target = normalise(Normaliser(), s * tau[None, :, None, None], vis) @ v
    target[1, :, 6:] = rng.standard_normal((4, 2, 5)) * 10  # whatever padding rows hold
    values, _, after = calibrate.fit(s, vis, v, target, Normaliser(), steps=2000)
    assert after <= 1e-4
    np.testing.assert_allclose(values["temperature"], tau, rtol=1e-3)


def test_cli_says_what_calibration_fitted(calib, tmp_path):
    """The console shows each site's LoRA; a pass with nothing to fit (gated) says so."""
    src, cal = calib
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "sparse:window=4", "--pass", "gated", "--calibrate", cal, "--lora", "2",
            "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "LoRA" in r.stdout and "calibration" in r.stdout
    sparse, gated = json.loads(rep.read_text())["passes"]
    assert all(s["lora"]["rank"] == 2 for s in sparse["calibration"]["sites"])
    assert "gated has no parameters --calibrate fits" in gated["calibration"]["note"]
