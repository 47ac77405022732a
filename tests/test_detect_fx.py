"""Detection on torch.fx: the zoo and the variant table through torch.export, Dynamo
and symbolic_trace agree with the same expectations as the ONNX exports."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import attn_opt
from attn_opt.patterns.detect import detect
from attn_opt.core.ir import fx as fxa
from attn_opt.tools import zoo
from test_detect_onnx import check_sites
from variants import VARIANTS

FRONTS = ("export", "dynamo", "symbolic_trace")


@pytest.fixture(scope="session")
def built_zoo():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.MODELS[name].build()
        return cache[name]

    return get


def _detect(model, args, front):
    if front == "export":
        return attn_opt.inspect(model, example_inputs=args)
    if front == "dynamo":
        graphs = fxa.dynamo_graphs(model, args)
        assert len(graphs) == 1, "unexpected graph break"
        gm, ex = graphs[0]
        return detect(fxa.view(gm, ex))
    gm = fx.symbolic_trace(model)
    return attn_opt.inspect(gm, example_inputs=args)


@pytest.mark.parametrize("front", ("export", "dynamo"))
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_fx(built_zoo, name, front):
    model, args, _ = built_zoo(name)
    e = zoo.MODELS[name].expected
    det = _detect(model, args, front)
    assert det.probe_error is None
    check_sites(det, e.sites, e.heads, e.kv_heads, e.causal_of, e.masks, cross=e.cross)
    assert all(s.scope for s in det.sites)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.name)
def test_variants_fx(v, front):
    if f"fx:{front}" in v.skip:
        pytest.skip(v.skip[f"fx:{front}"])
    det = _detect(v.make().eval(), v.inputs(), front)
    check_sites(det, v.sites, v.heads, v.kv_heads, lambda i: v.causal, v.masks, kind=v.kind)
    if v.sites == 0:
        assert det.near_misses


def test_symbolic_trace_leaf_modules():
    """symbolic_trace keeps torch.nn modules as leaves: nn.MultiheadAttention is one
    call_module site; nn.TransformerEncoder hides its layers, and --why says so."""
    model, args, _ = zoo.MODELS["torch-mha-causal"].build()
    det = attn_opt.inspect(fx.symbolic_trace(model), example_inputs=args)
    assert [(s.rule, s.heads, s.causal, s.mask) for s in det.sites] == [("torch-mha", 4, True, "causal")]
    model, args, _ = zoo.MODELS["torch-encoder"].build()
    det = attn_opt.inspect(fx.symbolic_trace(model), example_inputs=args)
    assert det.sites == [] and "leaf module" in det.near_misses[0].reason


def test_pt2_file(tmp_path, built_zoo):
    model, args, _ = built_zoo("llama-sdpa")
    path = tmp_path / "llama.pt2"
    torch.export.save(torch.export.export(model, args), str(path))
    det = attn_opt.inspect(str(path))
    assert [(s.heads, s.kv_heads, s.causal) for s in det.sites] == [(4, 2, True)] * 2
