"""The pipeline on torch.fx: detect → rewrite → check, with fidelity measured against the
untouched module in PyTorch and FLOPs counted by torch's FlopCounterMode.

Only passes with an FX lowering run here (today: fuse); any other says plainly that it
is not lowered to FX yet.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from attn_opt.patterns.detect import detect
from attn_opt.rewriter import fidelity
from attn_opt.rewriter.errors import NotSupported
from attn_opt.rewriter.ir import fx as fx_adapter
from attn_opt.rewriter.pipeline import EXACT_TOL, FidelityError, PassReport, Report


def _flatten(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def run_module(fn, args) -> tuple[list[np.ndarray], int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return [t.detach().float().numpy() for t in _flatten(out)], counter.get_total_flops()


def apply_fx(gm: fx.GraphModule, p, example_inputs, notes: list | None = None):
    """One pass on a copy of `gm`: (new GraphModule, rewritten ids, skipped [{id, reason}])."""
    rewrite = getattr(p, "rewrite_fx", None)
    if rewrite is None:
        raise NotSupported(f"{p.name} is not lowered to torch.fx yet (it runs on ONNX models)")
    notes = [] if notes is None else notes
    gm = copy.deepcopy(gm)
    gv = fx_adapter.view(gm, example_inputs)
    det = detect(gv)
    sites = det.sites if getattr(p, "touches_sites", lambda: True)() else []
    diag = {}
    if getattr(p, "needs_diagnostics", lambda: False)():
        from attn_opt.patterns.diagnostics import for_pass

        diag = for_pass(gv, sites, gv.sample_inputs(), getattr(p, "window", None))
    rewritten, skipped = [], []
    for site in sites:
        reason = p.skip_reason(site)
        if reason:
            skipped.append({"id": site.id, "reason": reason})
            continue
        note = rewrite(gm, site, diag.get(site.id))
        rewritten.append(site.id)
        if note:
            notes.append(f"{site.id}: {note}")
    if hasattr(p, "rewrite_graph_fx"):
        notes += p.rewrite_graph_fx(gm, gv)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten, skipped


def run_fx_pipeline(gm: fx.GraphModule, passes, example_inputs, reference=None, force: bool = False):
    """Passes in order on a GraphModule; returns (new GraphModule, Report)."""
    report = Report(inputs={"shapes": [list(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]})
    gm = copy.deepcopy(gm)  # count the graph as it runs: without dead code, like every rewrite
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ref, _ = run_module(reference or gm, example_inputs)  # fidelity against the untouched module
    _, flops_ref = run_module(gm, example_inputs)  # FLOPs of the graph, before and after alike
    cur, prev, flops_cur = gm, ref, flops_ref
    from attn_opt.passes import check_chain

    check_chain(passes)
    for p in passes:
        t0 = time.perf_counter()
        notes: list[str] = []
        new, rewritten, skipped = apply_fx(cur, p, example_inputs, notes)
        out, flops_new = run_module(new, example_inputs)
        per = {str(i): fidelity.compare(a, b) for i, (a, b) in enumerate(zip(ref, out))}
        step = fidelity.worst({str(i): fidelity.compare(a, b) for i, (a, b) in enumerate(zip(prev, out))})
        fid = fidelity.worst(per)
        rep = PassReport(p.name, p.options(), p.is_exact(), rewritten, skipped, flops_cur, flops_new,
                         fidelity=fid.to_json(), step_fidelity=step.to_json(),
                         per_output={k: f.to_json() for k, f in per.items()}, seconds=time.perf_counter() - t0)
        rep.notes += notes + ["FLOPs by torch FlopCounterMode (matrix products only; it does not see CPU SDPA kernels)"]
        report.passes.append(rep)
        if p.is_exact() and not step.max_rel_error <= EXACT_TOL and not force:
            err = FidelityError(f"{p.name} is exact, but moved outputs by {step.max_rel_error:.3g}")
            err.report = report
            raise err
        cur, prev, flops_cur = new, out, flops_new
    return cur, report
