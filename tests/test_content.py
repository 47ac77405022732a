"""Content-based sparse attention (sparse:topk=K): the NumPy reference's selection and
attention (patterns/reference.py: selected_visible) against the ONNX lowering
(backends/onnx/choose.py, gathered.py) and torch (backends/torch/forms.py) on hand-built
models with padded rows, full biases, boolean masks, causal and GQA; K = all blocks exact
on the shared variant table (both IRs); ties; the work it skips; bad values refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_opt
from attn_opt import passes
from attn_opt.backends.torch import forms, gathered
from attn_opt.core.errors import NotSupported, UserError
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.core.ir import onnx_flops
from attn_opt.patterns import reference as R
from attn_opt.patterns.form import Pattern, Selection
from onnx_attention import attention_model, feeds, reference
from rewrite import apply_pass
from variants import VARIANTS

CASES = [  # (spec, model kwargs): one or more blocks dropped in every case
    ("sparse:topk=2,block=8", dict()),
    ("sparse:topk=1,block=8", dict(mask="full")),
    ("sparse:topk=1,block=4", dict(mask="bool")),
    ("sparse:topk=1,block=8,causal=true", dict(causal=True)),
    ("sparse:topk=1,block=8,window=8,sinks=2", dict(causal=True)),
    ("sparse:topk=1,block=6,window=6,sinks=3", dict()),
    ("sparse:topk=2,block=8", dict(kvh=2, mask="full")),  # GQA: one selection per KV group
    ("sparse:topk=1,block=8,window=4", dict(kvh=1, causal=True)),  # MQA
    ("sparse:topk=2,block=5", dict(t=23)),  # a ragged last block
    ("sparse:topk=2,block=4,levels=2", dict()),  # HiP's coarse-to-fine search
    ("sparse:topk=1,block=4,levels=3,window=4,sinks=1", dict(causal=True)),
    ("sparse:topk=2,block=3,levels=2", dict(kvh=2, mask="full", t=23)),
]


def _pattern(spec: str, causal: bool) -> Pattern:
    return passes.parse(spec).pattern(type("S", (), {"causal": causal, "run_shape": None})())


def _seen(f: dict, causal: bool) -> np.ndarray | None:
    """The pairs the hand-built model's masks keep (its causal mask is an additive term)."""
    m, t = f.get("mask"), f["q"].shape[2]
    seen = None if m is None else m if m.dtype == bool else m > np.finfo(np.float32).min
    if causal:
        seen = np.tril(np.ones((t, t), bool)) & (True if seen is None else seen)
    return seen


def _want(f: dict, pattern: Pattern, causal: bool) -> np.ndarray:
    vis = R.selected_visible(pattern, f["q"], f["k"], f["q"].shape[-1] ** -0.5, _seen(f, causal))
    return reference(f, vis, causal=causal)


def _torch(f: dict, pattern: Pattern, causal: bool) -> np.ndarray:
    q, k, v = (torch.from_numpy(f[x]) for x in "qkv")
    m = f.get("mask")
    additive = [torch.from_numpy(m)] if m is not None and m.dtype != bool else []
    boolean = torch.from_numpy(m) if m is not None and m.dtype == bool else None
    if causal:  # the hand-built model's causal mask is an additive term
        t = q.shape[2]
        additive.append(torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1))
    out = forms.attention(q, k, v, additive, boolean, scale=q.shape[-1] ** -0.5, causal=causal, pattern=pattern,
                          use_triton=False)
    return out.numpy()


@pytest.mark.parametrize("spec,kw", CASES, ids=[c[0] + str(c[1]) for c in CASES])
def test_onnx_and_torch_match_the_reference(spec, kw):
    causal = kw.get("causal", False)
    f = feeds(mask=kw.get("mask", "padding"), **{k: kw[k] for k in ("t", "kvh") if k in kw})
    pattern = _pattern(spec, causal)
    vis = R.selected_visible(pattern, f["q"], f["k"], f["q"].shape[-1] ** -0.5, _seen(f, causal))
    assert not vis.all(), "the case must drop some blocks"
    want = _want(f, pattern, causal)
    new, rewritten, skipped, _ = apply_pass(attention_model(**kw), passes.parse(spec))
    assert rewritten == ["a0"], skipped
    got = onnx_adapter.run(new, f)["o"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_torch(f, pattern, causal), want, rtol=1e-5, atol=1e-5)


