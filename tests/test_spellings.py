"""Spellings of attention model families write (issue 23), from the shared variants table
through both ONNX exporters: each is one site with the right mask and normaliser, every
form pass rewrites it or skips it with a reason, the rewritten model runs, and the exact
passes are exact on every input set (a padded row included)."""

from __future__ import annotations

import numpy as np
import torch
import onnxruntime as ort
import pytest

import attn_opt
from variants import BY_NAME

SPELLINGS = ["sink-logits", "subtracted-mask", "subtracted-inverse-mask", "masked-after-softmax", "folded-windows",
             "cosine-windows", "stream-einsum"]
FORM_PASSES = ["fuse", "fuse:target=ort", "sparse:window=4", "softplus", "sigmoid", "sinkfree:mode=relu",
               "sinkfree:mode=logit,bias=-inf", "gated", "mlpfree:collapse=qk"]


def _sites(path):
    return attn_opt.inspect(str(path)).sites


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_sink_logits_are_the_sites_normaliser(variant_onnx, exporter):
    (s,) = _sites(variant_onnx("sink-logits", exporter))
    assert s.normaliser.kind == "logit" and np.allclose(s.normaliser.bias, np.linspace(-1, 2, 4), atol=1e-6)
    assert s.blocked is None and "sink logit per head" in " ".join(s.notes)


@pytest.mark.parametrize("name", ["subtracted-mask", "subtracted-inverse-mask"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_subtracted_masks_hide_the_padded_keys(variant_onnx, name, exporter):
    """The subtracted term is recorded negated; the reference scores agree with the graph's."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns import reference

    path = variant_onnx(name, exporter)
    (s,) = _sites(path)
    assert s.mask == "additive" and s.negated_terms and s.causal is False and s.window is None
    _, _, gv = onnx_adapter.load_view(str(path))
    x, m = (t.numpy() for t in BY_NAME[name].inputs())
    feeds = {"in0": x, "in1": m}
    probed = gv.probe(reference.needed(s) + [s.probs], feeds)
    p = reference.probabilities(s, probed)
    assert np.allclose(p, probed[s.probs.name], atol=1e-6)
    assert np.all(p[-1, ..., -2:] == 0) and np.all(p[0] > 0)  # the padded row's last two keys hidden


@pytest.mark.parametrize("spec", FORM_PASSES)
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", SPELLINGS)
def test_every_form_pass_on_each_spelling(variant_onnx, tmp_path, name, exporter, spec):
    src = variant_onnx(name, exporter)
    x = [t.numpy() for t in BY_NAME[name].inputs()]
    feeds = {f"in{i}": a for i, a in enumerate(x)}
    model, report = attn_opt.optimize(str(src), [spec], feeds=feeds)
    p = report.passes[0]
    assert len(p.sites_rewritten) + len(p.sites_skipped) == 1
    assert all(s.reason for s in p.sites_skipped)
    out = tmp_path / "o.onnx"
    model.save(str(out))
    got = ort.InferenceSession(str(out)).run(None, feeds)[0]  # the written model runs
    want = ort.InferenceSession(str(src)).run(None, feeds)[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    if not p.sites_rewritten:
        assert err == 0, p.sites_skipped
        return
    assert err == pytest.approx(p.step_fidelity["max_rel_error"], rel=0.5, abs=1e-6)
    if p.exact:  # the feeds hold a padded row
        assert p.step_fidelity["max_rel_error"] <= 1e-4
    if name == "sink-logits" and spec.startswith("sinkfree"):
        assert p.exact is False and err > 1e-3  # the model's own sinks removed: not the same function


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mask_after_the_softmax_keeps_its_zero_rows(variant_onnx, exporter):
    """where(~mask, 0, softmax(where(~mask, s, min))): one site, its boolean mask, and rows
    it hides completely recorded as zeros (the first input row sees no key); a mask applied
    only after the softmax (rows not renormalised) is no site, with the reason."""
    (s,) = _sites(variant_onnx("masked-after-softmax", exporter))
    assert s.mask == "boolean" and s.zero_hidden_rows
    x, m = (t.numpy() for t in BY_NAME["masked-after-softmax"].inputs())
    y = ort.InferenceSession(str(variant_onnx("masked-after-softmax", exporter))).run(None, {"in0": x, "in1": m})[0]
    assert np.isfinite(y).all()
    det = attn_opt.inspect(str(variant_onnx("masked-after-only", exporter)))
    assert not det.sites and "masked after the softmax by a mask not applied before it" in det.near_misses[0].reason


class _NarrowCross(torch.nn.Module):
    """Cross-attention whose K/V stream is narrower than the queries' (BLIP-2's Q-Former)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(24, 32), torch.nn.Linear(24, 32)
        self.o = torch.nn.Linear(32, 32)

    def forward(self, x, y):
        b = x.shape[0]
        q, k, v = (t.view(b, -1, 4, 8).transpose(1, 2) for t in (self.q(x), self.k(y), self.v(y)))
        p = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, -1, 32))


