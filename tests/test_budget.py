"""--budget and --plan on small random-weight models: the grammar, the knapsack, a toy
where one layer clearly matters (the plan beats every uniform form at its cost), the plan
file re-applied byte for byte, edited plans and unreachable budgets refused in one line
with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attn_opt
from attn_opt.core.errors import NotSupported, UserError
from attn_opt.pipeline import budget as B
from attn_opt.pipeline import budget_measure as bm
from test_pipeline import cli, digest

SEQ, ROWS = 32, 8


@pytest.fixture(scope="session")
def toy(cache_dir):
    """A 2-layer BERT (4 heads, 32 tokens) whose layer 0 barely reaches the output (its
    attention output projection scaled by 1e-3) and whose layer 1 carries it: windowing
    layer 0 is nearly free, windowing layer 1 is not."""
    from transformers import BertConfig, BertModel

    from attn_opt.tools import zoo

    path = cache_dir / "budget-toy.onnx"
    if not path.exists():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=zoo.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
        bert = BertModel(cfg).eval()
        with torch.no_grad():
            bert.encoder.layer[0].attention.output.dense.weight.mul_(1e-3)
            bert.encoder.layer[0].attention.output.dense.bias.zero_()
            bert.encoder.layer[1].attention.self.query.weight.mul_(4.0)  # sharp, far-reaching attention
        ids = torch.ones(2, SEQ, dtype=torch.int64)
        tmp = path.with_suffix(".tmp.onnx")
        zoo.export_module(zoo._Text(bert), (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), "dynamo", tmp)
        tmp.replace(path)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 99, (ROWS, SEQ)).astype(np.int64),
             "attention_mask": np.ones((ROWS, SEQ), np.int64)}
    return path, feeds


@pytest.fixture(scope="session")
def searched(toy):
    path, feeds = toy
    return attn_opt.optimize(str(path), budget="attention=0.75", candidates="sparse:window=4|8", feeds=feeds,
                             objective="cosine", force=True)


# -- grammar and solver (no model) --------------------------------------------------------
def test_parse_budget():
    assert B.parse_budget("attention=0.5") == B.Budget("attention", 0.5)
    assert B.parse_budget("flops=0.8").kind == "flops"
    assert B.parse_budget("cache=0.25") == B.Budget("cache", 0.25)
    for bad in ("attention", "attention=0", "attention=1.5", "speed=0.5", "attention=abc", "attention=nan"):
        with pytest.raises(UserError, match="bad --budget"):
            B.parse_budget(bad)


def test_expand_candidates():
    got = B.expand_candidates("sparse:window=8|16,sinks=auto|0;softplus")
    assert got == ["sparse:window=8,sinks=auto", "sparse:window=8,sinks=0", "sparse:window=16,sinks=auto",
                   "sparse:window=16,sinks=0", "softplus"]
    with pytest.raises(UserError, match="unknown pass"):
        B.expand_candidates("sparse:window=8;nosuch")
    with pytest.raises(UserError, match="produces a fused"):
        B.expand_candidates("fuse")
    with pytest.raises(UserError, match="--candidates 'sparse:window=0': sparse: window, stride and dilation must be >= 1"):
        B.expand_candidates("sparse:window=0|8")


def test_pareto_solves_the_knapsack():
    """Against brute force on a small instance: for every limit, the DP's best assignment
    under it has the least loss of all assignments under it."""
    import itertools

    rng = np.random.default_rng(1)
    costs = [list(rng.uniform(0, 1, 4)) for _ in range(4)]
    losses = [list(rng.uniform(0, 1, 4)) for _ in range(4)]
    points = B.pareto(costs, losses, resolution=1e-9)
    for limit in (1.0, 1.5, 2.0, 3.0):
        brute = min((sum(losses[i][j] for i, j in enumerate(p)) for p in itertools.product(range(4), repeat=4)
                     if sum(costs[i][j] for i, j in enumerate(p)) <= limit), default=None)
        under = [p.loss for p in points if p.cost <= limit]
        assert (min(under) if under else None) == pytest.approx(brute)


def test_cache_budget_needs_a_decoder_step(toy):
    path, feeds = toy
    with pytest.raises(UserError, match="needs a decoder step"):
        attn_opt.optimize(str(path), budget="cache=0.25", feeds=feeds)


# -- the search on the toy --------------------------------------------------------------
def test_budget_met_and_sensitive_layer_kept(searched):
    model, report = searched
    plan, p = report.plan, report.passes[-1]
    assert p.attention_flops_after <= 0.75 * p.attention_flops_before  # the counter's figure, not the plan's
    assert plan["cost"] <= 0.75 + 1e-9
    assert plan["cost"] == pytest.approx(p.attention_flops_after / p.attention_flops_before, abs=1e-6)
    layer = {e["layer"]: e["spec"] for e in plan["sites"].values()}
    assert layer[0] != "dense" and layer[1] == "dense", plan["sites"]  # the insensitive layer pays
    assert plan["measured_loss"] is not None and plan["heldout_loss"] is not None


def test_plan_beats_uniform_forms_at_its_cost(toy, searched):
    path, feeds = toy
    _, report = searched
    plan = report.plan
    ref = attn_opt.optimize(str(path), ["sparse:window=8"], feeds=feeds, force=True)[1].passes[0]  # ≈ 0.6 here
    assert ref.attention_flops_after / ref.attention_flops_before <= 0.75
    plan_cos = report.passes[-1].fidelity["cosine"]
    for spec in ("sparse:window=4", "sparse:window=8"):
        rep = attn_opt.optimize(str(path), [spec], feeds=feeds, force=True)[1].passes[0]
        if rep.attention_flops_after / rep.attention_flops_before <= plan["cost"] + 1e-9:
            assert plan_cos >= rep.fidelity["cosine"], (spec, plan_cos, rep.fidelity["cosine"])


def test_sensitivity_from_the_cone_matches_a_real_rewrite(toy):
    """The per-site loss measured from the downstream cone equals the loss of the model with
    that one site really rewritten (the lowering vs the NumPy reference)."""
    from attn_opt.api import steps_for
    from attn_opt.core.ir import load

    path, feeds = toy
    steps = steps_for("onnx")
    state = steps.observe(load(str(path)).native, feeds)
    site = state.det.sites[1]
    cones = bm.Cones(state.model, [site])
    env = state.model.run(feeds, cones.needed([site]))
    assert bm.check_layout(site, env) is None
    form = attn_opt.passes.parse("sparse:window=4").form(site)
    outs = bm.run_cone(cones.session(site.id, env), site, env, bm.form_probabilities(site, env, form), state.outputs)
    real = attn_opt.optimize(str(path), ["sparse:window=4"], feeds=feeds, sites={site.id}, force=True)[0]
    want = real.run(feeds)
    for k in want:
        np.testing.assert_allclose(outs[k], want[k], rtol=1e-3, atol=1e-4)


# -- the plan file ------------------------------------------------------------------------
def test_plan_round_trip_is_byte_for_byte(toy, tmp_path):
    path, feeds = toy
    np.savez(tmp_path / "in.npz", **feeds)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    r = cli(path, "--budget", "attention=0.75", "--candidates", "sparse:window=4|8", "--inputs", tmp_path / "in.npz",
            "--objective", "cosine", "--force", "-o", a)
    assert r.returncode == 0, r.stderr
    plan = tmp_path / "a.plan.json"
    assert plan.exists() and (tmp_path / "a.pareto.png").stat().st_size > 0
    assert "plan for --budget attention=0.75" in r.stdout
    r = cli(path, "--plan", plan, "--inputs", tmp_path / "in.npz", "--force", "-o", b)
    assert r.returncode == 0, r.stderr
    assert digest(a) == digest(b)
    specs = {k: v["spec"] for k, v in json.loads(plan.read_text())["sites"].items()}
    assert any(s != "dense" for s in specs.values())


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(a9={"spec": "dense"}), "no site 'a9'"),
    (lambda s: s.update(a0={"spec": "sparse:window=4,nosuch=1"}), "plan: site a0: sparse: unknown option 'nosuch'"),
    (lambda s: s.update(a0={"spec": "warp:speed=9"}), "plan: site a0: unknown pass 'warp'"),
    (lambda s: s.update(a0={"spec": "fuse"}), "plan: site a0: fuse produces a fused"),
])
def test_edited_plan_refused_in_one_line(toy, tmp_path, edit, message):
    path, feeds = toy
    np.savez(tmp_path / "in.npz", **feeds)
    sites = {"a0": {"spec": "sparse:window=4"}, "a1": {"spec": "dense"}}
    edit(sites)
    (tmp_path / "p.json").write_text(json.dumps({"sites": sites}))
    out = tmp_path / "out.onnx"
    r = cli(path, "--plan", tmp_path / "p.json", "--inputs", tmp_path / "in.npz", "-o", out)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_unreachable_budget_refused_nothing_written(toy, tmp_path):
    path, feeds = toy
    np.savez(tmp_path / "in.npz", **feeds)
    out = tmp_path / "out.onnx"
    r = cli(path, "--budget", "attention=0.05", "--candidates", "sparse:window=8", "--inputs", tmp_path / "in.npz",
            "-o", out)
    assert r.returncode != 0, r.stdout
    assert "cannot be met: the cheapest the candidates reach is attention=" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_flags_that_cannot_go_together(toy, tmp_path):
    path, feeds = toy
    for args, message in ((["--budget", "attention=0.5", "--pass", "fuse"], "give no --pass"),
                          (["--budget", "attention=0.5", "--plan", "x.json"], "not both"),
                          (["--candidates", "softplus", "--pass", "fuse"], "give --budget too"),
                          (["--budget", "attention=0.5", "--check", "sites"], "with --check=sites (a model larger")):
        r = cli(path, *args, "-o", tmp_path / "o.onnx")
        assert r.returncode != 0 and message in r.stderr, r.stderr


# -- torch.fx ---------------------------------------------------------------------------------
def test_plan_on_torch_fx_and_budget_refused_there():
    """A plan applies on torch.fx the same way (the site named gets its form, the other none);
    the search itself is ONNX-only and says so in one line."""
    from attn_opt.passes.plan import PlanPass
    from attn_opt.tools import zoo

    model, args, _ = zoo.MODELS["bert-eager"].build()
    gm, report = attn_opt.optimize(model, example_inputs=args, plan={"a0": "sparse:window=2", "a1": "dense"},
                                   force=True)
    p = report.passes[0]
    assert p.name == "plan" and p.sites_rewritten == ["a0"]
    assert [s.reason for s in p.sites_skipped] == ["dense in the plan"]
    assert p.attention_flops_after != p.attention_flops_before or p.fidelity["max_rel_error"] > 0
    with pytest.raises(NotSupported, match="--budget searches ONNX models only"):
        attn_opt.optimize(model, example_inputs=args, budget="attention=0.5")
    fn = torch.compile(model, backend=attn_opt.backend(passes=[PlanPass.of({"a0": "sparse:window=2"})], check="none",
                                                    inner="eager"))
    with torch.no_grad():
        out = fn(*args)
    assert torch.isfinite(out).all()
