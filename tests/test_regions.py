"""Attention inside ONNX local functions and If/Loop/Scan subgraphs (issue 21, item 3):
found with its region's path, read on values probed inside, rewritten in place or skipped
with a reason; exact passes exact on every input set; FLOPs, selection, --why, the diff."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import attn_opt
from attn_opt.core.ir import onnx_flops
from attn_opt.core.ir.onnx_regions import Regions
from attn_opt.pipeline.run import parse_chain
from onnx_attention import (control_flow_model, merged_decoder_model, nested_model, scaled_function_model,
                            twin_branches_model)

REGION_SITES = ["pad_if/then/a0", "pad_if/else/a0", "loop/body/a0", "scan/body/a0", "function:Attn/a0"]
FUSED = {"Attention", "MultiHeadAttention"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn_opt", *map(str, args)], capture_output=True, text=True)


def cf_feeds(padded: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = {n: rng.standard_normal((2, 4, 12, 8)).astype(np.float32) for n in "qkv"}
    f["attention_mask"] = np.ones((2, 12), np.int64)
    if padded:  # no_pad is False: the else branch runs
        f["attention_mask"][1, 8:] = 0
    return f


def ops_by_region(proto: onnx.ModelProto) -> dict[str, Counter]:
    out = {f"function:{f.name}": Counter(n.op_type for n in f.node) for f in proto.functions}
    for n in proto.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out[f"{n.name}/{a.name.replace('_branch', '')}"] = Counter(x.op_type for x in a.g.node)
    return out


def run(proto, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# ---- structural: every site found where it is, read as at the top level -----------------------

def test_sites_in_every_region():
    det = attn_opt.inspect(control_flow_model())
    assert [s.id for s in det.sites] == REGION_SITES
    assert det.probe_error is None and det.near_misses == []
    by = {s.id: s for s in det.sites}
    for s in det.sites:
        assert (s.heads, s.kv_heads, s.head_dim, s.kind) == (4, 4, 8, "self"), s.to_json()
        assert s.scale == pytest.approx(8 ** -0.5)
        assert s.region == s.id.rsplit("/", 1)[0] and s.to_json()["region"] == s.region
        assert s.blocked is None
    assert by["pad_if/then/a0"].causal and by["pad_if/then/a0"].mask == "causal"  # read from the probed branch
    assert not by["pad_if/else/a0"].causal and by["pad_if/else/a0"].mask == "additive"
    assert "first iteration" in " ".join(by["loop/body/a0"].notes)
    assert "first slice" in " ".join(by["scan/body/a0"].notes)
    assert "all 2 calls of its function agree" in " ".join(by["function:Attn/a0"].notes)


def test_names_settled_unique_and_stable():
    """Sibling branches reuse names (ONNX allows it): a region's repeats are renamed, once."""
    model = ir.serde.deserialize_model(twin_branches_model())
    regions = Regions(model)
    names = [v.name for r in regions.all for n in r.body for v in n.outputs]
    assert len(names) == len(set(names))
    assert model.graph.node(0).name == "If_0"  # an unnamed If is named: its sites need a path
    before = ir.serde.serialize_model(model).SerializeToString()
    Regions(model)  # idempotent
    assert ir.serde.serialize_model(model).SerializeToString() == before
    det = attn_opt.inspect(twin_branches_model())
    assert [s.id for s in det.sites] == ["If_0/then/a0", "If_0/else/a0"]


def test_why_sees_softmax_in_a_branch(tmp_path):
    path = tmp_path / "cls.onnx"
    onnx.save(twin_branches_model(classifier=True), path)
    r = cli("inspect", path, "--why")
    assert r.returncode == 0, r.stderr
    assert "no softmax" not in r.stdout
    assert "not the key axis" in r.stdout and "If_0/else/cls" in r.stdout
    det = attn_opt.inspect(str(path))
    assert det.sites == [] and len(det.near_misses) == 2


