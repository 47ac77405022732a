"""The forms on zoo models: exact forms exact on every model (or skipped with a reason),
approximate forms equal to the NumPy formula applied to the site's own probed Q, K, V."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from attn_opt import passes
from attn_opt.patterns import reference
from attn_opt.patterns.detect import detect
from attn_opt.core import fidelity
from attn_opt.core.inputs import make_inputs
from attn_opt.core.ir import onnx as onnx_adapter
import attn_opt
from rewrite import apply_pass
from attn_opt.tools import zoo


def _feeds(proto, **kw):
    return make_inputs(onnx_adapter.input_specs(onnx_adapter.load_view(proto)[2]), **kw)


@pytest.mark.parametrize("spec", ["gated", "sinkfree:mode=logit,bias=-inf", "fuse"])
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_exact_forms_on_every_zoo_model(zoo_onnx, name, spec):
    proto = onnx.load(str(zoo_onnx(name, "dynamo")))
    _, report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=_feeds(proto))
    p = report.passes[0]
    assert len(p.sites_rewritten) + len(p.sites_skipped) == zoo.MODELS[name].expected.sites
    assert all(s.reason for s in p.sites_skipped)
    assert p.exact and p.step_fidelity["max_rel_error"] <= 1e-4


FORMULAS = {
    "softplus:n_train=16": lambda s, v: reference.softplus(s, v, n_train=16),
    "sinkfree:mode=redistribute,alpha=0.3": lambda s, v: reference.redistribute(s, v, 0.3),
    "sinkfree:mode=logit,bias=0.5": lambda s, v: reference.sink_logit(s, v, 0.5),
    "sinkfree:mode=relu": reference.relu,
    "sigmoid": reference.sigmoid,
    "sparse:window=4": reference.softmax,
    "sparse:window=4,sinks=1": reference.softmax,
}


@pytest.mark.parametrize("spec", list(FORMULAS))
@pytest.mark.parametrize("name,exporter", [("bert-eager", "dynamo"), ("llama-eager", "torchscript"),
                                           ("gpt2-sdpa", "dynamo23")])
def test_approximate_forms_follow_the_formula(zoo_onnx, name, exporter, spec):
    """Each rewritten site's output equals normaliser(S, visible) @ V in NumPy, with S, V
    and the masks probed in the rewritten model (its form record names them) on the same
    padded inputs: every layer is checked against the input it really gets."""
    proto = onnx.load(str(zoo_onnx(name, exporter)))
    feeds = _feeds(proto, pad=True)
    sites0 = detect(onnx_adapter.load_view(proto)[2], feeds=feeds).sites
    p = passes.parse(spec)
    new, rewritten, skipped, _ = apply_pass(proto, p, feeds=feeds)
    assert rewritten == [s.id for s in sites0], skipped
    gv1 = onnx_adapter.load_view(new)[2]
    sites1 = detect(gv1, feeds=feeds).sites
    assert [s.rule for s in sites1] == ["attn-opt"] * len(sites0)
    probed = gv1.probe([v for s in sites1 for v in reference.needed(s) + [s.v.value, s.output]], feeds)
    for s0, s1 in zip(sites0, sites1):
        s, vis = reference.scores(s1, probed)
        if p.name == "sparse":
            vis = vis & p.pattern(s0).visible(s.shape[-1])
        v = probed[s1.v.value.name]
        v = np.transpose(v, s1.v.perm) if s1.v.perm else v
        v = np.repeat(v.astype(np.float64), s.shape[1] // v.shape[1], axis=1)
        want = FORMULAS[spec](s, vis) @ v
        np.testing.assert_allclose(probed[s1.output.name], want, rtol=2e-4, atol=2e-5)


def test_logit_metrics_by_hand():
    ref = np.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
    out = np.array([[[1.0, 0.0, -1.0], [0.0, 0.0, 1.0]]])
    f = fidelity.compare(ref, out, logits=True)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
    assert f.kl == pytest.approx(np.mean(np.sum(p * np.log(p / q), -1)))
    assert f.top1_agreement == 0.5  # row 0 keeps its arg-max, row 1 does not
    assert f.max_abs_error == 1.0 and f.max_rel_error == pytest.approx(0.5)
