"""Models as users ship them: float16 (and bfloat16 on torch), opsets 11 and 13; passes
keep the dtype and the sites; exact passes are exact on every input set (padded rows,
another length) at the dtype's rounding."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import numpy as np
import onnx
import pytest
import torch

import attn_opt
from attn_opt import passes
from attn_opt.core.errors import UserError
from attn_opt.tools import zoo
from test_pipeline import cli

PASSES = ["fuse", "fuse:target=ort", "sparse:window=4", "gated", "softplus", "sinkfree:mode=logit,bias=-inf",
          "sinkfree:mode=relu", "mlpfree:collapse=qk"]


@pytest.fixture(scope="session")
def shipped(cache_dir):
    """shipped(name, kind) -> path: kind "fp16" (dynamo export of model.half()), "op11" or
    "op13" (TorchScript exporter at that opset), cached like the zoo."""

    def get(name: str, kind: str):
        path = cache_dir / f"shipped-{name}-{kind}.onnx"
        if path.exists():
            return path
        model, args, names = zoo.MODELS[name].build()
        tmp = path.with_suffix(".tmp.onnx")
        if kind == "fp16":
            zoo.export_module(model.half(), args, names, "dynamo", tmp)
        else:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=int(kind[2:]),
                                  input_names=list(names), dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
        os.replace(tmp, path)
        return path

    return get


def _run(src, tmp_path, spec, *extra):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(src, "--pass", spec, "-o", out, "--report", rep, *extra)
    return r, out, (json.loads(rep.read_text()) if rep.exists() else None)


@pytest.mark.parametrize("spec", PASSES)
def test_fp16_every_pass(shipped, tmp_path, spec):
    src = shipped("bert-eager", "fp16")
    r, out, rep = _run(src, tmp_path, spec, "--force")
    assert r.returncode == 0, r.stderr
    p = rep["passes"][0]
    assert len(p["sites_rewritten"]) == 2, p["sites_skipped"]
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in m.graph.output)
    if spec.startswith(("fuse", "sinkfree:mode=logit,bias=-inf", "gated")):  # exact at fp16 rounding
        assert p["step_fidelity_all"]["max_rel_error"] <= 8 * float(np.finfo(np.float16).eps)
    if not spec.startswith("fuse"):
        assert all("computed in float32 inside" in n for n in p["notes"] if n.startswith("a"))


def test_fp16_fuse_bound_is_the_dtype_rounding(shipped, tmp_path):
    """fuse on float16 moves outputs by fp16 rounding (above fp32's 1e-4): that is exact."""
    r, _, rep = _run(shipped("bert-eager", "fp16"), tmp_path, "fuse")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def fp16_at(cache_dir):
    """fp16_at(opset) -> path: bert-eager in float16 exported at that opset (TorchScript up
    to 17, dynamo from 18), cached like the zoo."""

    def get(opset: int):
        path = cache_dir / f"fp16-bert-eager-op{opset}.onnx"
        if not path.exists():
            model, args, names = zoo.MODELS["bert-eager"].build()
            tmp = path.with_suffix(".tmp.onnx")
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                if opset <= 17:
                    torch.onnx.export(model.half(), args, str(tmp), dynamo=False, opset_version=opset,
                                      input_names=list(names), dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
                else:
                    torch.onnx.export(model.half(), args, input_names=list(names), dynamo=True, opset_version=opset,
                                      dynamic_shapes=zoo._dynamic_shapes(names, args)).save(str(tmp))
            os.replace(tmp, path)
        return path

    return get


@pytest.mark.parametrize("spec", PASSES + ["sigmoid", "sinkfree:mode=redistribute,alpha=0.5"])
@pytest.mark.parametrize("opset", [11, 13, 17, 20, 23])
def test_fp16_opset_grid(fp16_at, tmp_path, opset, spec):
    """float16 at every opset a user ships: each form pass writes a valid model (no IsInf on
    float16 below opset 20) that keeps its dtype, and exact passes are exact at fp16 rounding."""
    model, report = attn_opt.optimize(str(fp16_at(opset)), [spec], force=True)
    p = report.passes[0]
    assert len(p.sites_rewritten) == 2, p.sites_skipped
    out = tmp_path / "o.onnx"
    model.save(str(out))
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in m.graph.output)
    if p.exact:
        assert p.step_fidelity_all["max_rel_error"] <= 8 * float(np.finfo(np.float16).eps)


@pytest.mark.parametrize("kind", ["op11", "op13"])
@pytest.mark.parametrize("name", ["bert-eager", "llama-eager"])
@pytest.mark.parametrize("spec", ["fuse", "sparse:window=4", "gated", "softplus", "sinkfree:mode=relu"])
def test_old_opsets_keep_their_sites(shipped, tmp_path, name, kind, spec):
    src = shipped(name, kind)
    assert len(attn_opt.inspect(str(src)).sites) == 2
    r, out, rep = _run(src, tmp_path, spec, "--force")
    assert r.returncode == 0, r.stderr
    assert len(rep["passes"][0]["sites_rewritten"]) == 2, rep["passes"][0]["sites_skipped"]
    onnx.checker.check_model(str(out), full_check=True)


def test_a_conversion_that_loses_sites_is_an_error(shipped, monkeypatch):
    """If detection could not see through the converter's Flatten → Softmax → Reshape, the
    pass must fail naming the sites, not report 0 rewritten."""
    from attn_opt.patterns import eager

    monkeypatch.setattr(eager, "_flattened", lambda sm: None)
    with pytest.raises(UserError, match=r"opset 11 to 23 loses site\(s\) a0, a1"):
        attn_opt.optimize(str(shipped("bert-eager", "op11")), ["fuse"])


@pytest.mark.parametrize("spec", ["fuse", "fuse:target=ort", "sinkfree:mode=logit,bias=-inf",
                                  "sinkfree:mode=redistribute,alpha=1"])
@pytest.mark.parametrize("name,exporter", [("bert-eager", "dynamo"), ("bert-sdpa", "torchscript"),
                                           ("llama-eager", "dynamo"), ("t5-eager", "dynamo")])
def test_exact_on_every_input(zoo_onnx, tmp_path, name, exporter, spec):
    """Exact passes match on the padded rows (one token; none) and at another length too."""
    r, _, rep = _run(zoo_onnx(name, exporter), tmp_path, spec)
    assert r.returncode == 0, r.stderr
    assert rep["inputs"]["variants"] == ["padded", "length+5"]
    assert set(rep["passes"][0]["per_output"]) >= {k + "@padded" for k in rep["passes"][0]["per_output"]
                                                   if "@" not in k}
    assert rep["passes"][0]["step_fidelity_all"]["max_rel_error"] <= 1e-4


def test_padding_semantics_are_checked(zoo_onnx, monkeypatch):
    """A lowering that gives zeros where the original gives uniform weights (a row its
    finite fill hides completely) is caught by the padded input set."""
    from attn_opt.backends.onnx import explicit

    monkeypatch.setattr(explicit, "_hidden_rows_as_original", lambda e, site, s, vis, *masks: (s, vis))
    with pytest.raises(UserError, match="on every input set"):
        attn_opt.optimize(str(zoo_onnx("bert-eager", "dynamo")), [passes.parse("sinkfree:mode=logit,bias=-inf")])


def test_bf16_on_torch():
    model, args, _ = zoo.MODELS["bert-eager"].build()
    gm, report = attn_opt.optimize(model.bfloat16(), ["fuse"], example_inputs=args)
    p = report.passes[0]
    assert len(p.sites_rewritten) == 2
    assert p.step_fidelity["max_rel_error"] <= 8 * float(torch.finfo(torch.bfloat16).eps)
    assert gm(*args).dtype == torch.bfloat16


@pytest.fixture(scope="session")
def quantized(cache_dir, zoo_onnx):
    """quantized(kind) -> bert-eager (TorchScript export) quantized by ONNX Runtime:
    "dynamic" (MatMulInteger), "qdq" (QuantizeLinear/DequantizeLinear around every op),
    "qoperator" (QLinearMatMul, QLinearSoftmax)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.n = 0

        def get_next(self):
            self.n += 1
            if self.n > 4:
                return None
            ids = np.random.default_rng(self.n).integers(1, zoo.VOCAB, (2, 8))
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def get(kind: str):
        path = cache_dir / f"quantized-bert-{kind}.onnx"
        if path.exists():
            return path
        src, tmp = str(zoo_onnx("bert-eager", "torchscript")), str(path.with_suffix(".tmp.onnx"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if kind == "dynamic":
                quantize_dynamic(src, tmp, weight_type=QuantType.QInt8)
            else:
                fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
                ops = ["MatMul", "Softmax", "Add", "Mul"] if kind == "qdq" else ["MatMul", "Softmax"]
                quantize_static(src, tmp, Reader(), quant_format=fmt, op_types_to_quantize=ops)
        os.replace(tmp, path)
        return path

    return get


@pytest.mark.parametrize("kind", ["dynamic", "qdq"])
def test_quantized_sites_are_found_as_self_attention(quantized, kind):
    sites = attn_opt.inspect(str(quantized(kind))).sites
    assert [(s.kind, s.heads, s.quantized) for s in sites] == [("self", 4, kind == "qdq")] * 2


@pytest.mark.parametrize("spec", ["fuse", "sparse:window=4", "gated", "softplus"])
@pytest.mark.parametrize("kind", ["dynamic", "qdq"])
def test_quantized_passes(quantized, tmp_path, kind, spec):
    """The projections stay quantized; a site whose scores QDQ rounds inside is not fused
    (not exact there, and said so), every other pass rewrites it."""
    r, out, rep = _run(quantized(kind), tmp_path, spec)
    assert r.returncode == 0, r.stderr
    p = rep["passes"][0]
    if kind == "qdq" and spec == "fuse":
        assert not p["sites_rewritten"] and all("QuantizeLinear/DequantizeLinear" in s["reason"]
                                                 for s in p["sites_skipped"])
    else:
        assert len(p["sites_rewritten"]) == 2, p["sites_skipped"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("MatMulInteger" if kind == "dynamic" else "DequantizeLinear") in ops


def test_qoperator_near_miss(quantized):
    det = attn_opt.inspect(str(quantized("qoperator")))
    assert not det.sites and det.near_misses
    assert all("QOperator" in m.reason for m in det.near_misses)


@pytest.mark.parametrize("shape", [(1, 6), (2, 6), (1, 1, 4, 6), (2, 1, 4, 6)])
def test_the_padded_set_shows_row_0_only_its_first_key(shape):
    """The padded input set: row 0 sees key 0 only (every query of it, for a 4-D mask),
    row 1 nothing; the batch is doubled where it is one row and may grow."""
    from attn_opt.core.inputs import InputSpec, fidelity_variants

    specs = [InputSpec("attention_mask", "int64", ("batch",) + shape[1:])]
    padded = dict(fidelity_variants({"attention_mask": np.ones(shape, np.int64)}, specs))["padded"]
    m = padded["attention_mask"]
    assert m.shape == (2,) + shape[1:]
    assert (m[0, ..., 0] == 1).all() and m[0, ..., 1:].sum() == 0
    assert m[1].sum() == 0