def test_cli_lists_paths_and_rewrites(tmp_path):
    src, out = tmp_path / "cf.onnx", tmp_path / "out.onnx"
    onnx.save(control_flow_model(), src)
    r = cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    assert [s["id"] for s in json.loads(r.stdout)["sites"]] == REGION_SITES
    r = cli(src, "--pass", "fuse", "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert rep["sites_rewritten"] == REGION_SITES
    assert "padded" in json.loads((tmp_path / "r.json").read_text())["inputs"]["variants"]
    assert rep["fidelity_all"]["max_rel_error"] <= 1e-4
    r = cli(src, "--pass", "fuse", "--sites", "nope/a0", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pad_if/then/a0" in r.stderr


def test_regions_inside_regions():
    """A function called from an If branch inside a Loop body: probed through both."""
    src = nested_model()
    det = attn_opt.inspect(src)
    assert [s.id for s in det.sites] == ["loop/body/inner_if/else/a0", "function:Attn/a0"]
    assert all(s.heads == 4 and s.scale == pytest.approx(8 ** -0.5) for s in det.sites)
    assert not any("not run alone" in n for s in det.sites for n in s.notes)
    rng = np.random.default_rng(0)
    for flag in (True, False):
        f = {n: rng.standard_normal((2, 4, 12, 8)).astype(np.float32) for n in "qkv"} | {"flag": np.array(flag)}
        out, rep = attn_opt.optimize(src, parse_chain(["fuse"]), feeds=f)
        assert rep.passes[0].sites_rewritten == [s.id for s in det.sites]
        assert rep.passes[0].fidelity["max_rel_error"] <= 1e-4
        assert rep.passes[0].flops_after == 2 * 2 * (2 * 2 * 4 * 12 * 12 * 8)  # 2 iterations, one branch


def test_layer_of_a_region_is_its_holders():
    """A site inside a branch takes the layer of the If that holds it (the exporter's scope)."""
    src = control_flow_model()
    node = next(n for n in src.graph.node if n.name == "pad_if")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'model.layers.2', 'cond']")
    det = attn_opt.inspect(src)
    assert {s.id: s.layer for s in det.sites}["pad_if/then/a0"] == 2
    _, rep = attn_opt.optimize(src, parse_chain(["fuse"]), feeds=cf_feeds(), layers={2})
    assert rep.passes[0].sites_rewritten == ["pad_if/then/a0", "pad_if/else/a0"]


# ---- numeric: fuse exact on every input set, both branches ------------------------------------

def test_fuse_exact_everywhere():
    src = control_flow_model()
    out, rep = attn_opt.optimize(src, parse_chain(["fuse"]), feeds=cf_feeds())
    p = rep.passes[0]
    assert p.sites_rewritten == REGION_SITES and p.sites_skipped == []
    assert p.fidelity_all["max_rel_error"] <= 1e-4  # the padded set takes the else branch
    for region, ops in ops_by_region(out).items():
        assert sum(ops[o] for o in FUSED) == 1 and ops["Softmax"] == 0, (region, ops)
    for padded in (False, True):
        f = cf_feeds(padded, seed=3)
        a, b = run(src, f), run(out, f)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5)
    again = attn_opt.inspect(out)  # the fused ops are sites again, where they were
    assert [s.id for s in again.sites] == REGION_SITES
    assert {s.rule for s in again.sites} <= {"onnx-attention", "ms-mha"}
    assert len(out.functions) == 1 and out.functions[0].name == "Attn"  # the function kept, not inlined


def test_merged_decoder_both_branches():
    """Optimum's older decoder_model_merged.onnx: If(use_cache_branch) with a decoder step in
    each branch; the cached branch's K/V are Concat(past, new), returned as present."""
    src = merged_decoder_model()
    det = attn_opt.inspect(src)
    assert [s.id for s in det.sites] == ["optimum::if/then/a0", "optimum::if/else/a0"]
    assert all(s.causal and s.cache is None for s in det.sites)
    assert "Concat(past, new)" in " ".join(det.sites[0].notes)
    rng = np.random.default_rng(0)
    for cached in (True, False):
        p = 5 if cached else 0
        f = {"input_ids": rng.integers(0, 50, (2, 4)), "attention_mask": np.ones((2, p + 4), np.int64),
             "past_key_values.0.key": rng.standard_normal((2, 2, p, 8)).astype(np.float32),
             "past_key_values.0.value": rng.standard_normal((2, 2, p, 8)).astype(np.float32),
             "use_cache_branch": np.array([cached])}
        f["attention_mask"][1, :2] = 0
        out, rep = attn_opt.optimize(src, parse_chain(["fuse"]), feeds=f)
        assert rep.passes[0].sites_rewritten == [s.id for s in det.sites]
        assert rep.passes[0].fidelity_all["max_rel_error"] <= 1e-4
        a, b = run(src, f), run(out, f)
        assert set(a) == {"logits", "present.0.key", "present.0.value"}
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5)
    _, rep = attn_opt.optimize(src, parse_chain(["stream:sinks=2,window=4"]), feeds=f)
    assert rep.passes[0].sites_rewritten == []
    assert all("inside optimum::if" in s.reason for s in rep.passes[0].sites_skipped)


