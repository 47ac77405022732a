"""Detection on ONNX: every zoo model and hand-written variant, from every exporter,
gives exactly the expected sites; the negatives give none."""

from __future__ import annotations

import pytest

import attn_opt
from attn_opt.tools import zoo
from variants import VARIANTS


def check_sites(det, sites, heads, kv_heads, causal_of, masks, cross=None, kind=None):
    assert len(det.sites) == sites, [s.to_json() for s in det.sites]
    for i, s in enumerate(det.sites):
        assert (s.heads, s.kv_heads) == (heads, kv_heads), s.to_json()
        if det.probe_error and s.mask != "none" and s.causal is None:
            assert "did not run" in " ".join(s.notes)  # unknown, and said so
        else:
            assert s.causal == causal_of(i), (i, s.to_json())
        assert s.mask in masks, s.to_json()
        assert s.head_dim == 8
        assert s.scale is not None and s.scale > 0
        if kind:
            assert s.kind == kind
    if cross is not None:
        assert sum(s.kind == "cross" for s in det.sites) == cross


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_sites(zoo_onnx, name, exporter):
    e = zoo.MODELS[name].expected
    det = attn_opt.inspect(zoo_onnx(name, exporter))
    assert det.probe_error is None
    check_sites(det, e.sites, e.heads, e.kv_heads, e.causal_of, e.masks, cross=e.cross)
    layers = [s.layer for s in det.sites]
    assert all(x is not None for x in layers) or name.startswith("torch-mha")
    if name.startswith("t5"):
        assert [s.scale for s in det.sites] == [1.0] * 6  # T5 does not scale its scores


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.name)
def test_variant_sites(variant_onnx, v, exporter):
    det = attn_opt.inspect(variant_onnx(v.name, exporter))
    check_sites(det, v.sites, v.heads, v.kv_heads, lambda i: v.causal, v.masks, kind=v.kind)
    if v.sites == 0:  # every softmax of a negative is explained
        assert det.near_misses and all(m.reason for m in det.near_misses)


def test_scale_value_is_exact(variant_onnx):
    for name in ("div-scale", "mul-scale", "prescaled-q"):
        det = attn_opt.inspect(variant_onnx(name, "torchscript"))
        assert det.sites[0].scale == pytest.approx(8 ** -0.5, rel=1e-6)
    det = attn_opt.inspect(variant_onnx("no-scale", "dynamo"))
    assert det.sites[0].scale == 1.0


def test_projections_found(zoo_onnx):
    det = attn_opt.inspect(zoo_onnx("llama-eager", "dynamo"))
    for s in det.sites:
        assert set(s.projections) == {"q", "k", "v", "o"}
        assert s.projections["q"].x is s.projections["k"].x  # self-attention: one hidden state
    det = attn_opt.inspect(zoo_onnx("t5-eager", "torchscript"))
    cross = [s for s in det.sites if s.kind == "cross"]
    assert cross and all(s.projections["q"].x is not s.projections["k"].x for s in cross)


def test_negative_reasons(variant_onnx):
    det = attn_opt.inspect(variant_onnx("classifier-head", "dynamo"))
    assert "weight" in det.near_misses[0].reason
    det = attn_opt.inspect(variant_onnx("moe-gate", "torchscript"))
    assert len(det.near_misses) == 1 and "weight" in det.near_misses[0].reason
