"""sparse on ONNX: every form against the NumPy reference formula, the work it skips
(FLOPs counted from the graph vs a count by hand), and padding rows giving zeros."""

from __future__ import annotations

import numpy as np
import pytest

from attn_opt import passes
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.core.ir import onnx_flops
from rewrite import apply_pass
from onnx_attention import attention_model, feeds, reference

CASES = [  # (spec, model kwargs)
    ("sparse:window=8", dict()),
    ("sparse:window=9", dict(mask="full")),
    ("sparse:window=8", dict(mask="bool")),
    ("sparse:window=8,causal=true", dict(causal=True)),
    ("sparse:window=6,sinks=2", dict()),
    ("sparse:window=6,sinks=3,causal=true", dict(causal=True)),
    ("sparse:window=7,border=shift", dict()),
    ("sparse:window=8,stride=4", dict()),
    ("sparse:window=8,stride=8", dict(mask=None)),  # blocked attention
    ("sparse:window=8,stride=4,causal=true", dict(causal=True)),
    ("sparse:window=8", dict(kvh=2)),  # GQA
    ("sparse:window=8,causal=true", dict(kvh=1, causal=True)),  # MQA
    ("sparse:window=8,block=5", dict(t=23)),  # a ragged last block
    ("sparse:window=100", dict()),  # wider than the sequence
    ("sparse:window=5,dilation=2", dict()),
    ("sparse:window=4,dilation=3,causal=true", dict(causal=True)),
    ("sparse:window=5,dilation=2,sinks=2", dict(mask="full")),
    ("sparse:window=4,dilation=4", dict(kvh=2, mask="bool")),
]


def _run(model, f):
    return onnx_adapter.run(model, f)["o"]


@pytest.mark.parametrize("spec,kw", CASES, ids=[c[0] + str(c[1]) for c in CASES])
def test_matches_reference(spec, kw):
    model = attention_model(**kw)
    shape = {k: kw[k] for k in ("t", "kvh") if k in kw}
    f = feeds(mask=kw.get("mask", "padding"), **shape)
    p = passes.parse(spec)
    new, rewritten, skipped, _ = apply_pass(model, p)
    assert rewritten == ["a0"], skipped
    site_causal = kw.get("causal", False)
    form = p.pattern(type("S", (), {"causal": site_causal})())
    t = kw.get("t", 37)
    want = reference(f, form.visible(t), causal=site_causal)
    got = _run(new, f)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dynamic_length():
    model = attention_model(dynamic=True)
    new, rewritten, _, _ = apply_pass(model, passes.parse("sparse:window=8"))
    form = passes.parse("sparse:window=8").pattern(type("S", (), {"causal": False})())
    for t in (9, 37, 64):
        f = feeds(t=t)
        np.testing.assert_allclose(_run(new, f), reference(f, form.visible(t)), rtol=1e-4, atol=1e-5)


def test_padding_rows_are_zero_not_nan():
    """A padded query whose window holds only padding keys sees nothing: zeros."""
    model = attention_model(t=40)
    f = feeds(t=40, pad=12)
    new, *_ = apply_pass(model, passes.parse("sparse:window=8"))
    out = _run(new, f)
    assert np.isfinite(out).all()
    assert np.all(out[-1, :, -6:] == 0)  # rows whose ±4 window is all padding
    assert np.any(out[-1, :, -12] != 0)  # a padded row that still sees real keys


