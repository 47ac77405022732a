"""How many ONNX Runtime sessions and runs the pipeline makes (structural, never timed),
and that every check still runs: one session per model serves the observation run and
every variant input set; past WHOLE_RUN_BYTES a model runs one segment at a time, each
segment's session serving every set; a run already made is answered from memory and a
changed graph is run again; --check=sites holds one segment's weights at a time;
writes copy the weight file whole or (--share-weights) reference it in place."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import attn_opt
from attn_opt.core.ir import onnx_runs
from attn_opt.core.ir.onnx_model import OnnxModel
from attn_opt.core.ir.onnx_segments import _sizes, segments
from test_pipeline import cli, digest

FEEDS = {"input_ids": np.arange(1, 13).reshape(2, 6), "attention_mask": np.ones((2, 6), np.int64)}


@pytest.fixture(scope="module")
def ext(zoo_onnx, tmp_path_factory):
    """bert-eager (two attention layers) with its weights in a data file next to it."""
    d = tmp_path_factory.mktemp("runs")
    proto = onnx.load(str(zoo_onnx("bert-eager", "dynamo")))
    onnx.save_model(proto, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=128)
    return d / "m.onnx"


def _optimize(src, spec: str, **kw):
    onnx_runs.COUNTS.clear()
    out, rep = attn_opt.optimize(str(src), [spec], **kw)
    return out, rep, dict(onnx_runs.COUNTS)


def _per_output(rep) -> dict:
    return {k: v["max_rel_error"] for k, v in rep.passes[0].per_output.items()}


@pytest.fixture(scope="module")
def whole(ext):
    """sparse (approximate: every figure is non-zero) with every check, each model run whole."""
    return _optimize(ext, "sparse:window=2,sinks=1")


def test_one_session_per_model_serves_every_input_set(whole):
    _, rep, n = whole
    assert rep.inputs["variants"] == ["padded", "length+5"]
    # the original and the rewritten model: one session each, three input sets through each
    assert n["sessions"] == 2 and n["runs"] == 6, n
    per = _per_output(rep)
    assert {k.partition("@")[2] for k in per} == {"", "padded", "length+5"}, per
    assert all(e > 1e-4 for e in per.values()), "every input set compared on the rewritten model itself"
    assert rep.passes[0].fidelity_all["max_rel_error"] == max(per.values())


def test_segmented_runs_serve_every_set_per_segment(ext, whole, monkeypatch):
    """Forced to run one segment at a time: a session per segment per model, every input
    set through each, no session holding more than a segment, the same figures."""
    monkeypatch.setattr(onnx_runs, "WHOLE_RUN_BYTES", 0)
    monkeypatch.setattr(onnx_runs, "MIN_SEGMENT_BYTES", 0)
    _, rep, n = _optimize(ext, "sparse:window=2,sinks=1")
    proto = OnnxModel.load(ext).graph_proto()
    budget = onnx_runs.segment_budget(OnnxModel.load(ext).weight_bytes())
    assert len(segments(proto, budget)) >= 4
    assert n["runs"] == 3 * n["sessions"] and n["sessions"] >= 2 * len(segments(proto, budget)) - 2, n
    assert n["largest"] <= budget + max(_sizes(proto).values())
    seg, full = _per_output(rep), _per_output(whole[1])
    assert seg.keys() == full.keys()
    assert all(abs(seg[k] - full[k]) <= 1e-4 * max(full[k], 1e-6) + 1e-6 for k in seg), (seg, full)


def test_segmented_values_equal_a_whole_run(ext, monkeypatch):
    om = OnnxModel.load(ext)
    want = om.run(FEEDS)
    monkeypatch.setattr(onnx_runs, "WHOLE_RUN_BYTES", 0)
    monkeypatch.setattr(onnx_runs, "MIN_SEGMENT_BYTES", 0)
    got = OnnxModel.load(ext).run(FEEDS)
    assert want.keys() == got.keys() and all(np.allclose(want[k], got[k], atol=1e-5) for k in want)


def test_a_run_made_is_remembered_and_a_changed_graph_runs_again(ext):
    om = OnnxModel.load(ext)
    onnx_runs.COUNTS.clear()
    first = om.run(FEEDS)
    again = om.run({k: v.copy() for k, v in FEEDS.items()})  # equal inputs, other arrays
    assert onnx_runs.COUNTS["sessions"] == 1 and onnx_runs.COUNTS["runs"] == 1
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = om.run({"input_ids": FEEDS["input_ids"] + 1, "attention_mask": FEEDS["attention_mask"]})
    assert onnx_runs.COUNTS["runs"] == 2 and any(not np.array_equal(first[k], other[k]) for k in first)
    out = om.ir.graph.outputs[0]  # a weight of the node giving the output moved: the graph's content changed
    w = next(x for x in out.producer().inputs if x is not None and x.const_value is not None)
    w.const_value = ir.Tensor(np.asarray(w.const_value.numpy()) + 1.0, name=w.name)
    changed = om.run(FEEDS)
    assert onnx_runs.COUNTS["sessions"] == 3
    fresh = OnnxModel.from_proto(om.graph_proto(), om.folder).run(FEEDS)  # a model object of its own
    assert not np.allclose(changed[out.name], first[out.name], atol=1e-3)
    assert np.array_equal(changed[out.name], fresh[out.name])


def test_a_variant_that_fails_is_said_when_asked_for(ext):
    om = OnnxModel.load(ext)
    bad = {"input_ids": FEEDS["input_ids"].astype(np.float32), "attention_mask": FEEDS["attention_mask"]}
    onnx_runs.COUNTS.clear()
    got = om.run(FEEDS, also=[bad])
    assert got and onnx_runs.COUNTS["sessions"] == 1
    with pytest.raises(Exception):
        om.run(bad)
    assert onnx_runs.COUNTS["sessions"] == 1  # remembered, not retried


def test_check_sites_holds_a_segment_at_a_time(ext, monkeypatch):
    monkeypatch.setattr(onnx_runs, "MIN_SEGMENT_BYTES", 0)
    _, rep, n = _optimize(ext, "fuse", check="sites")
    proto = OnnxModel.load(ext).graph_proto()
    weights = OnnxModel.load(ext).weight_bytes()
    assert sorted(rep.passes[0].per_site) == ["a0", "a1"]
    assert max(s["max_rel_error"] for s in rep.passes[0].per_site.values()) <= 1e-5
    assert 0 < n["largest"] <= weights // 2 + max(_sizes(proto).values()), n


def _offsets(path) -> dict:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    return {t.name: (ExternalDataInfo(t).location, ExternalDataInfo(t).offset)
            for t in m.graph.initializer if uses_external_data(t)}


def test_a_weight_file_read_whole_is_copied_whole(ext, tmp_path):
    """Every byte of the input's data file is read (its tensors are all large enough to stay
    external): it is copied in one piece, each tensor at its own offset."""
    src_path, out = tmp_path / "big.onnx", tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    onnx.save_model(onnx.load(str(ext)), str(src_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=1024)
    OnnxModel.load(src_path).save(out)
    src, got = _offsets(src_path), _offsets(out)
    assert got.keys() == src.keys() and {loc for loc, _ in got.values()} == {"o.onnx.data"}
    assert all(got[k][1] == src[k][1] for k in got)
    assert digest(out.with_name("o.onnx.data")) == digest(src_path.with_name("big.onnx.data"))
    want, have = OnnxModel.load(src_path).run(FEEDS), OnnxModel.load(out).run(FEEDS)
    assert all(np.array_equal(want[k], have[k]) for k in want)


def test_a_rewritten_model_writes_no_dead_bytes(ext, tmp_path):
    """After a pass the data file holds what the output reads, packed, and computes the same."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    out = tmp_path / "o.onnx"
    r = cli(ext, "--pass", "fuse", "--check", "none", "-o", out)
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(out), load_external_data=False)
    lengths = [ExternalDataInfo(t).length for t in m.graph.initializer if uses_external_data(t)]
    assert lengths and out.with_name("o.onnx.data").stat().st_size == sum(lengths)
    want, got = OnnxModel.load(ext).run(FEEDS), OnnxModel.load(out).run(FEEDS)
    assert all(np.allclose(want[k], got[k], atol=1e-5) for k in want)


