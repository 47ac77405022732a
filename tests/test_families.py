"""Architectures the zoo does not hold: self versus cross follows from where K comes from
(whatever rotary, norms or a fused QKV lie between), so every pass rewrites them."""

from __future__ import annotations

import json
import os

import onnx

import pytest
import torch

import attn_opt
from attn_opt.tools import zoo
from test_pipeline import cli

SMALL = dict(vocab_size=zoo.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
FAMILIES = {  # class: (config class, extra config, heads, kv heads)
    "GPTNeoXModel": ("GPTNeoXConfig", dict(intermediate_size=64), 4, 4),
    "Qwen3Model": ("Qwen3Config", dict(intermediate_size=64, num_key_value_heads=2, head_dim=8), 4, 2),
    "FalconModel": ("FalconConfig", {}, 4, 1),
    # soft-capped scores, and a causal sliding window in every other layer (its mask says so)
    "Gemma2Model": ("Gemma2Config", dict(intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                         attn_logit_softcapping=50.0, sliding_window=4), 4, 2),
    # masks twice: where(causal, S, min) + padding (min): keys hidden by both are -inf
    "GPTNeoModel": ("GPTNeoConfig", dict(attention_types=[[["global", "local"], 1]], window_size=4), 4, 4),
    # Q pre-scaled, K through the (empty) cache's Concat on TorchScript
    "OPTModel": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32), 4, 4),
    # MLA: q through q_a → norm → q_b, K/V from the latent kv_a → norm → kv_b plus a shared rotary key
    "DeepseekV3Model": ("DeepseekV3Config", dict(
        intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=2, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, num_key_value_heads=4), 4, 4),
}


@pytest.fixture(scope="session")
def family(cache_dir):
    def get(cls: str, exporter: str):
        path = cache_dir / f"family-{cls}-{exporter}.onnx"
        if not path.exists():
            cfg, extra, _, _ = FAMILIES[cls]
            model = zoo._hf(cls, cfg, "eager", **SMALL, **extra)
            tmp = path.with_suffix(".tmp.onnx")
            zoo.export_module(zoo._Text(model), zoo._ids_and_padded_mask(), ("input_ids", "attention_mask"),
                              exporter, tmp)
            os.replace(tmp, path)
        return path

    return get


@pytest.mark.parametrize("cls", list(FAMILIES))
def test_rotary_self_attention_through_torchscript(family, cls):
    _, _, heads, kv = FAMILIES[cls]
    sites = attn_opt.inspect(str(family(cls, "torchscript"))).sites
    assert [(s.kind, s.heads, s.kv_heads, s.causal) for s in sites] == [("self", heads, kv, True)] * 2
    assert all(s.hidden is not None for s in sites)