class _SlicedQueries(_NarrowCross):
    """Queries sliced after their projection (ProphetNet's main stream): 4 query rows from 7."""

    def forward(self, x, y):
        b = x.shape[0]
        q = self.q(x)[:, :4].reshape(b, 4, 4, 8).transpose(1, 2)
        k, v = (t.view(b, -1, 4, 8).transpose(1, 2) for t in (self.k(y), self.v(y)))
        p = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, 4, 32))


@pytest.mark.parametrize("module,spec,reason", [
    (_NarrowCross, "mlpfree:collapse=qk+vo", "K is projected from 24-wide hidden states, Q from 32-wide"),
    (_SlicedQueries, "gated", "has 7 rows, the site's queries 4"),
])
def test_rewrites_that_would_not_fit_are_skipped(tmp_path, module, spec, reason):
    """collapse checks the K/V stream's width, gated the gate source's rows: skipped with the
    reason (the model is written unchanged and runs); fuse rewrites the same site exactly."""
    from attn_opt.tools import zoo

    args = (torch.randn(2, 7, 32), torch.randn(2, 5, 24))
    src = zoo.export_module(module().eval(), args, ("x", "y"), "torchscript", tmp_path / "m.onnx", dynamic=False)
    feeds = {"x": args[0].numpy(), "y": args[1].numpy()}
    _, report = attn_opt.optimize(str(src), [spec], feeds=feeds)
    p = report.passes[0]
    assert not p.sites_rewritten and reason in p.sites_skipped[0].reason
    _, report = attn_opt.optimize(str(src), ["fuse"], feeds=feeds)
    p = report.passes[0]
    assert p.sites_rewritten == ["a0"] and p.step_fidelity["max_rel_error"] <= 1e-4


def test_fuse_keeps_a_sink_logit_as_one_more_key(variant_onnx, tmp_path):
    """Outside a decoder step, fuse writes ONNX Attention over the keys plus a zero key whose
    mask column is the sink logit (value 0): the same function, the sink a weight."""
    import onnx

    src = variant_onnx("sink-logits", "dynamo")
    x = BY_NAME["sink-logits"].inputs()[0].numpy()
    model, report = attn_opt.optimize(str(src), ["fuse"], feeds={"in0": x})
    p = report.passes[0]
    assert p.sites_rewritten == ["a0"] and p.step_fidelity["max_rel_error"] <= 1e-4
    assert "the sink logit as one more key" in p.notes[0]
    model.save(str(tmp_path / "f.onnx"))
    g = onnx.load(str(tmp_path / "f.onnx")).graph
    (att,) = [n for n in g.node if n.op_type == "Attention"]
    sink = next(i for i in g.initializer if i.name == "attn_opt.a0.sink_logit")
    assert np.allclose(onnx.numpy_helper.to_array(sink), np.linspace(-1, 2, 4)) and len(att.input) == 4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_heads_folded_with_windows_are_read_from_the_output_view(variant_onnx, tmp_path, exporter):
    """SAM: [B·windows·H, q, k] scores never viewed as 4-D; the heads come from the reshape
    that unfolds the output, the bias added in the folded layout is viewed per head, and
    fuse writes one op whose bias is [B·windows, H, q, k]: exact, and the written model runs."""
    import onnx

    src = variant_onnx("folded-windows", exporter)
    (s,) = _sites(src)
    assert (s.heads, s.kv_heads, s.head_dim, s.q_len, s.k_len) == (4, 4, 8, 9, 9)
    assert s.kind == "self" and s.mask == "additive" and s.folded_terms and s.window is None
    feeds = {"in0": BY_NAME["folded-windows"].inputs()[0].numpy()}
    for spec in ("fuse", "fuse:target=ort"):
        model, report = attn_opt.optimize(str(src), [spec], feeds=feeds)
        p = report.passes[0]
        assert p.sites_rewritten == ["a0"] and p.step_fidelity["max_rel_error"] <= 1e-4
        model.save(str(tmp_path / "f.onnx"))
        m = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "f.onnx")))
        (att,) = [n for n in m.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
        attrs = {a.name: a.i for a in att.attribute}
        if att.op_type == "MultiHeadAttention":
            assert attrs["num_heads"] == 4
        else:  # ONNX Attention on 4-D [B·windows, H, q, D] inputs
            shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
            assert shapes[att.input[0]][1] == 4
        got = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, feeds)[0]
        want = ort.InferenceSession(str(src)).run(None, feeds)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