def test_share_weights_references_the_input_files(ext, tmp_path):
    data = ext.with_name("m.onnx.data")
    before = (digest(ext), digest(data), data.stat().st_mode)
    out, rep = ext.parent / "shared.onnx", tmp_path / "r.json"
    r = cli(ext, "--pass", "fuse", "-o", out, "--share-weights", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert (digest(ext), digest(data), data.stat().st_mode) == before
    assert set(_offsets(out).values()) <= set(_offsets(ext).values()), "each tensor where it is in the input's file"
    assert not out.with_name(out.name + ".data").exists(), "fuse adds no weights: nothing else written"
    assert json.loads(rep.read_text())["passes"][0]["step_fidelity"]["max_rel_error"] <= 1e-4
    want, got = OnnxModel.load(ext).run(FEEDS), OnnxModel.load(out).run(FEEDS)
    assert all(np.allclose(want[k], got[k], atol=1e-5) for k in want)


def test_share_weights_elsewhere_is_refused_in_one_line(ext, tmp_path):
    r = cli(ext, "--pass", "fuse", "-o", tmp_path / "o.onnx", "--share-weights")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "input model's folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_share_weights_refuses_an_inline_model_in_one_line(zoo_onnx, tmp_path):
    import shutil

    src = tmp_path / "inline.onnx"
    shutil.copy(zoo_onnx("bert-eager", "dynamo"), src)
    r = cli(src, "--pass", "fuse", "-o", tmp_path / "o.onnx", "--share-weights")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--share-weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_static_shape_nodes_give_what_onnx_runtime_computes():
    """A Shape node of a sized value becomes a Constant with the same value (start/end,
    negative and clamped, included); an unsized one stays."""
    from onnx import TensorProto, helper

    from attn_opt.core.ir.onnx_segments import static_shape_nodes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    nodes = [helper.make_node("Shape", ["x"], ["s0"]), helper.make_node("Shape", ["x"], ["s1"], start=1, end=-1),
             helper.make_node("Shape", ["x"], ["s2"], start=-9, end=9), helper.make_node("Shape", ["y"], ["s3"]),
             helper.make_node("Identity", ["x"], ["y"])]
    outs = [onnx.ValueInfoProto(name=n) for n in ("s0", "s1", "s2", "s3")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 21)])
    want = OnnxModel.from_proto(m).run({"x": np.zeros((2, 3, 4, 5), np.float32)})
    replaced = static_shape_nodes(nodes, {"x": (2, 3, 4, 5), "y": (2, None, 4, 5)})
    assert [n.op_type for n in replaced] == ["Constant"] * 3 + ["Shape", "Identity"]
    got = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in replaced[:3]}
    assert all(np.array_equal(got[k], want[k]) for k in got), (got, want)


