"""The PyTorch side: fuse on torch.fx, attn_opt.optimize() on modules, and the
`attn_opt` torch.compile backend (found through its entry point, without an import)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import attn_opt
from attn_opt.tools import zoo
from variants import BY_NAME, VARIANTS


@pytest.mark.parametrize("v", [v for v in VARIANTS if v.sites], ids=lambda v: v.name)
def test_fx_fuse_on_variants(v):
    if "fx:export" in v.skip:
        pytest.skip(v.skip["fx:export"])
    model, x = v.make().eval(), v.inputs()
    gm, report = attn_opt.optimize(model, ["fuse"], example_inputs=x)
    p = report.passes[0]
    assert len(p.sites_rewritten) + len(p.sites_skipped) == v.sites
    assert p.step_fidelity["max_rel_error"] <= 1e-4
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == v.sites
    with torch.no_grad():
        want, got = model(*x), gm(*x)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bert-eager", "llama-eager", "gpt2-eager", "t5-eager"])
def test_fx_fuse_agrees_with_onnx(zoo_onnx, name):
    """The same pass on the FX graph and on the ONNX export: same sites rewritten, exact."""
    model, args, _ = zoo.MODELS[name].build()
    _, fx_report = attn_opt.optimize(model, ["fuse"], example_inputs=args)
    _, onnx_report = attn_opt.optimize(str(zoo_onnx(name, "dynamo")), ["fuse:target=onnx"])
    f, o = fx_report.passes[0], onnx_report.passes[0]
    assert f.sites_rewritten == o.sites_rewritten == [f"a{i}" for i in range(zoo.MODELS[name].expected.sites)]
    assert f.step_fidelity["max_rel_error"] <= 1e-4 and o.step_fidelity["max_rel_error"] <= 1e-4


def test_untraceable_module_is_reported():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: torch.export cannot trace it
                return x * 2
            return x

    from attn_opt.core.errors import UserError

    with pytest.raises(UserError, match="torch.export could not trace the module"):
        attn_opt.optimize(DataDependent(), ["fuse"], example_inputs=(torch.randn(2, 3),))


FX_SPECS = ["mlpfree:collapse=qk", "mlpfree:collapse=vo", "mlpfree:collapse=qk+vo", "sparse:window=4", "sparse:window=4,sinks=1", "sparse:window=5,dilation=2", "softplus:n_train=16",
            "sinkfree:mode=logit,bias=0.5", "sinkfree:mode=redistribute,alpha=0.3", "sinkfree:mode=relu",
            "sigmoid", "sigmoid:bias=-1", "gated", "mlpfree:drop_mlp=true"]


@pytest.mark.parametrize("spec", FX_SPECS)
@pytest.mark.parametrize("name", ["bert-eager", "llama-eager"])
def test_fx_pass_agrees_with_onnx(zoo_onnx, name, spec):
    """The same pass on the FX graph and on the ONNX export, on the same inputs: the same
    sites, fidelity within 1e-4, matrix-FLOP change within 1%."""
    import onnx

    from attn_opt import passes
    from attn_opt.core.ir import onnx_flops
    import attn_opt

    model, args, names = zoo.MODELS[name].build()
    _, fx_report = attn_opt.optimize(model, [spec], example_inputs=args)
    proto = onnx.load(str(zoo_onnx(name, "dynamo")))
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    out, onnx_report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=feeds, force=True)
    f, o = fx_report.passes[0], onnx_report.passes[0]
    assert f.sites_rewritten == o.sites_rewritten
    assert abs(f.fidelity["max_rel_error"] - o.fidelity["max_rel_error"]) <= 1e-4
    assert abs(f.fidelity["cosine"] - o.fidelity["cosine"]) <= 1e-4
    fx_change = f.flops_after / f.flops_before
    onnx_change = onnx_flops.count(out, feeds).matmul / onnx_flops.count(proto, feeds).matmul
    assert fx_change == pytest.approx(onnx_change, rel=0.01)


def test_fx_windowed_sigmoid_agrees_with_onnx(zoo_onnx):
    """sparse then sigmoid composes on one site in both IRs: a windowed sigmoid, the same
    outputs and FLOPs."""
    import onnx

    from attn_opt.core.ir import onnx_flops
    import attn_opt
    from attn_opt.pipeline.run import parse_chain

    chain = ["sparse:window=4", "sigmoid"]
    model, args, names = zoo.MODELS["llama-eager"].build()
    gm, fx_report = attn_opt.optimize(model, chain, example_inputs=args)
    proto = onnx.load(str(zoo_onnx("llama-eager", "dynamo")))
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    out, onnx_report = attn_opt.optimize(proto, parse_chain(chain), feeds=feeds, force=True)
    f, o = fx_report.passes[1], onnx_report.passes[1]
    assert f.sites_rewritten == o.sites_rewritten == ["a0", "a1"]
    assert abs(f.fidelity["max_rel_error"] - o.fidelity["max_rel_error"]) <= 1e-4
    assert onnx_flops.count(out, feeds).matmul / onnx_flops.count(proto, feeds).matmul == pytest.approx(
        f.flops_after / fx_report.passes[0].flops_before, rel=0.01)
    sites = attn_opt.inspect(out).sites
    assert [(s.pattern.window, s.normaliser.kind) for s in sites] == [(4, "sigmoid")] * 2


def test_fx_new_parameters_are_trainable():
    model, args, _ = zoo.MODELS["bert-eager"].build()
    gm, _ = attn_opt.optimize(model, ["gated", "sinkfree:mode=logit,bias=0"], example_inputs=args)
    new = {n: p for n, p in gm.named_parameters() if n.startswith("attn_opt_")}
    assert sorted(new) == ["attn_opt_a0_gate.bias", "attn_opt_a0_gate.weight", "attn_opt_a0_sink_logit",
                           "attn_opt_a1_gate.bias", "attn_opt_a1_gate.weight", "attn_opt_a1_sink_logit"]
    gm.train()
    gm(*args).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new.values())


def test_backend_falls_back_and_passes_through(caplog, tmp_path):
    import numpy as np

    v = BY_NAME["mul-scale"]
    m, x = v.make().eval(), v.inputs()
    np.savez(tmp_path / "w.npz", other=np.zeros(4, np.float32))  # no key for the site: the pass fails
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="attn_opt"):
        out = torch.compile(m, backend=attn_opt.backend(passes=[f"sinkfree:mode=logit,weights={tmp_path / 'w.npz'}"],
                                                        inner="eager"))(*x)
    torch.testing.assert_close(out, m(*x))
    assert "has no 'a0.sink_logit'" in caplog.text and "untouched" in caplog.text
    neg = BY_NAME["classifier-head"]
    torch._dynamo.reset()
    out = torch.compile(neg.make().eval(), backend=attn_opt.backend(inner="eager"))(*neg.inputs())
    torch.testing.assert_close(out, neg.make().eval()(*neg.inputs()))
    torch._dynamo.reset()


def test_torch_compile_by_name_in_a_fresh_process():
    """backend="attn_opt" without importing attn_opt; Inductor behind it; matches eager."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from variants import BY_NAME
        from attn_opt.tools import zoo
        assert "attn_opt.backends" not in sys.modules
        cases = [(BY_NAME[n].make().eval(), BY_NAME[n].inputs()) for n in ("gqa-repeat-kv", "causal-tril", "additive-mask")]
        cases += [zoo.MODELS[n].build()[:2] for n in ("bert-eager", "llama-sdpa", "gpt2-eager", "torch-mha", "torch-encoder")]
        for m, x in cases:
            torch._dynamo.reset()
            with torch.no_grad():
                want, got = m(*x), torch.compile(m, backend="attn_opt")(*x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        print("ok", "attn_opt.compile" in sys.modules)
    """) % str(__import__("pathlib").Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok True")


def test_pt2_on_the_command_line(tmp_path):
    model, args, _ = zoo.MODELS["llama-eager"].build()
    src, out = tmp_path / "m.pt2", tmp_path / "o.pt2"
    torch.export.save(torch.export.export(model, args), str(src))
    before = src.read_bytes()
    r = subprocess.run([sys.executable, "-m", "attn_opt", str(src), "--pass", "fuse", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == before
    det = attn_opt.inspect(str(out))
    assert [s.rule for s in det.sites] == ["sdpa", "sdpa"] and [s.kv_heads for s in det.sites] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(*args), model(*args), rtol=1e-4, atol=1e-5)