def test_attention_flops_hand_count():
    b, h, t, d = 2, 4, 37, 8
    model = attention_model(b=b, h=h, t=t, d=d)
    f = feeds(b=b, h=h, t=t, d=d)
    spec = passes.parse("sparse:window=8,sinks=2")
    form = spec.pattern(type("S", (), {"causal": False})())
    new, *_ = apply_pass(model, spec)
    before = onnx_flops.count(model, f)
    after = onnx_flops.count(new, f)
    nb = -(-t // form.block)
    # Q·Kᵀ and P·V over the gathered keys and the sink keys, nothing else
    mm = 2 * b * h * nb * form.block * (form.keys + form.sinks) * (d + d)
    assert after.attention_matmul == mm
    assert before.matmul == 2 * b * h * t * t * (d + d)
    assert form.banded_pairs(t) == nb * form.block * (form.keys + form.sinks)


def test_flops_fall_with_length():
    """At 512 tokens a 64-window computes under a third of the dense score work."""
    t = 512
    model = attention_model(b=1, h=2, kvh=2, t=t, d=16, mask=None)
    f = feeds(b=1, h=2, kvh=2, t=t, d=16, mask=None)
    new, *_ = apply_pass(model, passes.parse("sparse:window=64"))
    dense, sparse = onnx_flops.count(model, f), onnx_flops.count(new, f)
    assert sparse.attention_matmul < dense.matmul / 3
    np.testing.assert_allclose(_run(new, f), reference(f, passes.parse("sparse:window=64").pattern(
        type("S", (), {"causal": False})()).visible(t)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec,msg", [
    ("sparse", "window=W is required"),
    ("sparse:window=0", ">= 1"),
    ("sparse:window=abc", "bad value"),
    ("sparse:window=8,border=wrap", "one of clip|shift"),
    ("sparse:windw=8", "unknown option"),
    ("sparse:window=8,dilation=2,stride=2", "not implemented"),
    ("sparsity:window=8", "unknown pass"),
])
def test_bad_specs(spec, msg):
    from attn_opt.core.errors import UserError

    with pytest.raises(UserError, match=msg):
        passes.parse(spec)


def test_dense_heads_match_reference():
    """Head-aware hybrid: heads 0 and 2 dense, the rest windowed."""
    model = attention_model()
    f = feeds()
    spec = passes.parse("sparse:window=8,dense_heads=0+2")
    new, rewritten, skipped, notes = apply_pass(model, spec)
    assert rewritten == ["a0"], skipped
    window = spec.pattern(type("S", (), {"causal": False})()).visible(37)
    per_head = np.stack([np.ones_like(window) if h in (0, 2) else window for h in range(4)])[None]
    np.testing.assert_allclose(_run(new, f), reference(f, per_head), rtol=1e-4, atol=1e-5)


def test_sinks_and_heads_auto_follow_the_diagnostics():
    """A mask that pulls every query to token 0 makes it a sink; heads whose mass lies
    outside the window stay dense. The choices come from the fidelity inputs."""
    model = attention_model()
    f = feeds()
    f["mask"] = f["mask"].copy()
    f["mask"][..., 0] = np.where(f["mask"][..., 0] > -1, 6.0, f["mask"][..., 0])  # token 0 draws attention
    p = passes.parse("sparse:window=4,sinks=auto,heads=auto,dense_threshold=0.9")
    new, rewritten, _, notes = apply_pass(model, p, feeds=f)
    assert rewritten == ["a0"]
    assert "sink tokens [0] kept" in notes[0] and "heads none kept dense" in notes[0]
    form = passes.parse("sparse:window=4,sinks=1").pattern(type("S", (), {"causal": False})())
    np.testing.assert_allclose(_run(new, f), reference(f, form.visible(37)), rtol=1e-4, atol=1e-5)
    p = passes.parse("sparse:window=4,heads=auto,dense_threshold=0.0")  # every head has mass outside
    _, _, _, notes = apply_pass(model, p, feeds=f)
    assert "heads [0, 1, 2, 3] kept dense" in notes[0]


@pytest.mark.parametrize("spec", ["sparse:window=3x3,grid=5x6", "sparse:window=3x5,grid=5x6,border=shift",
                                  "sparse:window=1x3,grid=5x6"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_grid_neighborhoods(spec, prefix):
    """2-D neighborhoods on a 5 x 6 token grid after `prefix` global tokens."""
    t = prefix + 30
    model = attention_model(t=t, mask=None)
    f = feeds(t=t, mask=None)
    p = passes.parse(spec)
    new, rewritten, skipped, _ = apply_pass(model, p)
    assert rewritten == ["a0"], skipped
    form = p.pattern(type("S", (), {"causal": False, "run_shape": (2, 4, t, t, 8)})())
    np.testing.assert_allclose(_run(new, f), reference(f, form.visible(t)), rtol=1e-4, atol=1e-5)


def test_grid_on_vit(zoo_onnx):
    """ViT: 16x16 pixels in 4x4 patches is a 4x4 grid after the class token."""
    import onnx

    proto = onnx.load(str(zoo_onnx("vit-eager", "dynamo")))
    new, rewritten, skipped, notes = apply_pass(proto, passes.parse("sparse:window=3x3,grid=4x4"))
    assert rewritten == ["a0", "a1"], skipped
    assert "1 global prefix token" in notes[0]
    x = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    assert all(np.isfinite(o).all() for o in onnx_adapter.run(new, x).values())
    _, _, skipped, _ = apply_pass(proto, passes.parse("sparse:window=3x3,grid=5x5"))
    assert "does not hold a 5x5 grid" in skipped[0].reason