@pytest.mark.parametrize("spec", ["sparse:window=4", "softplus", "sigmoid", "sinkfree:mode=logit,bias=0",
                                  "sinkfree:mode=redistribute,alpha=0.5", "fuse:target=ort"])
def test_forms_rewrite_every_region(spec):
    out, rep = attn_opt.optimize(control_flow_model(), parse_chain([spec]), feeds=cf_feeds())
    p = rep.passes[0]
    assert p.sites_rewritten == REGION_SITES, p.sites_skipped
    assert np.isfinite(p.fidelity["max_rel_error"])
    assert [s.id for s in attn_opt.inspect(out).sites] == REGION_SITES  # each rewritten site is one site again


def test_forms_compose_in_regions():
    out, rep = attn_opt.optimize(control_flow_model(), parse_chain(["sparse:window=4", "softplus"]),
                                 feeds=cf_feeds())
    assert [p.sites_rewritten for p in rep.passes] == [REGION_SITES, REGION_SITES]
    sites = attn_opt.inspect(out).sites
    assert all(s.pattern is not None and s.normaliser.kind == "softplus" for s in sites)


def test_gated_and_mlpfree_in_torch_cond_branches(cond_onnx):
    """torch.cond through the dynamo exporter: a real If with a projected attention in each
    branch (weights are top-level initializers the branches read)."""
    det = attn_opt.inspect(cond_onnx)
    assert [s.id.split("/", 1)[1] for s in det.sites] == ["then/a0", "else/a0"]
    assert [s.causal for s in det.sites] == [True, False]
    for spec in ("fuse", "gated", "mlpfree:collapse=qk+vo"):
        x = np.random.default_rng(1).standard_normal((2, 6, 32)).astype(np.float32)
        out, rep = attn_opt.optimize(str(cond_onnx), parse_chain([spec]), feeds={"x": x})
        p = rep.passes[0]
        assert len(p.sites_rewritten) == 2, (spec, p.sites_skipped)
        assert p.fidelity["max_rel_error"] <= 1e-4, spec  # all three are exact
    assert p.params_after > p.params_before  # the collapsed weights count: top-level initializers


# ---- negative: what must not be rewritten, and why --------------------------------------------

@pytest.mark.parametrize("ref_attr", [False, True])
def test_function_calls_that_differ_are_not_rewritten(ref_attr):
    src = scaled_function_model((0.35, 0.7), ref_attr=ref_attr)
    det = attn_opt.inspect(src)
    assert [s.id for s in det.sites] == ["function:Scaled/a0"]
    assert "calls differ" in det.sites[0].blocked and "scale 0.35 vs 0.7" in det.sites[0].blocked
    out, rep = attn_opt.optimize(src, parse_chain(["fuse"]), feeds={n: np.ones((2, 4, 12, 8), np.float32)
                                                                     for n in "qkv"})
    assert rep.passes[0].sites_rewritten == [] and "calls differ" in rep.passes[0].sites_skipped[0].reason
    assert not any(n.op_type == "Attention" for n in out.functions[0].node)


def test_function_calls_that_agree_are_rewritten_once():
    src = scaled_function_model((0.35, 0.35), ref_attr=True)  # the scale an attribute reference
    feeds = {n: np.ones((2, 4, 12, 8), np.float32) for n in "qkv"}
    out, rep = attn_opt.optimize(src, parse_chain(["fuse:target=onnx"]), feeds=feeds)
    assert rep.passes[0].sites_rewritten == ["function:Scaled/a0"]
    assert [n.op_type for n in out.functions[0].node] == ["Attention"]
    assert out.functions[0].opset_import[0].version == 23  # the body converted with the model


def test_calibration_skips_function_sites(tmp_path):
    src = control_flow_model()
    out, rep = attn_opt.optimize(src, parse_chain(["softplus"]), feeds=cf_feeds(), calibrate=cf_feeds(seed=5))
    p = rep.passes[0]
    assert p.sites_rewritten == REGION_SITES[:4]
    assert [s.id for s in p.sites_skipped] == ["function:Attn/a0"]
    assert "function body has none" in p.sites_skipped[0].reason
    assert {f.site for f in p.calibration.sites} == set(REGION_SITES[:4])


