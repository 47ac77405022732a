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
from attn_opt.rewriter import calibrate
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


@pytest.fixture(scope="module")
def calib(tmp_path_factory, zoo_onnx):
    from attn_opt.rewriter.inputs import make_inputs
    from attn_opt.rewriter.ir import onnx as onnx_adapter

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
    assert changed and all(k.startswith("attn_opt.a") and k.split(".")[-1] in ("temperature", "offset", "gain")
                           for k in changed)


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
    assert all(s["error_after"] < s["error_before"] for s in c["sites"])
    assert c["model_error_after"]["calibration"] < c["model_error_before"]["calibration"]
    assert {n for n, _ in gm.named_parameters() if n.startswith("attn_opt_")} == {
        f"attn_opt_a{i}_{p}" for i in range(2) for p in ("temperature", "offset", "gain")}
    data = {p: a.numpy() for p, a in zip(names, args)}
    weights = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("attn_opt_")}
    got = attn_opt.heal(gm, data, model, steps=50)
    assert got["loss_after"] < got["loss_before"]
    assert all(torch.equal(p, weights[n]) for n, p in gm.named_parameters() if n in weights)  # the model's own stay
    with pytest.raises(attn_opt.UserError, match="no attn-opt parameters"):
        attn_opt.heal(attn_opt.optimize(model, ["fuse"], example_inputs=args)[0], data, model)
