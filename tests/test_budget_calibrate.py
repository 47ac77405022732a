"""A calibrated form with dense heads (what `--budget ... --calibrate` applies): each part of
the dense-heads split reads its heads' values of the site's one set of per-head parameters
(ONNX and torch against the NumPy reference, at values that are not the identity), and the
fit moves only the sparse heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper

import attn_opt
from attn_opt.backends.torch.forms import attention
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.patterns import reference
from attn_opt.patterns.form import Normaliser, Pattern
from onnx_attention import attention_model, feeds

DENSE = (0, 2)


def _visible(pattern: Pattern, f: dict) -> np.ndarray:
    """[B, H, T, T]: the window's pairs, every pair in the dense heads, the padding mask on all."""
    b, h, t, _ = f["q"].shape
    vis = np.broadcast_to(pattern.visible(t), (b, h, t, t)).copy()
    vis[:, list(pattern.dense_heads)] = True
    return vis & (f["mask"] > -1e4)


def _scores(f: dict) -> np.ndarray:
    q, k = f["q"].astype(np.float64), f["k"].astype(np.float64)
    return q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5 + f["mask"]


@pytest.fixture(scope="module")
def calibrated():
    """sparse:window=8 with heads 0 and 2 dense on a one-site model, calibrated."""
    f, c = feeds(), feeds(seed=1)
    out, rep = attn_opt.optimize(attention_model(), ["sparse:window=8,dense_heads=0+2"], feeds=f, calibrate=c)
    return out, rep.passes[0], f


def test_fit_moves_only_the_sparse_heads(calibrated):
    _, rep, _ = calibrated
    assert rep.sites_rewritten == ["a0"] and "heads [0, 2] dense" in rep.notes[0]
    fit = rep.calibration.sites[0]
    assert fit.error_after < fit.error_before and fit.values
    for name, v in fit.values.items():
        np.testing.assert_array_equal(v[list(DENSE)], fit.start[name][list(DENSE)])  # exact: the dense heads
    assert any(not np.allclose(v[[1, 3]], fit.start[name][[1, 3]]) for name, v in fit.values.items())


def test_onnx_split_reads_each_heads_parameters(calibrated):
    """Per-head values that differ on every head (dense ones included) written into the
    site's initializers: the ONNX model computes the reference with exactly those values."""
    model, _, f = calibrated
    rng = np.random.default_rng(0)
    values = {"temperature": rng.uniform(0.5, 2, 4), "offset": rng.uniform(-1, 1, 4), "gain": rng.uniform(0.5, 1.5, 4)}
    inits = {t.name: t for t in model.graph.initializer}
    for name, v in values.items():
        inits[f"attn_opt.a0.{name}"].CopyFrom(numpy_helper.from_array(v.astype(np.float32), f"attn_opt.a0.{name}"))
    got = onnx_adapter.run(model, f)["o"]
    pattern = Pattern("window", False, 8, 8, dense_heads=DENSE)
    w = reference.normalise(Normaliser().calibrate(values), _scores(f), _visible(pattern, f))
    np.testing.assert_allclose(got, w @ f["v"].astype(np.float64), rtol=1e-4, atol=2e-5)
    values["gain"][1] *= 3  # a sparse head's value changes that head only
    w2 = reference.normalise(Normaliser().calibrate(values), _scores(f), _visible(pattern, f))
    assert not np.allclose(w2[:, 1], w[:, 1]) and np.allclose(w2[:, [0, 2, 3]], w[:, [0, 2, 3]])


@pytest.mark.parametrize("banded", [True, False])
@pytest.mark.parametrize("kind", ["softmax", "logit", "softplus"])
def test_torch_split_reads_each_heads_parameters(kind, banded):
    """The torch form with dense heads, calibrated with values that differ per head, and an
    uncalibrated per-head sink logit: the reference's weights on every head."""
    f = feeds()
    rng = np.random.default_rng(1)
    start = Normaliser(kind, bias=tuple(rng.uniform(-1, 1, 4)) if kind == "logit" else None)
    values = {"temperature": rng.uniform(0.5, 2, 4), "gain": rng.uniform(0.5, 1.5, 4)}
    pattern = Pattern("window", False, 8, 8, dense_heads=DENSE)
    want_v = f["v"].astype(np.float64)
    t = {k: torch.from_numpy(f[k].astype(np.float64)) for k in ("q", "k", "v", "mask")}
    for n in (start, start.calibrate(values, heads=4)):
        got = attention(t["q"], t["k"], t["v"], (t["mask"],), scale=8 ** -0.5, pattern=pattern, normaliser=n,
                        banded=banded, use_triton=False)
        want = reference.normalise(n, _scores(f), _visible(pattern, f)) @ want_v
        rows = (f["mask"] > -1e4)[:, 0, 0]  # padded query rows: no key of theirs is read
        np.testing.assert_allclose(got.numpy().transpose(0, 2, 1, 3)[rows], want.transpose(0, 2, 1, 3)[rows],
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mixed_folds,chosen", [((0.04, 0.09), (1, 1)), ((0.04, 0.06), "mixed")])
def test_refine_keeps_the_uniform_form_unless_every_fold_agrees(mixed_folds, chosen):
    """A per-site plan measured better than the best uniform form on the search rows but
    worse on one fold of them does not replace it; better on every fold, it does."""
    from attn_opt.pipeline.budget import Choice
    from attn_opt.pipeline.budget_solve import _refine, pareto

    choices = {sid: [Choice("dense", "dense", cost=0.5), Choice("A", "a", cost=0.2, loss=0.1),
                     Choice("B", "b", cost=0.25, loss=0.08)] for sid in ("a0", "a1")}
    order = ["a0", "a1"]
    points = pareto([[c.cost for c in choices[s]] for s in order], [[c.loss for c in choices[s]] for s in order])
    table = {(1, 1): (0.06, (0.06, 0.06)), (2, 2): (0.07, (0.07, 0.07)),
             (1, 2): (0.05, mixed_folds), (2, 1): (0.05, mixed_folds)}
    seen = []

    def measure(picks):
        seen.append(picks)
        return table[picks]

    best, _ = _refine(points, choices, order, 0.0, 0.5, measure)
    assert (1, 1) in seen and any(p in seen for p in ((1, 2), (2, 1)))
    if chosen == "mixed":
        assert best.picks in ((1, 2), (2, 1)) and not best.uniform
    else:
        assert best.picks == chosen and best.uniform and best.measured == 0.06


def test_html_page_shows_the_pareto_plot(zoo_onnx, tmp_path):
    """--budget with --html: the page carries the search's Pareto plot (an inline PNG)."""
    from test_pipeline import cli

    page = tmp_path / "p.html"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--budget", "attention=0.8", "--candidates", "sparse:window=4",
            "--force", "-o", tmp_path / "o.onnx", "--html", page)
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert 'id="budget-pareto"' in text and "data:image/png;base64," in text and "--budget attention=0.8" in text