# ---- selection, FLOPs, checks, the diff ---------------------------------------------------------

def test_selection_by_site_and_region():
    _, rep = attn_opt.optimize(control_flow_model(), parse_chain(["fuse"]), feeds=cf_feeds(),
                               sites={"pad_if", "function:Attn/a0"})
    p = rep.passes[0]
    assert p.sites_rewritten == ["pad_if/then/a0", "pad_if/else/a0", "function:Attn/a0"]
    assert {s.id: s.reason for s in p.sites_skipped} == {"loop/body/a0": "not in --sites",
                                                                "scan/body/a0": "not in --sites"}


def test_flops_count_every_region():
    # one attention: Q·Kᵀ and P·V, 2·B·H·T·T·D each; the function is called twice, the If
    # runs one branch, the Loop two iterations, the Scan two slices: 7 attentions
    one = 2 * (2 * 2 * 4 * 12 * 12 * 8)
    f = onnx_flops.count(control_flow_model(), cf_feeds())
    assert f.matmul == 7 * one
    notes = " ".join(f.notes)
    assert "then branch counted" in notes and "x 2 (the trip count" in notes and "x 2 (the scanned length" in notes
    assert onnx_flops.count(control_flow_model(), cf_feeds(padded=True)).matmul == 7 * one  # else: the same cost
    det = attn_opt.inspect(control_flow_model())
    att = onnx_flops.count(control_flow_model(), cf_feeds(), {n for s in det.sites for n in s.nodes})
    assert att.attention_matmul == 7 * one


def test_flops_unknown_branch_and_trips():
    proto = control_flow_model()
    flops = onnx_flops.count_shapes(proto, onnx_flops.shapes(proto, cf_feeds()), values={})
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    assert "costlier" in " ".join(flops.notes)
    proto.graph.node.remove(next(n for n in proto.graph.node if n.name == "trips"))
    loop.input[0] = ""  # no trip count: the body counted once, and said
    flops = onnx_flops.count_shapes(proto, onnx_flops.shapes(proto, cf_feeds()), values={})
    assert "counted once (per iteration" in " ".join(flops.notes)


@pytest.mark.parametrize("check", ["sites", "none"])
def test_segmented_checks_run_regions(tmp_path, check):
    src = tmp_path / "cf.onnx"
    onnx.save(control_flow_model(), src)
    r = cli(src, "--pass", "fuse", "--check", check, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert p["sites_rewritten"] == REGION_SITES
    if check == "sites":
        assert any("did not compare" in n for n in p["notes"])


def test_diff_names_region_sites(tmp_path):
    src, out = tmp_path / "cf.onnx", tmp_path / "out.onnx"
    onnx.save(control_flow_model(), src)
    assert cli(src, "--pass", "fuse", "-o", out).returncode == 0
    r = cli("diff", src, out, "--text", "-o", tmp_path / "d.html")
    assert r.returncode == 0, r.stderr
    for sid in REGION_SITES:
        assert sid in r.stdout
    assert "(in pad_if/then)" in (tmp_path / "d.html").read_text()


# ---- a model exported by torch with a real If ----------------------------------------------------

@pytest.fixture(scope="session")
def cond_onnx(cache_dir):
    path = cache_dir / "torch-cond-attention.onnx"
    if not path.exists():
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

            def attend(self, x, causal: bool):
                b, t, _ = x.shape
                q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
                s = q @ k.transpose(-1, -2) / 8 ** 0.5
                if causal:
                    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
                return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32))

            def forward(self, x):
                return torch.cond(x.sum() > 0, lambda x: self.attend(x, True), lambda x: self.attend(x, False), (x,))

        torch.manual_seed(0)
        program = torch.onnx.export(Block().eval(), (torch.randn(2, 6, 32),), dynamo=True, opset_version=18)
        tmp = path.with_suffix(".tmp.onnx")
        program.save(str(tmp))
        tmp.replace(path)
    if not any(n.op_type == "If" for n in onnx.load(str(path), load_external_data=False).graph.node):
        pytest.skip("this torch exporter inlined torch.cond: no If to test")
    return path