def test_the_selection_keeps_forced_blocks_and_the_best_scores():
    """By hand: sinks' and band blocks first, then the highest block score; causal never
    reaches a later block."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 1, 32, 4)), rng.standard_normal((1, 1, 32, 4))
    k[:, :, 20:24] += 5 * q[:, :, 28:32].mean(2, keepdims=True)  # block 5 scores high for block 7
    p = Pattern("topk", False, 0, 4, sinks=1, selection=Selection("topk", 1))
    idx = R.selected_blocks(p, q, k, 0.5)
    assert idx.shape == (1, 1, 8, 2) and (idx[..., 0] == 0).all()  # the sink block first
    assert idx[0, 0, 7, 1] == 5
    causal = Pattern("topk", True, 1, 4, selection=Selection("topk", 2))  # the band: the diagonal block
    idx = R.selected_blocks(causal, q, k, 0.5)
    a = np.arange(8)[:, None]
    assert (idx[0, 0, :, 0] == np.arange(8)).all()  # forced, so first
    vis = R.selected_visible(causal, q, k, 0.5)
    assert not np.triu(vis[0, 0], 1).any()
    assert ((idx[0, 0] <= a) | (a < 2)).all()  # a later block only where fewer earlier ones exist


@pytest.mark.parametrize("mask", ["padding", "full", "bool"])
def test_a_block_the_masks_hide_ranks_last(mask):
    """Keys past the last row's padding made to score highest: the selection keeps visible
    blocks instead (reference, ONNX and torch alike), where ranking without the masks
    would spend its blocks on keys nobody sees."""
    f = feeds(t=32, mask=mask, pad=16)  # the last row: blocks 2 and 3 hidden
    u = np.eye(8, dtype=np.float32)[0]
    f["q"][-1] += 3 * u
    f["k"][-1, :, 16:] += 3 * u
    spec = "sparse:topk=1,block=8"
    pattern = _pattern(spec, False)
    idx = R.selected_blocks(pattern, f["q"], f["k"], 8 ** -0.5, _seen(f, False))[..., :1]
    blind = R.selected_blocks(pattern, f["q"], f["k"], 8 ** -0.5)[..., :1]
    assert (blind[-1] >= 2).all() and (idx[-1] < 2).all()
    want = _want(f, pattern, False)
    assert np.isfinite(want).all()
    new, rewritten, skipped, _ = apply_pass(attention_model(t=32, mask=mask), passes.parse(spec))
    assert rewritten == ["a0"], skipped
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_torch(f, pattern, False), want, rtol=1e-5, atol=1e-5)


def test_seen_blocks_per_query_and_per_kv_group():
    """A per-query, per-head mask: a key block counts as seen by a query block where any
    of its pairs, and any head of the KV group, is kept."""
    seen = np.zeros((1, 4, 8, 8), bool)
    seen[0, 1, 5, 2] = True  # head 1 (group 0), query 5 (block 1), key 2 (block 0)
    seen[0, 2, 0, 7] = True  # head 2 (group 1), query 0 (block 0), key 7 (block 1)
    got = R.seen_blocks(seen, 4, 2)
    want = np.zeros((1, 2, 2, 2), bool)
    want[0, 0, 1, 0] = want[0, 1, 0, 1] = True
    assert (got == want).all()
    got_t = gathered.seen_blocks(torch.from_numpy(seen), 4, 2)
    assert (got_t.numpy() == want).all()
    assert R.seen_blocks(np.ones((2, 1, 1, 9), bool), 4, 2).shape == (2, 1, 1, 3)  # per key: one row of blocks


def test_levels_search_coarse_groups_first():
    """levels=2: the topk best pairs of blocks first, then the topk best blocks inside
    them. Keeping every group it is the flat ranking; here a block whose pair scores low
    is passed over though it alone scores best."""
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((1, 1, 32, 4)).astype(np.float32), rng.standard_normal((1, 1, 32, 4)).astype(np.float32)
    flat = Pattern("topk", False, 0, 4, selection=Selection("topk", 1))
    coarse = Pattern("topk", False, 0, 4, selection=Selection("topk", 1, levels=2))
    wide = Pattern("topk", False, 0, 4, selection=Selection("topk", 4, levels=2))  # every pair of blocks kept
    assert (R.selected_blocks(wide, q, k, 0.5) == R.selected_blocks(
        Pattern("topk", False, 0, 4, selection=Selection("topk", 4)), q, k, 0.5)).all()
    u = np.eye(4, dtype=np.float32)[0]
    q[0, 0, 28:] = u  # the last query block looks along u
    k[0, 0, 8:12] = 3 * u  # block 2 scores best alone, its partner block 3 very low
    k[0, 0, 12:16] = -6 * u
    k[0, 0, 20:28] = 2 * u  # blocks 5 and 6: good together
    assert R.selected_blocks(flat, q, k, 0.5)[0, 0, 7, 0] == 2
    assert R.selected_blocks(coarse, q, k, 0.5)[0, 0, 7, 0] in (5, 6)
    got = gathered.choose_blocks(coarse, torch.from_numpy(q), torch.from_numpy(k), 0.5)
    assert (got.numpy() == R.selected_blocks(coarse, q, k, 0.5)).all()


def test_ties_go_to_the_lowest_block_in_every_backend():
    """Keys all equal: every block scores the same, so each query block keeps the lowest
    indices, in the reference, ONNX (TopK) and torch (a stable sort)."""
    f = feeds(mask=None)
    f["k"][:] = 0.25
    pattern = _pattern("sparse:topk=2,block=8", False)
    assert (R.selected_blocks(pattern, f["q"], f["k"], 8 ** -0.5) == [0, 1]).all()
    idx = gathered.choose_blocks(pattern, torch.from_numpy(f["q"]), torch.from_numpy(f["k"]), 8 ** -0.5)
    assert (idx.numpy() == [0, 1]).all()
    new, *_ = apply_pass(attention_model(mask=None), passes.parse("sparse:topk=2,block=8"))
    f["v"] = np.random.default_rng(1).standard_normal(f["v"].shape).astype(np.float32)
    want = _want(f, pattern, False)
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - reference(f)).max() > 1e-3  # the kept blocks matter: not dense


def test_attention_flops_hand_count():
    """Q·Kᵀ and P·V over the C·b gathered keys, plus the block scores, nothing else."""
    b, h, t, d, blk, topk = 2, 4, 64, 8, 8, 2
    model = attention_model(b=b, h=h, t=t, d=d, mask=None)
    f = feeds(b=b, h=h, t=t, d=d, mask=None)
    new, _, _, notes = apply_pass(model, passes.parse(f"sparse:topk={topk},block={blk}"))
    nb = t // blk
    gathered = 2 * b * h * nb * blk * (topk * blk) * (d + d)
    selection = 2 * b * h * nb * nb * d
    counted = onnx_flops.count(new, f)
    assert counted.attention_matmul == gathered + selection
    assert counted.selection_matmul == selection  # tagged apart, and said in the report
    assert any(f"{selection:.3g} of the {gathered + selection:.3g} attention FLOPs choose" in n for n in notes)
    assert onnx_flops.count(model, f).matmul == 2 * b * h * t * t * (d + d)
    assert gathered + selection < 0.3 * 2 * b * h * t * t * (d + d)


def test_dynamic_length():
    model = attention_model(dynamic=True)
    new, *_ = apply_pass(model, passes.parse("sparse:topk=1,block=8,window=8"))
    pattern = _pattern("sparse:topk=1,block=8,window=8", False)
    for t in (9, 37, 64):
        f = feeds(t=t)
        np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], _want(f, pattern, False), rtol=1e-5, atol=1e-5)


ALL = "sparse:topk=64,block=2"  # every block of the variants' 7 (and 5) tokens


@pytest.mark.parametrize("v", [v for v in VARIANTS if v.sites], ids=lambda v: v.name)
def test_all_blocks_is_exact_on_the_variant_table(variant_onnx, v):
    """K = all blocks keeps every pair: exact against the original on ONNX and torch.fx,
    on every variant (padded rows, GQA, cross, causal, bidirectional) and every input set
    the pipeline checks (rows hidden completely included)."""
    import onnx

    proto = onnx.load(str(variant_onnx(v.name, "dynamo")))
    x = v.inputs()
    _, rep = attn_opt.optimize(proto, [passes.parse(ALL)])  # generated inputs, and the pipeline's variant sets
    p = rep.passes[0]
    if p.sites_skipped and "not lowered over gathered key blocks yet" in p.sites_skipped[0].reason:
        assert v.name == "sink-logits"  # the model's own per-head sink logits: refused in words, never another form
        return
    assert p.sites_rewritten == ["a0"], p.sites_skipped
    assert (p.step_fidelity_all or p.step_fidelity)["max_rel_error"] <= 1e-5  # every input set it checks
    gm, rep = attn_opt.optimize(v.make().eval(), [ALL], example_inputs=x)
    p = rep.passes[0]
    if p.sites_skipped:  # only where every pattern form is refused on FX too (e.g. a mask of unknown shape)
        _, window = attn_opt.optimize(v.make().eval(), ["sparse:window=4"], example_inputs=x)
        assert [s.reason for s in p.sites_skipped] == [s.reason for s in window.passes[0].sites_skipped]
        return
    assert p.sites_rewritten == ["a0"]
    assert (p.step_fidelity_all or p.step_fidelity)["max_rel_error"] <= 1e-5


def test_cross_attention_drops_blocks_and_matches_the_reference(variant_onnx):
    """Cross-attention: query blocks over one sequence, key blocks over the other."""
    v = next(v for v in VARIANTS if v.kind == "cross")
    x = v.inputs()
    gm, rep = attn_opt.optimize(v.make().eval(), ["sparse:topk=1,block=2"], example_inputs=x)
    assert rep.passes[0].sites_rewritten == ["a0"]
    assert rep.passes[0].step_fidelity["max_rel_error"] > 1e-4  # blocks were dropped
    _, rep = attn_opt.optimize(v.make().eval(), ["sparse:topk=1,block=2,window=2"], example_inputs=x)
    assert "local band needs self-attention" in rep.passes[0].sites_skipped[0].reason


def test_composes_with_a_normaliser():
    """sparse:topk then softplus: the site keeps its selection, the normaliser changes."""
    f = feeds()
    new, *_ = apply_pass(attention_model(), passes.parse("sparse:topk=1,block=8"))
    new2, rewritten, skipped, notes = apply_pass(new, passes.parse("softplus"))
    assert rewritten == ["a0"], skipped
    pattern = _pattern("sparse:topk=1,block=8", False)
    vis = R.selected_visible(pattern, f["q"], f["k"], 8 ** -0.5, _seen(f, False))
    want = reference(f, vis, normalise=R.softplus)
    np.testing.assert_allclose(onnx_adapter.run(new2, f)["o"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,error,msg", [
    ("sparse:topk=0", UserError, "topk must be >= 1"),
    ("sparse:topk=2,block=0", UserError, "block must be >= 1"),
    ("sparse:topk=2,window=-1", UserError, "window must be >= 0"),
    ("sparse:topk=2,stride=2", UserError, "not grid, stride"),
    ("sparse:topk=2,levels=0", UserError, "levels must be >= 1"),
    ("sparse:pyramid=1,topk=2,levels=2", NotSupported, "levels > 1 with pyramid is not implemented yet"),
    ("sparse:topk=2,dense_heads=0", NotSupported, "not implemented yet"),
    ("sparse:window=4,levels=2", UserError, "levels needs topk"),
])
def test_bad_values_are_one_line(spec, error, msg):
    with pytest.raises(error, match=msg):
        passes.parse(spec)


def test_block_larger_than_the_sequence_is_refused():
    with pytest.raises(UserError, match="block 64 is larger than the sequence"):
        apply_pass(attention_model(), passes.parse("sparse:topk=2,block=64"))


def _zoo_feeds(proto, **kw):
    from attn_opt.core.inputs import make_inputs

    return make_inputs(onnx_adapter.input_specs(onnx_adapter.load_view(proto)[2]), **kw)


@pytest.mark.parametrize("name", sorted(__import__("attn_opt.tools.zoo", fromlist=["MODELS"]).MODELS))
def test_all_blocks_is_exact_on_every_zoo_model(zoo_onnx, name):
    """K = all blocks on every zoo model's ONNX export, on padded inputs: every site
    rewritten or skipped with a reason, and exact."""
    import onnx

    from attn_opt.tools import zoo

    proto = onnx.load(str(zoo_onnx(name, "dynamo")))
    feeds = _zoo_feeds(proto, pad=True)
    _, report = attn_opt.optimize(proto, [passes.parse("sparse:topk=512,block=4")], feeds=feeds, force=True)
    p = report.passes[0]
    assert len(p.sites_rewritten) + len(p.sites_skipped) == zoo.MODELS[name].expected.sites
    assert all(s.reason for s in p.sites_skipped)
    if not p.sites_rewritten:
        return
    assert p.step_fidelity["max_rel_error"] <= 1e-4, p.step_fidelity
    fid = p.step_fidelity_all or p.step_fidelity  # every input set the pipeline checks
    if fid["max_rel_error"] > 1e-4:  # only where a window keeping every key errs the same (gpt2's where-then-add rows)
        _, window = attn_opt.optimize(proto, [passes.parse("sparse:window=100000")], feeds=feeds, force=True)
        assert fid["max_rel_error"] <= 1.01 * (window.passes[0].step_fidelity_all or {})["max_rel_error"], fid


@pytest.mark.parametrize("name", ["bert-eager", "llama-eager"])
def test_fx_agrees_with_onnx_on_zoo_models(zoo_onnx, name):
    """Blocks dropped: the FX rewrite and the ONNX rewrite give the same outputs on the
    same inputs (the same selection in both IRs)."""
    import onnx

    from attn_opt.tools import zoo

    model, args, names = zoo.MODELS[name].build()
    spec = "sparse:topk=1,block=2"
    gm, fx_rep = attn_opt.optimize(model, [spec], example_inputs=args)
    proto = onnx.load(str(zoo_onnx(name, "dynamo")))
    feed = {n: a.numpy() for n, a in zip(names, args)}
    new, onnx_rep = attn_opt.optimize(proto, [passes.parse(spec)], feeds=feed, force=True)
    assert fx_rep.passes[0].sites_rewritten == onnx_rep.passes[0].sites_rewritten != []
    assert fx_rep.passes[0].step_fidelity["max_rel_error"] > 1e-3  # blocks were dropped
    with torch.no_grad():
        got_fx = torch.utils._pytree.tree_leaves(gm(*args))[0].numpy()
    got_onnx = onnx_adapter.run(new, feed)
    first = next(iter(got_onnx.values()))
    np.testing.assert_allclose(got_fx, first, rtol=1e-4, atol=1e-4)


PYRAMID = [  # (spec, model kwargs): bidirectional, per-key masks
    ("sparse:pyramid=1,topk=1,block=8", dict()),
    ("sparse:pyramid=2,topk=1,block=4,sinks=1", dict(mask="bool")),
    ("sparse:pyramid=1,topk=1,block=8,window=1", dict(kvh=2, mask=None)),
    ("sparse:pyramid=1,topk=1,block=4", dict(t=23)),
]


def _pyramid_want(f, pattern):
    m = f.get("mask")
    term = m if m is not None and m.dtype != bool else None
    keep = m if m is not None and m.dtype == bool else None
    return R.pyramid_attention(pattern, f["q"], f["k"], f["v"], f["q"].shape[-1] ** -0.5, term, keep), term, keep


@pytest.mark.parametrize("spec,kw", PYRAMID, ids=[c[0] + str(c[1]) for c in PYRAMID])
def test_pyramid_onnx_and_torch_match_the_reference(spec, kw):
    f = feeds(mask=kw.get("mask", "padding"), **{k: kw[k] for k in ("t", "kvh") if k in kw})
    pattern = _pattern(spec, False)
    want, term, keep = _pyramid_want(f, pattern)
    assert np.abs(want - reference(f)).max() > 1e-2  # pooled and dropped blocks change the output
    new, rewritten, skipped, _ = apply_pass(attention_model(**kw), passes.parse(spec))
    assert rewritten == ["a0"], skipped
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], want, rtol=1e-5, atol=1e-5)
    got = forms.attention(*(torch.from_numpy(f[x]) for x in "qkv"), [torch.from_numpy(term)] if term is not None else [],
                          torch.from_numpy(keep) if keep is not None else None, scale=f["q"].shape[-1] ** -0.5,
                          pattern=pattern, use_triton=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_pooled_key_stands_for_the_keys_it_replaces():
    """Keys and values equal in pairs: a level-1 pooled key (+ log 2) carries exactly the
    weight of its two keys, so a pyramid keeping every block at level 0 or 1 is exact,
    also where the mask hides one key of a pair (n = 1 there)."""
    f = feeds(t=32, mask="bool", pad=5)
    for x in "kv":
        f[x][:, :, 1::2] = f[x][:, :, 0::2]
    spec = "sparse:pyramid=1,topk=2,block=8"  # 4 blocks: 2 full, 2 pooled
    pattern = _pattern(spec, False)
    assert pattern.level_counts(4) == [2, 2]
    assert (R.block_levels(pattern, f["q"], f["k"], 8 ** -0.5) == 1).any()
    new, *_ = apply_pass(attention_model(t=32, mask="bool"), passes.parse(spec))
    np.testing.assert_allclose(onnx_adapter.run(new, f)["o"], reference(f), rtol=1e-5, atol=1e-5)


def test_pyramid_refusals():
    _, rewritten, skipped, _ = apply_pass(attention_model(causal=True), passes.parse("sparse:pyramid=1,topk=1,block=8"))
    assert not rewritten and "causal site is not implemented yet" in skipped[0].reason
    _, rewritten, skipped, _ = apply_pass(attention_model(mask="full"), passes.parse("sparse:pyramid=1,topk=1,block=8"))
    assert not rewritten and "per-key (padding) masks only" in skipped[0].reason
    new, *_ = apply_pass(attention_model(), passes.parse("sparse:pyramid=1,topk=1,block=8"))
    _, rewritten, skipped, _ = apply_pass(new, passes.parse("softplus"))
    assert not rewritten and "softmax only" in skipped[0].reason


@pytest.mark.parametrize("spec,msg", [
    ("sparse:pyramid=0", "pyramid must be >= 1"),
    ("sparse:pyramid=2,block=6", "block must be a multiple"),
    ("sparse:pyramid=1,budget=1.5", r"budget must be in \(0, 1\]"),
    ("sparse:window=8,budget=0.5", "budget needs pyramid"),
])
def test_pyramid_bad_values(spec, msg):
    with pytest.raises(UserError, match=msg):
        passes.parse(spec)


def test_pyramid_budget_sets_topk_at_the_site_length():
    _, rewritten, _, notes = apply_pass(attention_model(t=64, mask=None), passes.parse("sparse:pyramid=1,budget=0.5,block=8"))
    assert rewritten == ["a0"] and "budget 0.5 at 64 keys: topk=2" in notes[0]


def test_calibrate_with_a_selection_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "cal.npz", **feeds())
    with pytest.raises(NotSupported, match=r"--calibrate with a content selection \(topk\) is not implemented yet"):
        attn_opt.optimize(attention_model(), ["sparse:topk=1,block=8"], calibrate=str(tmp_path / "cal.npz"))
