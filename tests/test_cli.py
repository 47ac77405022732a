"""The `attn-opt` command: output formats and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from attn_opt.tools.cli import main


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn_opt", *map(str, args)], capture_output=True, text=True)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_json_schema(zoo_onnx):
    path = zoo_onnx("t5-eager", "torchscript")
    before = _digest(path)
    r = run_cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == str(path)
    assert len(out["sites"]) == 6 and out["near_misses"] == []
    for s in out["sites"]:
        assert {"id", "kind", "heads", "kv_heads", "head_dim", "causal", "mask", "scale", "nodes"} <= set(s)
    assert [s["kind"] for s in out["sites"]].count("cross") == 2
    assert _digest(path) == before  # inspect never writes the model


def test_table_and_why(variant_onnx, capsys):
    path = variant_onnx("moe-gate", "dynamo")
    assert main(["inspect", str(path), "--why"]) == 0
    out = capsys.readouterr().out
    assert "0 attention site(s)" in out
    assert "weight" in out  # the reason the router softmax is not attention


def _no_attention_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), str(path))


def test_no_attention_is_empty_and_ok(tmp_path):
    p = tmp_path / "relu.onnx"
    _no_attention_model(p)
    r = run_cli("inspect", p)
    assert r.returncode == 0 and "0 attention site(s)" in r.stdout


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "directory", "empty", "pt2-garbage"])
def test_bad_input_one_line(tmp_path, zoo_onnx, case):
    if case == "missing":
        p = tmp_path / "nope.onnx"
    elif case == "garbage":
        p = tmp_path / "garbage.onnx"
        p.write_bytes(b"this is not a model\x00\x01")
    elif case == "truncated":
        src = zoo_onnx("bert-eager", "dynamo").read_bytes()
        p = tmp_path / "truncated.onnx"
        p.write_bytes(src[: len(src) // 3])
    elif case == "directory":
        p = tmp_path
    elif case == "empty":
        p = tmp_path / "empty.onnx"
        p.write_bytes(b"")
    else:
        p = tmp_path / "bad.pt2"
        p.write_bytes(b"PK not really")
    r = run_cli("inspect", p)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_zoo_command(tmp_path):
    r = run_cli("zoo")
    assert r.returncode == 0 and "llama-eager" in r.stdout
    r = run_cli("zoo", "not-a-model", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "unknown zoo model" in r.stderr


def test_a_pass_that_finds_no_site_says_why_and_exits_3(variant_onnx, tmp_path):
    """No attention site: one line naming each softmax seen with its reason, exit 3, nothing
    written; --allow-empty writes the model unchanged (exit 0); inspect stays exit 0."""
    src, out = variant_onnx("moe-gate", "dynamo"), tmp_path / "o.onnx"
    r = run_cli("optimize", src, "--pass", "fuse", "-o", out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and not out.exists()
    assert lines[0].startswith("nothing found: ") and "softmax(es) seen, none attention" in lines[0]
    assert "not with keys (a projection or classifier, not attention)" in lines[0]  # the router softmax's --why
    r = run_cli("optimize", src, "--pass", "fuse", "-o", out, "--allow-empty")
    assert r.returncode == 0 and out.exists()
    relu = tmp_path / "relu.onnx"
    _no_attention_model(relu)
    r = run_cli("optimize", relu, "--pass", "sparse:window=4", "-o", out)
    assert r.returncode == 3 and "no softmax and no attention op" in r.stderr
