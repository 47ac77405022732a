"""A site whose output is itself a graph output: every pass rewrites it and the output
keeps its name, type and shape (it used to fail the checker: "Field 'shape' of 'type'
is required but missing"); exact passes stay exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import attn_opt
from attn_opt.tools.hostile_files import SHAPE, output_site, projected_output_site
from test_pipeline import cli

# (pass, model, exact): every pass that rewrites a site of these models
PASSES = [
    ("fuse", output_site, True),
    ("fuse:target=ort", output_site, True),
    ("sparse:window=4", output_site, False),
    ("sparse:window=16", output_site, True),  # a window wider than the 8 keys drops nothing: exact
    ("softplus", output_site, False),
    ("sigmoid", output_site, False),
    ("sinkfree:mode=relu", output_site, False),
    ("sinkfree:mode=logit,bias=-inf", output_site, True),
    ("sinkfree:mode=redistribute,alpha=0.5", output_site, False),
    ("gated", projected_output_site, True),
    ("mlpfree:collapse=qk", projected_output_site, True),
]


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds)[0]


@pytest.mark.parametrize("spec,build,exact", PASSES, ids=[p[0] for p in PASSES])
def test_every_pass_keeps_the_graph_output(spec, build, exact):
    model = build()
    out, report = attn_opt.optimize(model, [spec], force=True)
    assert report.passes[0].sites_rewritten == ["a0"], report.passes[0].sites_skipped
    (y,) = out.graph.output
    assert y.name == "y" and y.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in y.type.tensor_type.shape.dim] == SHAPE
    onnx.checker.check_model(out, full_check=True)
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    before, after = _run(model, feeds), _run(out, feeds)
    assert after.shape == before.shape
    if exact:
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    else:
        assert not np.allclose(after, before, rtol=1e-4, atol=1e-5)  # the approximate form did change it


def test_reproduction_from_the_command_line(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(output_site(), src)
    r = cli(src, "--pass", "fuse", "-o", dst)
    assert r.returncode == 0, r.stderr
    assert [o.name for o in onnx.load(dst).graph.output] == ["y"]