class _SingleHeadBatch(torch.nn.Module):
    """A batch of single-head attentions whose output is viewed spatially [N, h, w, D]: the
    view does not split the batch axis, so no heads are read from it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):  # [N, 9, 8]
        q, k, v = self.qkv(x).chunk(3, -1)
        o = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 8 ** -0.5, -1) @ v
        return o.reshape(x.shape[0], 3, 3, 8)


def test_a_spatial_output_view_is_not_heads(tmp_path):
    from attn_opt.tools import zoo

    args = (torch.randn(6, 9, 8),)
    src = zoo.export_module(_SingleHeadBatch().eval(), args, ("x",), "torchscript", tmp_path / "m.onnx", dynamic=False)
    (s,) = _sites(src)
    assert s.heads == 1 and s.head_dim == 8


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cosine_attention_keeps_its_norms_and_temperature(variant_onnx, tmp_path, exporter):
    """Swin v2: the normalised Q/K are the operands, exp(clamp(logit_scale)) per head is a
    factor folded into Q, the shifted-window mask added in the [B/W, W, H, T, T] view is a
    term of the 4-D scores: the reference softmax equals the graph's, fuse is exact and keeps
    the norms outside the fused op, and fuse then sparse composes on the rewritten site."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns import reference

    src = variant_onnx("cosine-windows", exporter)
    (s,) = _sites(src)
    assert (s.heads, s.kv_heads, s.kind, s.causal, s.window) == (4, 4, "self", False, None)
    assert s.q.factor is not None and s.k.factor is None and s.scale == 1.0
    assert s.regroup == 2 and len(s.regrouped_terms) == 1 and s.blocked is None
    x, m = (t.numpy() for t in BY_NAME["cosine-windows"].inputs())
    feeds = {"in0": x, "in1": m}
    _, _, gv = onnx_adapter.load_view(str(src))
    probed = gv.probe(reference.needed(s) + [s.probs], feeds)
    p = reference.probabilities(s, probed)
    assert np.allclose(p, probed[s.probs.name], atol=1e-6)
    assert p[1, :, :3, 3:].max() < 1e-30 and p[0, :, :3, 3:].min() > 1e-20  # window 1's regions apart, window 0 whole
    model, report = attn_opt.optimize(str(src), ["fuse:target=onnx", "sparse:window=4"], feeds=feeds)
    f, sp = report.passes
    assert f.sites_rewritten == ["a0"] and f.step_fidelity["max_rel_error"] <= 1e-4
    assert sp.sites_rewritten == ["a0"]
    import onnx

    model.save(str(tmp_path / "fs.onnx"))
    norms = {"ReduceL2", "LpNormalization", "ReduceSumSquare", "Sqrt", "Pow"}

    def count(path):
        return sum(n.op_type in norms for n in onnx.load(str(path)).graph.node)

    assert count(tmp_path / "fs.onnx") == count(src) > 0  # the norms stay outside the rewritten op
    got = ort.InferenceSession(str(tmp_path / "fs.onnx")).run(None, feeds)[0]
    assert np.isfinite(got).all()


