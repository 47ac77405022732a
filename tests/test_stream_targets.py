"""stream:target=onnx|ort|auto: the window computed by a runtime's own op (ONNX Attention
opset 25 with left_window_size, ORT GroupQueryAttention with local_window_size), the cache
capped as attn-opt's own lowering caps it: the same logits as the own lowering through a
loop that runs past the window, the op in the graph, auto's timing said; sinks refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attn_opt.tools import zoo
from conftest import _cached
from test_pipeline import cli


@pytest.fixture(scope="session")
def step(cache_dir):
    return _cached(cache_dir / "step-llama-torchscript.onnx",
                   lambda tmp: zoo.export_decoder_step("llama", "torchscript", tmp))


@pytest.fixture(scope="session")
def own(step, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "own.onnx"
    r = cli(step, "--pass", "stream:sinks=0,window=6", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("target,op", [("ort", "GroupQueryAttention"), ("onnx", "Attention"), ("auto", None),
                                       ("ort_window_cache", "GroupQueryAttention")])
def test_windowed_op_equals_the_own_lowering_past_the_window(step, own, tmp_path, target, op):
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    r = cli(step, "--pass", f"stream:sinks=0,window=6,target={target}", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    if target == "ort_window_cache":  # the op's own window-sized cache, said
        gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
        assert all({a.name: a.i for a in n.attribute}["sliding_window_cache"] == 1 for n in gqa)
        assert all("sliding_window_cache=1" in n for n in p["notes"][:2])
    if op is not None:
        assert ops.count(op) == 2
    else:  # auto: one of the two, with both timings in the note
        assert ops.count("GroupQueryAttention") + ops.count("Attention") == 2
        assert all("Attention-25 window" in n and "ms vs GroupQueryAttention" in n for n in p["notes"][:2])
    a, _, gv = onnx_adapter.load_view(str(own))
    got = compare(a, onnx_adapter.load(str(out)), loop_of(gv, onnx_adapter.input_specs(gv)), np.array([[5, 6, 7, 8]]), 20)
    assert got["max_rel_error"] <= 1e-5  # 24 tokens: 18 past the window of 6
    assert got["b"].cache_bytes == got["a"].cache_bytes == 4 * (1 * 2 * 6 * 8) * 4  # capped at 6


def test_window_cache_refused_in_words_where_the_schema_lacks_it(step, monkeypatch):
    """An onnxruntime whose GroupQueryAttention has no sliding_window_cache: the site is
    refused with the version and what to use instead."""
    from attn_opt.backends.onnx import ort, stream_ops
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns.detect import detect
    from attn_opt.patterns.form import StreamCache

    site = detect(onnx_adapter.load_view(str(step))[2]).sites[0]
    monkeypatch.setattr(ort, "has_attribute", lambda *a: False)
    why = stream_ops.op_reason(site, StreamCache(0, 6, target="ort_window_cache"), "ort_window_cache")
    assert why.startswith(f"the installed onnxruntime {ort.ort_version()}'s GroupQueryAttention has no "
                          "sliding_window_cache")
    assert stream_ops.op_reason(site, StreamCache(0, 6, target="ort"), "ort") is None


def test_windowed_ops_take_no_sink_tokens(step, tmp_path):
    r = cli(step, "--pass", "stream:window=6,target=ort", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "give sinks=0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    rep = tmp_path / "r.json"  # auto with sinks: the own lowering, said
    r = cli(step, "--pass", "stream:sinks=2,window=6,target=auto", "-o", tmp_path / "a.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and p["sites_rewritten"] == ["a0", "a1"]
    assert "attn-opt's own lowering (sinks > 0)" in " ".join(p["notes"])
    assert not {"GroupQueryAttention", "Attention"} & {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}


class _GQAEncoder(torch.nn.Module):
    """A bidirectional grouped-query encoder layer (4 heads over 2 kv heads of 8), eager
    softmax with an additive padding mask: what fuse:target=ort writes as GQA causal=0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = self.v(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5 + (1.0 - mask[:, None, None, :]) * -1e9
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32)


def test_fuse_ort_writes_bidirectional_gqa_as_causal_0(tmp_path):
    from attn_opt.backends.onnx.ort import gqa_has_causal

    if not gqa_has_causal():
        pytest.skip("the installed ONNX Runtime's GroupQueryAttention has no causal attribute")
    x, mask = torch.randn(2, 6, 32), torch.ones(2, 6)
    mask[1, 4:] = 0
    src = zoo.export_module(_GQAEncoder(), (x, mask), ("x", "mask"), "dynamo", tmp_path / "gqa.onnx")
    for target in ("ort", "auto"):
        out, rep = tmp_path / f"{target}.onnx", tmp_path / f"{target}.json"
        r = cli(src, "--pass", f"fuse:target={target}", "-o", out, "--report", rep)
        assert r.returncode == 0, r.stderr
        p = json.loads(rep.read_text())["passes"][0]
        assert p["sites_rewritten"] == ["a0"] and p["fidelity_all"]["max_rel_error"] <= 1e-4
        gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
        if target == "ort":
            assert len(gqa) == 1 and {a.name: a.i for a in gqa[0].attribute}["causal"] == 0
            assert "GroupQueryAttention (com.microsoft) causal=0" in p["notes"][0]
        else:
            assert "GroupQueryAttention causal=0" in p["notes"][0] and " ms at B=" in p["notes"][0]


def test_torch_stream_equals_the_onnx_stream_through_64_tokens(step):
    """torch.fx: a decoder-step module filling a DynamicCache from its inputs, exported with a
    dynamic past axis: stream caps the returned cache and windows the attention; through 64
    greedy steps (56 past the 8 kept positions) its logits equal the ONNX step's stream."""
    import onnxruntime as ort

    import attn_opt

    module, args, names, _ = zoo.decoder_step("llama")  # the same seeded weights as `step`
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(module, args, dynamic_shapes=({1: auto}, {1: auto}, {1: auto},
                                                           tuple({2: auto} for _ in args[3:])))
    gm, report = attn_opt.optimize(ep, ["stream:sinks=2,window=6"], example_inputs=args)
    assert report.passes[0].sites_rewritten == ["a0", "a1"]
    onnx_stream, _ = attn_opt.optimize(str(step), ["stream:sinks=2,window=6"])
    sess = ort.InferenceSession(onnx_stream.to_proto().SerializeToString())
    outs = [o.name for o in sess.get_outputs()]
    past_o = {n: np.zeros((1, 2, 0, 8), np.float32) for n in names[3:]}
    past_t = [torch.zeros(1, 2, 0, 8) for _ in names[3:]]
    ids, done, errs = np.array([[5, 6, 7, 8]]), 0, []
    for _ in range(64):
        t, held = ids.shape[1], past_t[0].shape[2]
        pos = np.arange(done, done + t)[None]
        got = dict(zip(outs, sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, held + t), np.int64),
                                             "position_ids": pos, **past_o})))
        with torch.no_grad():
            y = gm(torch.from_numpy(ids), torch.ones(1, held + t, dtype=torch.long), torch.from_numpy(pos), *past_t)
        want = got["logits"][0, -1]
        errs.append(float(np.abs(y[0][0, -1].numpy() - want).max() / np.abs(want).max()))
        past_o = {n: got[n.replace("past_key_values", "present")] for n in names[3:]}
        past_t = list(y[1:])
        assert past_t[0].shape[2] == past_o[names[3]].shape[2] == min(done + t, 8)
        done, ids = done + t, np.array([[int(want.argmax())]])
    assert max(errs) <= 1e-5
