"""gated, softplus and sinkfree on ONNX against the NumPy statement of each formula
(patterns/reference.py), on hand-built single-attention models (masks, causal, GQA) and
on zoo models; exact forms must be exact, and bad options and files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from attn_opt import passes
from attn_opt.patterns import reference as forms
from attn_opt.core.errors import UserError
from attn_opt.core.ir import onnx as onnx_adapter
from rewrite import apply_pass
from onnx_attention import attention_model, feeds, reference

MODELS = {  # name: (model kwargs, feed kwargs)
    "padding": (dict(), dict()),
    "full-bias": (dict(mask="full"), dict(mask="full")),
    "bool": (dict(mask="bool"), dict(mask="bool")),
    "causal": (dict(causal=True), dict()),
    "gqa-causal": (dict(kvh=2, causal=True), dict(kvh=2)),
}
FORMS = {  # spec: reference normaliser
    "softplus": forms.softplus,
    "softplus:n_train=16": lambda s, v: forms.softplus(s, v, n_train=16),
    "softplus:n_train=16,p=2": lambda s, v: forms.softplus(s, v, n_train=16, p=2),
    "sinkfree:mode=logit,bias=0": lambda s, v: forms.sink_logit(s, v, 0.0),
    "sinkfree:mode=logit,bias=-2.5": lambda s, v: forms.sink_logit(s, v, -2.5),
    "sinkfree:mode=logit,bias=-inf": lambda s, v: forms.sink_logit(s, v, -np.inf),
    "sinkfree:mode=redistribute,alpha=0.3": lambda s, v: forms.redistribute(s, v, 0.3),
    "sinkfree:mode=redistribute,alpha=0.5,sinks=2,heads=0+3": lambda s, v: forms.redistribute(s, v, 0.5, 2, (0, 3)),
    "sinkfree:mode=relu": forms.relu,
    "sigmoid": forms.sigmoid,
    "sigmoid:bias=-2": lambda s, v: forms.sigmoid(s, v, -2.0),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("spec", FORMS)
def test_form_matches_formula(spec, model):
    mkw, fkw = MODELS[model]
    new, rewritten, skipped, _ = apply_pass(attention_model(**mkw), passes.parse(spec))
    assert rewritten == ["a0"], skipped
    f = feeds(**fkw)
    got = onnx_adapter.run(new, f)["o"]
    want = reference(f, causal=mkw.get("causal", False), normalise=FORMS[spec])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_logit_minus_inf_is_softmax():
    model = attention_model(causal=True)
    f = feeds()
    new, *_ = apply_pass(model, passes.parse("sinkfree:mode=logit,bias=-inf"))
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], onnx_adapter.run(model, f)["o"], rtol=1e-5, atol=1e-6)
    assert passes.parse("sinkfree:mode=logit,bias=-inf").is_exact()


def test_sink_logit_weights_file(tmp_path):
    b = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    np.savez(tmp_path / "w.npz", **{"a0.sink_logit": b})
    new, *_ = apply_pass(attention_model(), passes.parse(f"sinkfree:mode=logit,weights={tmp_path / 'w.npz'}"))
    f = feeds()
    want = reference(f, normalise=lambda s, v: forms.sink_logit(s, v, b[None, :, None, None]))
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], want, rtol=1e-4, atol=2e-5)


def test_gated_is_exact_at_insertion(variant_onnx):
    import onnx

    proto = onnx.load(str(variant_onnx("mul-scale", "dynamo")))
    for mode in ("headwise", "elementwise"):
        new, rewritten, skipped, notes = apply_pass(proto, passes.parse(f"gated:mode={mode}"))
        assert rewritten == ["a0"], skipped
        f = {"in0": np.random.default_rng(0).standard_normal((2, 7, 32)).astype(np.float32)}
        a, b = onnx_adapter.run(proto, f), onnx_adapter.run(new, f)
        for k in a:
            assert np.array_equal(a[k], b[k])  # bitwise: σ(30) is exactly 1 in fp32
        extra = 32 * 4 + 4 if mode == "headwise" else 32 * 32 + 32
        from attn_opt.core.ir.onnx_flops import params
        assert params(new) == params(proto) + extra


def test_gated_trained_weights(variant_onnx, tmp_path):
    """Loaded gates compute O ⊙ σ(X W + b) per head: checked against the formula."""
    import onnx
    import torch

    from variants import BY_NAME

    proto = onnx.load(str(variant_onnx("mul-scale", "dynamo")))
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((32, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    np.savez(tmp_path / "g.npz", **{"a0.weight": w, "a0.bias": b})
    new, *_ = apply_pass(proto, passes.parse(f"gated:weights={tmp_path / 'g.npz'}"))
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    m = BY_NAME["mul-scale"].make().eval()
    with torch.no_grad():  # the same module with the gate applied by hand
        xt = torch.from_numpy(x)
        q, k, v = m.split(m.q(xt), 4), m.split(m.k(xt), 4), m.split(m.v(xt), 4)
        o = m.core(q, k, v) * torch.sigmoid(xt @ torch.from_numpy(w) + torch.from_numpy(b)).transpose(1, 2)[..., None]
        want = m.o(o.transpose(1, 2).reshape(2, 7, 32)).numpy()
    np.testing.assert_allclose(list(onnx_adapter.run(new, {"in0": x}).values())[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec,msg", [
    ("sinkfree:mode=logit", "exactly one of bias"),
    ("sinkfree:mode=redistribute", "alpha"),
    ("sinkfree:mode=relu,bias=0", "belong to mode=logit"),
    ("sinkfree:mode=logit,weights=/nonexistent.npz", "no such weights file"),
    ("softplus:p=0.5", "p must be >= 1"),
    ("gated:mode=channel", "one of headwise|elementwise"),
    ("gated:weights=/tmp/x.txt", "no such weights file"),
])
def test_bad_options(spec, msg):
    with pytest.raises(UserError, match=msg):
        passes.parse(spec)


def test_gated_weights_wrong_shape(variant_onnx, tmp_path):
    import onnx

    np.savez(tmp_path / "bad.npz", **{"a0.weight": np.zeros((5, 4), np.float32), "a0.bias": np.zeros(4, np.float32)})
    with pytest.raises(UserError, match="has shape"):
        apply_pass(onnx.load(str(variant_onnx("mul-scale", "dynamo"))), passes.parse(f"gated:weights={tmp_path / 'bad.npz'}"))
    np.savez(tmp_path / "keys.npz", other=np.zeros(3))
    with pytest.raises(UserError, match="has no 'a0.weight'"):
        apply_pass(onnx.load(str(variant_onnx("mul-scale", "dynamo"))), passes.parse(f"gated:weights={tmp_path / 'keys.npz'}"))


def test_compose_sparse_softplus_gated():
    """The three passes rewrite the same site in turn: window × softplus, then a gate."""
    from attn_opt.core.ir.onnx_flops import count

    model = attention_model(causal=True)
    f = feeds()
    chain = [passes.parse(s) for s in ("sparse:window=8", "softplus:n_train=16", "sinkfree:mode=relu")]
    with pytest.raises(UserError, match="both replace the softmax"):
        passes.check_chain(chain)
    cur = model
    for spec in ("sparse:window=8", "softplus:n_train=16"):
        cur, rewritten, skipped, _ = apply_pass(cur, passes.parse(spec))
        assert rewritten == ["a0"], skipped
    form = passes.parse("sparse:window=8").pattern(type("S", (), {"causal": True})())
    want = reference(f, form.visible(37), causal=True, normalise=lambda s, v: forms.softplus(s, v, n_train=16))
    np.testing.assert_allclose(onnx_adapter.run(cur, f)["o"], want, rtol=1e-4, atol=2e-5)
    assert count(cur, f).attention_matmul < count(model, f).matmul  # still banded after softplus
    import attn_opt
    site = attn_opt.inspect(cur).sites[0]
    assert site.rule == "attn-opt" and site.pattern.window == 8 and site.normaliser.kind == "softplus"


@pytest.mark.parametrize("chain,msg", [
    (["softplus", "sinkfree:mode=relu"], "both replace the softmax"),
    (["sparse:window=8", "fuse"], "would undo"),
    (["sparse:window=8", "sparse:window=4"], "twice"),
    (["sparse:window=8", "stream:window=4"], "both choose which pairs are kept"),
    (["mlpfree:collapse=qk", "softplus"], "mlpfree collapse with softplus"),
])
def test_refused_compositions(chain, msg):
    with pytest.raises(UserError, match=msg):
        passes.check_chain([passes.parse(s) for s in chain])
