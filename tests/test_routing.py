"""Routing attention (sparse:routing=C): the NumPy reference (patterns/reference.py:
routing_visible) against the ONNX (backends/onnx/routing.py) and torch
(backends/torch/routing.py) lowerings with padding, boolean and per-query masks, causal
and GQA; balanced clusters; the exact case (every cluster holds every key: size >= T)
end to end on torch.fx; Triton refuses it in words;
bad values refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_opt
from attn_opt import passes
from attn_opt.backends.torch import forms
from attn_opt.core.errors import UserError
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.patterns import reference as R
from onnx_attention import attention_model, feeds, reference
from rewrite import apply_pass
from variants import VARIANTS


def _pattern(spec: str, causal: bool):
    return passes.parse(spec).pattern(type("S", (), {"causal": causal, "run_shape": None})())


def _seen(f: dict, causal: bool):
    m, t = f.get("mask"), f["q"].shape[2]
    seen = None if m is None else m if m.dtype == bool else m > np.finfo(np.float32).min
    if causal:
        seen = np.tril(np.ones((t, t), bool)) & (True if seen is None else seen)
    return seen


def _torch(f: dict, pattern, causal: bool) -> np.ndarray:
    q, k, v = (torch.from_numpy(f[x]) for x in "qkv")
    m = f.get("mask")
    additive = [torch.from_numpy(m)] if m is not None and m.dtype != bool else []
    boolean = torch.from_numpy(m) if m is not None and m.dtype == bool else None
    if causal:
        t = q.shape[2]
        additive.append(torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1))
    return forms.attention(q, k, v, additive, boolean, scale=q.shape[-1] ** -0.5, causal=causal, pattern=pattern,
                           use_triton=False).numpy()


CASES = [
    ("sparse:routing=4", dict()),
    ("sparse:routing=3,window=4", dict(mask="bool")),
    ("sparse:routing=2", dict(mask="full")),
    ("sparse:routing=4,window=3", dict(causal=True)),
    ("sparse:routing=3,size=6", dict(kvh=2)),
    ("sparse:routing=2,window=2", dict(kvh=1, t=23)),
    ("sparse:routing=3", dict(mask=None, kvh=2)),
]


@pytest.mark.parametrize("spec,kw", CASES, ids=[c[0] + str(c[1]) for c in CASES])
def test_onnx_and_torch_match_the_reference(spec, kw):
    causal = kw.get("causal", False)
    f = feeds(mask=kw.get("mask", "padding"), **{k: kw[k] for k in ("t", "kvh") if k in kw})
    pattern = _pattern(spec, causal)
    vis = R.routing_visible(pattern, f["q"], f["k"], _seen(f, causal))
    assert not vis.all()  # keys were dropped
    want = reference(f, vis, causal=causal)
    np.testing.assert_allclose(_torch(f, pattern, causal), want, rtol=1e-5, atol=1e-5)
    new, rewritten, skipped, notes = apply_pass(attention_model(**kw), passes.parse(spec))
    assert rewritten == ["a0"], skipped
    assert any("no FLOPs saved yet" in n for n in notes)
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], want, rtol=1e-5, atol=1e-5)


def test_clusters_are_balanced_and_follow_the_content():
    """Keys in two directions, queries along one: each centroid holds exactly n keys, and
    a query attends the keys of its own direction."""
    rng = np.random.default_rng(0)
    t, d = 32, 8
    e = np.eye(d, dtype=np.float32)
    k = 0.1 * rng.standard_normal((1, 1, t, d)).astype(np.float32)
    k[0, 0, ::2] += e[0]
    k[0, 0, 1::2] += e[1]
    q = (0.1 * rng.standard_normal((1, 1, t, d)) + e[1]).astype(np.float32)
    p = _pattern("sparse:routing=2", False)
    members, nearest = R.routing_clusters(p, q, k)
    assert (members.sum(-1) == t // 2).all()
    vis = R.routing_visible(p, q, k)
    assert vis[0, 0][:, 1::2].all() and not vis[0, 0][:, ::2].any()


def test_every_cluster_holding_every_key_is_exact():
    """size >= T: every cluster holds every key, so the form is dense attention (the exact
    case) on the reference and the torch lowering."""
    f = feeds()
    p = _pattern("sparse:routing=3,size=64", False)
    assert R.routing_visible(p, f["q"], f["k"], _seen(f, False)).all()
    np.testing.assert_allclose(_torch(f, p, False), reference(f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["div-scale", "sdpa-causal", "gqa-repeat-kv", "mqa-repeat-kv"])
def test_exact_case_end_to_end_on_fx(name):
    """On torch.fx through the pipeline: size >= T exact on every input set it checks (and
    said: drops nothing); the default size drops keys."""
    v = next(v for v in VARIANTS if v.name == name)
    x = v.inputs()
    _, rep = attn_opt.optimize(v.make().eval(), ["sparse:routing=2,size=64"], example_inputs=x)
    p = rep.passes[0]
    assert p.sites_rewritten == ["a0"], p.sites_skipped
    assert (p.step_fidelity_all or p.step_fidelity)["max_rel_error"] <= 1e-5
    assert any("drops nothing" in n for n in p.notes), p.notes
    _, rep = attn_opt.optimize(v.make().eval(), ["sparse:routing=2"], example_inputs=x, force=True)
    assert rep.passes[0].step_fidelity["max_rel_error"] > 1e-4


def test_triton_refuses_routing_in_words():
    pytest.importorskip("triton")
    from attn_opt.backends.triton.launcher import CAPABILITIES
    from attn_opt.patterns.form import Form

    why = CAPABILITIES.supports(None, Form(pattern=_pattern("sparse:routing=2", False)))
    assert why.startswith("routing: no triton lowering (the kernel takes key blocks")


@pytest.mark.parametrize("spec,msg", [
    ("sparse:routing=1", "routing must be >= 2"),
    ("sparse:routing=0", "routing must be >= 2"),
    ("sparse:routing=2,topk=1", "routing takes window and size"),
    ("sparse:routing=2,size=0", "size must be >= 1"),
    ("sparse:window=4,size=3", "size needs routing"),
])
def test_bad_values_are_one_line(spec, msg):
    with pytest.raises(UserError, match=msg):
        passes.parse(spec)