@pytest.mark.parametrize("spec", ["fuse", "sparse:window=4", "gated"])
@pytest.mark.parametrize("cls", list(FAMILIES))
def test_every_pass_rewrites_them(family, tmp_path, cls, spec):
    rep = tmp_path / "r.json"
    r = cli(family(cls, "torchscript"), "--pass", spec, "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert len(p["sites_rewritten"]) == 2, p["sites_skipped"]
    if spec != "sparse:window=4":
        assert p["step_fidelity_all"]["max_rel_error"] <= 1e-4


def test_cross_attention_stays_cross(zoo_onnx):
    """T5's decoder reads the encoder's states: its cross sites keep their label."""
    for exporter in ("dynamo", "torchscript"):
        sites = attn_opt.inspect(str(zoo_onnx("t5-eager", exporter))).sites
        assert [s.kind for s in sites].count("cross") == 2


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_softcap_and_sliding_window(family, tmp_path, exporter):
    """Gemma 2: c·tanh(S/c) is found and kept (ONNX Attention's softcap), the local layer is
    causal with window 4 read from its mask, and sparse:window=4 on it is exact."""
    src = family("Gemma2Model", exporter)
    sites = attn_opt.inspect(str(src)).sites
    assert [(s.softcap, s.window, s.causal) for s in sites] == [(50.0, 4, True), (50.0, None, True)]
    r = cli(src, "--pass", "fuse", "-o", tmp_path / "f.onnx")
    assert r.returncode == 0, r.stderr
    fused = [n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.op_type == "Attention"]
    assert len(fused) == 2 and all(a.f == 50.0 for n in fused for a in n.attribute if a.name == "softcap")
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "sparse:window=4", "--sites", "a0", "-o", tmp_path / "s.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert json.loads(rep.read_text())["passes"][0]["fidelity"]["max_rel_error"] <= 1e-5


def test_softcap_on_torch():
    cfg, extra, _, _ = FAMILIES["Gemma2Model"]
    model = zoo._Text(zoo._hf("Gemma2Model", cfg, "eager", **SMALL, **extra))
    args = zoo._ids_and_padded_mask()
    gm, report = attn_opt.optimize(model, ["fuse"], example_inputs=args)
    p = report.passes[0]
    assert len(p.sites_rewritten) == 2 and p.step_fidelity["max_rel_error"] <= 1e-4
    assert all("soft-cap 50" in n for n in p.notes)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_vision_grid_then_another_form(zoo_onnx, tmp_path, exporter):
    """A 2-D neighborhood drops the site's no-op mask; the next pass still finds the site."""
    rep = tmp_path / "r.json"
    r = cli(zoo_onnx("vit-eager", exporter), "--pass", "sparse:window=3x3,grid=4x4", "--pass", "softplus",
            "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert [len(p["sites_rewritten"]) for p in json.loads(rep.read_text())["passes"]] == [2, 2]


def test_why_on_a_model_without_softmax(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    r = cli("inspect", tmp_path / "m.onnx", "--why")
    assert r.returncode == 0 and "no softmax and no attention op" in r.stdout


FOLDED = {  # attention as 3-D batched products, heads folded into the batch
    "BloomModel": ("BloomConfig", dict(vocab_size=zoo.VOCAB, hidden_size=32, n_layer=2, n_head=4), True),  # ALiBi
    "DebertaV2Model": ("DebertaV2Config", dict(SMALL, intermediate_size=64, relative_attention=True,
                                               pos_att_type=["p2c", "c2p"], max_relative_positions=16), False),
}


@pytest.fixture(scope="session")
def folded(cache_dir):
    def get(cls: str, exporter: str):
        path = cache_dir / f"folded-{cls}-{exporter}.onnx"
        if not path.exists():
            cfg, kw, _ = FOLDED[cls]
            tmp = path.with_suffix(".tmp.onnx")
            zoo.export_module(zoo._Text(zoo._hf(cls, cfg, "eager", **kw)), zoo._ids_and_padded_mask(),
                              ("input_ids", "attention_mask"), exporter, tmp)
            os.replace(tmp, path)
        return path

    return get


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("cls", list(FOLDED))
def test_heads_in_batch_families(folded, tmp_path, cls, exporter):
    """BLOOM's ALiBi and DeBERTa's disentangled terms are added to 3-D [B*H, T, T] scores:
    found with their heads and causality, the terms kept, fuse exact on every input set,
    the forms composing on the same site."""
    src = folded(cls, exporter)
    sites = attn_opt.inspect(str(src)).sites
    assert [(s.kind, s.heads, s.causal, len(s.folded_terms)) for s in sites] == \
        [("self", 4, FOLDED[cls][2], 1)] * 2
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "fuse", "-o", tmp_path / "f.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert len(p["sites_rewritten"]) == 2 and p["step_fidelity_all"]["max_rel_error"] <= 1e-4
    r = cli(src, "--pass", "sinkfree:mode=logit,bias=-inf", "--pass", "sparse:window=4", "--pass", "gated",
            "-o", tmp_path / "s.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    passes = json.loads(rep.read_text())["passes"]
    assert [len(p["sites_rewritten"]) for p in passes] == [2, 2, 2]
    assert passes[0]["step_fidelity_all"]["max_rel_error"] <= 1e-4 and passes[2]["step_fidelity_all"]["max_rel_error"] <= 1e-4


@pytest.mark.parametrize("spec", ["fuse", "sparse:window=4", "softplus", "gated"])
@pytest.mark.parametrize("cls", list(FOLDED))
def test_heads_in_batch_on_torch(folded, cls, spec):
    """On torch.fx (BLOOM's baddbmm scores included) every pass takes the 3-D layout and
    computes what the ONNX lowering computes on the dynamo export of the same weights."""
    import attn_opt
    from attn_opt.pipeline.run import parse_chain

    cfg, kw, _ = FOLDED[cls]
    model = zoo._Text(zoo._hf(cls, cfg, "eager", **kw))
    args = zoo._ids_and_padded_mask()
    _, fx_report = attn_opt.optimize(model, [spec], example_inputs=args, force=True)
    feeds = {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()}
    _, onnx_report = attn_opt.optimize(onnx.load(str(folded(cls, "dynamo"))), parse_chain([spec]), feeds=feeds, force=True)
    f, o = fx_report.passes[0], onnx_report.passes[0]
    assert f.sites_rewritten == o.sites_rewritten == ["a0", "a1"]
    assert f.fidelity["max_rel_error"] == pytest.approx(o.fidelity["max_rel_error"], abs=1e-4)
    if spec in ("fuse", "gated"):
        assert f.step_fidelity_all["max_rel_error"] <= 1e-4


@pytest.mark.parametrize("spec", ["fuse", "fuse:target=onnx", "sinkfree:mode=logit,bias=-inf", "mlpfree:collapse=qk+vo"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_double_mask_stays_exact(family, tmp_path, exporter, spec):
    """GPT-Neo: a fully padded row spreads its weight over its causal prefix only (keys
    hidden by both masks are -inf); every exact pass keeps that on the padded inputs."""
    rep = tmp_path / "r.json"
    r = cli(family("GPTNeoModel", exporter), "--pass", spec, "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert len(p["sites_rewritten"]) == 2, p["sites_skipped"]
    assert "padded" in json.loads(rep.read_text())["inputs"]["variants"]
    assert p["step_fidelity_all"]["max_rel_error"] <= 1e-4


def test_collapse_through_a_cache_concat(family, tmp_path):
    """OPT through TorchScript: K reaches the scores through the cache's one-input Concat;
    the collapse sees through it (and through Q's pre-scaling)."""
    rep = tmp_path / "r.json"
    r = cli(family("OPTModel", "torchscript"), "--pass", "mlpfree:collapse=qk+vo", "-o", tmp_path / "o.onnx",
            "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert len(p["sites_rewritten"]) == 2 and p["step_fidelity_all"]["max_rel_error"] <= 1e-4


class Luong(torch.nn.Module):
    """Seq2seq attention as 3-D batched products: a GRU encoder's states as keys and values,
    a projected decoder input as queries (one head, nothing folds heads into the batch)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec, self.out = torch.nn.GRU(8, 16, batch_first=True), torch.nn.Linear(8, 16), torch.nn.Linear(32, 5)

    def forward(self, src, tgt):
        e, _ = self.enc(src)
        d = self.dec(tgt)
        c = torch.bmm(torch.softmax(torch.bmm(d, e.transpose(1, 2)), -1), e)
        return self.out(torch.cat([c, d], -1))


class Pooling(torch.nn.Module):
    """An nn.MultiheadAttention pooling head: a learned query reads the sequence."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.mha, self.proj = torch.nn.MultiheadAttention(16, 4, batch_first=True), torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.proj(x)
        return self.mha(self.q.expand(x.shape[0], -1, -1), h, h, need_weights=False)[0]


CROSS_3D = {  # name: (module, inputs, names, exporter, heads)
    "luong": (Luong, lambda: (torch.randn(2, 7, 8), torch.randn(2, 5, 8)), ("src", "tgt"), "torchscript", 1),
    "mha-pooling": (Pooling, lambda: (torch.randn(2, 7, 8),), ("x",), "dynamo", 4),
}


@pytest.mark.parametrize("name", list(CROSS_3D))
def test_cross_attention_in_3d_products(cache_dir, tmp_path, name):
    """K and V from another hidden state than Q (a GRU's states, a learned query) is
    cross-attention with its heads; the exact pass is exact and the forms rewrite it."""
    cls, make, names, exporter, heads = CROSS_3D[name]
    path = cache_dir / f"cross3d-{name}-{exporter}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        zoo.export_module(cls().eval(), make(), names, exporter, path.with_suffix(".tmp.onnx"))
        os.replace(path.with_suffix(".tmp.onnx"), path)
    sites = attn_opt.inspect(str(path)).sites
    assert [(s.kind, s.heads) for s in sites] == [("cross", heads)]
    for spec, exact in (("fuse", True), ("softplus", False), ("sparse:window=4", None)):
        _, report = attn_opt.optimize(str(path), [spec], force=True)
        p = report.passes[0]
        if exact is None:  # a window needs queries and keys on one axis
            assert not p.sites_rewritten and "self-attention" in p.sites_skipped[0].reason
            continue
        assert p.sites_rewritten == ["a0"], p.sites_skipped
        assert not exact or p.step_fidelity_all["max_rel_error"] <= 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_latent_attention_is_self_attention(family, tmp_path, exporter):
    """MLA (DeepSeek-V3): Q and K reach the hidden states through low-rank factors and norms,
    so its sites are self-attention (sparse windows them, saying nothing of cross); K's head
    size (nope + rope) differs from V's, so fuse:target=ort gives Attention, saying why."""
    src = family("DeepseekV3Model", exporter)
    sites = attn_opt.inspect(str(src)).sites
    assert [(s.kind, s.heads, s.head_dim) for s in sites] == [("self", 4, 12)] * 2
    assert all("compressed view of its hidden states" in " ".join(s.notes) for s in sites)
    rep = tmp_path / "r.json"
    r = cli(src, "--pass", "fuse:target=ort", "-o", tmp_path / "o.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["sites_rewritten"] == ["a0", "a1"] and p["step_fidelity_all"]["max_rel_error"] <= 1e-4
    assert all("one head size for K and V (here 12 and 8" in n for n in p["notes"])


@pytest.fixture(scope="session")
def segformer(cache_dir):
    path = cache_dir / "family-SegformerModel-torchscript.onnx"
    if not path.exists():
        model = zoo._hf("SegformerModel", "SegformerConfig", "eager", num_encoder_blocks=2, depths=[1, 1],
                        sr_ratios=[4, 2], hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                        strides=[4, 2], mlp_ratios=[2, 2], image_size=32, num_channels=3)
        tmp = path.with_suffix(".tmp.onnx")
        zoo.export_module(zoo._Pixels(model), (torch.randn(1, 3, 32, 32),), ("pixel_values",), "torchscript", tmp)
        os.replace(tmp, path)
    return path


def test_spatial_reduction_is_self_attention_with_reduced_keys(segformer, tmp_path):
    """SegFormer's K/V come from a strided convolution of the queries' own hidden states:
    self-attention, whose keys are a reduced view; fuse and gated rewrite it exactly, a
    window is refused with that reason (it would not mean nearby tokens)."""
    sites = attn_opt.inspect(str(segformer)).sites
    assert [(s.kind, s.heads, s.run_shape[2:4]) for s in sites] == [("self", 1, (64, 4)), ("self", 2, (16, 4))]
    for spec in ("fuse", "gated"):
        rep = tmp_path / f"{spec}.json"
        r = cli(segformer, "--pass", spec, "-o", tmp_path / f"{spec}.onnx", "--report", rep)
        assert r.returncode == 0, r.stderr
        p = json.loads(rep.read_text())["passes"][0]
        assert p["sites_rewritten"] == ["a0", "a1"] and p["step_fidelity"]["max_rel_error"] <= 1e-4
    rep = tmp_path / "s.json"
    r = cli(segformer, "--pass", "sparse:window=4", "-o", tmp_path / "s.onnx", "--report", rep)
    p = json.loads(rep.read_text())["passes"][0]
    assert r.returncode == 0 and not p["sites_rewritten"]
    assert all("reduced view of its" in s["reason"] for s in p["sites_skipped"])