def test_a_term_added_before_the_head_factor_is_no_site(tmp_path):
    """(s + b)·t scales the term too: not read as a factor folded into Q."""
    from attn_opt.tools import zoo

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = torch.nn.Parameter(torch.linspace(1, 2, 4).reshape(4, 1, 1))

        def forward(self, q, k, v, b):
            return torch.softmax((q @ k.transpose(-2, -1) + b) * self.t, -1) @ v

    args = tuple(torch.randn(2, 4, 5, 8) for _ in range(3)) + (torch.randn(2, 1, 5, 5),)
    src = zoo.export_module(M().eval(), args, ("q", "k", "v", "b"), "torchscript", tmp_path / "m.onnx", dynamic=False)
    det = attn_opt.inspect(str(src))
    assert not det.sites and "before their per-head factor" in det.near_misses[0].reason


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_streams_in_one_einsum_are_merged_into_the_batch(variant_onnx, exporter):
    """ProphetNet's `bnhtc,bnhsc->bnhts`: one site over both streams, the stream axis merged
    into the batch, its 5-D bias and the mask broadcast over the streams as 4-D terms; the
    reference equals the graph's softmax (the padded row's last keys hidden) and fuse is exact."""
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns import reference

    src = variant_onnx("stream-einsum", exporter)
    (s,) = _sites(src)
    assert (s.heads, s.kv_heads, s.head_dim, s.kind, s.causal) == (4, 4, 8, "self", False)
    assert s.q.streams == 2 and s.regroup == 2 and len(s.regrouped_terms) == 2
    x, m = (t.numpy() for t in BY_NAME["stream-einsum"].inputs())
    feeds = {"in0": x, "in1": m}
    _, _, gv = onnx_adapter.load_view(str(src))
    probed = gv.probe(reference.needed(s) + [s.probs], feeds)
    p = reference.probabilities(s, probed)
    assert np.allclose(p, probed[s.probs.name].reshape(p.shape), atol=1e-6)
    assert np.all(p[2:, ..., -2:] == 0) and np.all(p[:2] > 0)  # batch row 1 (both streams) padded
    for spec in ("fuse:target=onnx", "fuse:target=ort"):
        _, report = attn_opt.optimize(str(src), [spec], feeds=feeds)
        assert report.passes[0].sites_rewritten == ["a0"] and report.passes[0].step_fidelity["max_rel_error"] <= 1e-4


def test_sink_column_on_torch_fx_fuses_exactly():
    """gpt-oss written in torch (cat([S, sinks], -1), S − max, softmax, [..., :-1]) on
    torch.export: the sink logit read per head, and fuse writes SDPA over one more key of
    value 0 scored by it (a parameter holding the model's own values): exact."""
    v = BY_NAME["sink-logits"]
    model, x = v.make().eval(), v.inputs()
    (s,) = attn_opt.inspect(model, example_inputs=x).sites
    assert s.normaliser.kind == "logit" and np.allclose(s.normaliser.bias, np.linspace(-1, 2, 4), atol=1e-6)
    gm, report = attn_opt.optimize(model, ["fuse"], example_inputs=x)
    p = report.passes[0]
    assert p.sites_rewritten == ["a0"] and p.step_fidelity["max_rel_error"] <= 1e-4
    assert "sink logit as one more key" in p.notes[0]
    sink = dict(gm.named_parameters())["attn_opt_a0_sink_logit"]
    assert np.allclose(sink.detach().numpy(), np.linspace(-1, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), model(*x), rtol=1e-4, atol=1e-5)


def test_a_5d_view_with_nothing_added_changes_nothing(tmp_path):
    """Scores viewed [B, 2, H/2, T, T] and back with no term added in between: one site, not
    blocked, fuse exact (the view is no regrouped term)."""
    from attn_opt.tools import zoo

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) * 8 ** -0.5
            b, h, t, _ = s.shape
            s = (s.view(b, 2, h // 2, t, t) * 1.0).view(b, h, t, t)
            return torch.softmax(s, -1) @ v

    args = tuple(torch.randn(2, 4, 5, 8) for _ in range(3))
    src = zoo.export_module(M().eval(), args, ("q", "k", "v"), "torchscript", tmp_path / "m.onnx", dynamic=False)
    (s,) = _sites(src)
    assert s.blocked is None and s.regroup is None and not s.regrouped_terms
    feeds = {n: a.numpy() for n, a in zip(("q", "k", "v"), args)}
    _, report = attn_opt.optimize(str(src), ["fuse"], feeds=feeds)
    assert report.passes[0].sites_rewritten == ["a0"] and report.passes[0].step_fidelity["max_rel_error"] <= 1e-4