def test_observing_without_a_run_computes_no_projection(ext, monkeypatch):
    """Without a run (--check none / sites) Q, K and V are read for their shapes only: no
    MatMul runs, and the sites (heads, lengths, masks, run shapes) are the ones a full run
    finds; the rewritten model's observation reuses what the model before the pass read
    (its own mask nodes run, nothing that reads a weight)."""
    import attn_opt.core.ir.onnx_segments as seg
    from attn_opt.pipeline.onnx_steps import OnnxSteps

    ran, real = [], seg._run_sub
    monkeypatch.setattr(seg, "_run_sub", lambda m, p, nodes, *a: ran.append([n.op_type for n in nodes]) or
                        real(m, p, nodes, *a))
    monkeypatch.setattr(onnx_runs, "MIN_SEGMENT_BYTES", 0)

    def fields(state):
        return [(s.id, s.heads, s.kv_heads, s.head_dim, s.q_len, s.k_len, s.mask, s.causal, s.scale, s.run_shape,
                 s.mask_shapes) for s in state.det.sites]

    steps = OnnxSteps()
    quick = steps.observe(OnnxModel.load(ext), FEEDS, run=False)
    assert ran and not any(op in ("MatMul", "Gemm") for ops in ran for op in ops), ran
    full = steps.observe(OnnxModel.load(ext), FEEDS, run=True)
    assert fields(quick) == fields(full) and len(full.det.sites) == 2
    assert quick.flops.matmul == full.flops.matmul and quick.flops.attention_matmul == full.flops.attention_matmul
    ran.clear()
    _, rep, n = _optimize(ext, "fuse", check="none")
    assert len(rep.passes[0].sites_rewritten) == 2
    assert not any(op in ("MatMul", "Gemm") for ops in ran for op in ops), ran
    assert len(ran) == n["sessions"] <= 2, n
