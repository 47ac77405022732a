"""attn-opt as an Olive pass (attn_opt/olive.py): a two-pass Olive workflow (AttnOpt, then
Olive's own OnnxDynamicQuantization) on the Optimum BERT fixture; skipped, saying why,
where Olive (extra `olive`) is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
olive = pytest.importorskip("olive.passes", reason="Olive is not installed (pip install -e \".[olive]\")")

from attn_opt.core.graph import SITE_TAG  # noqa: E402

BERT = Path(__file__).parent / "fixtures" / "optimum" / "bert" / "model.onnx"


def workflow(tmp: Path, passes: list[str], **extra) -> dict:
    return {"input_model": {"type": "ONNXModel", "model_path": str(BERT)},
            "passes": {"attn": {"type": "AttnOpt", "passes": passes, "input_shape": ["input_ids=1x16"], **extra},
                       "quant": {"type": "OnnxDynamicQuantization"}},
            "output_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache"), "log_severity_level": 3}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from attn_opt.olive import run

    tmp = tmp_path_factory.mktemp("olive")
    run(workflow(tmp, ["sparse:window=4"]))
    return tmp / "out"


def test_two_pass_workflow(ran):
    m = onnx.load(str(ran / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops  # Olive's quantization ran after attn-opt
    tagged = {p.value for n in m.graph.node for p in n.metadata_props if p.key == SITE_TAG}
    assert tagged == {"a0", "a1"}  # attn-opt's rewritten sites survive quantization


def test_report_in_the_output_folder(ran):
    report = json.loads((ran / "attn_opt_report.json").read_text())
    p = report["passes"][0]
    assert p["name"] == "sparse" and p["sites_rewritten"] == ["a0", "a1"]
    assert p["attention_flops_after"] < p["attention_flops_before"] and 0 < p["fidelity"]["max_rel_error"] < 0.5


def test_output_runs(ran):
    import onnxruntime as ort

    s = ort.InferenceSession(str(ran / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((1, 16), np.int64) for i in s.get_inputs()}
    assert all(np.isfinite(o).all() for o in s.run(None, feeds))


def test_bad_pass_spec_fails_the_pass(tmp_path, caplog):
    """Olive logs a failed pass and writes no model (it does not raise: a failed pass is
    pruned from its search); attn-opt's one-line reason is in its log."""
    from attn_opt.olive import run

    run(workflow(tmp_path, ["nosuchpass"]))
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert "unknown pass 'nosuchpass'" in caplog.text


def test_passes_are_required():
    from olive.hardware import DEFAULT_CPU_ACCELERATOR

    from attn_opt.olive import AttnOpt

    cfg = AttnOpt._default_config(DEFAULT_CPU_ACCELERATOR)
    assert cfg["passes"].required and not cfg["force"].default_value
