"""`attn-opt MODEL --pass ... -o OUT`: run the pass pipeline on an ONNX model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attn_opt.rewriter.errors import UserError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def load_feeds(specs, npz: str | None, shapes: tuple[str, ...]) -> tuple[dict, dict]:
    from attn_opt.rewriter.inputs import make_inputs, parse_shape_overrides, read_npz

    if npz:
        data = read_npz(npz)
        missing = [s.name for s in specs if s.name not in data]
        if missing:
            raise UserError(f"--inputs {npz} lacks {missing}; it has {sorted(data)}")
        feeds = {s.name: data[s.name].astype(s.dtype) for s in specs}
        return feeds, {"source": npz, "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    overrides = parse_shape_overrides(shapes)
    feeds = make_inputs(specs, overrides, seed=0, pad=False)
    return feeds, {"source": "generated (seed 0; ids in the embedding range, masks of ones, floats N(0,1))",
                   "shapes": {k: list(v.shape) for k, v in feeds.items()},
                   "defaults": "dynamic dims: batch 2, others 16 unless --input-shape"}


def pass_table(report) -> Table:
    t = Table(title="passes", title_justify="left")
    for c in ("pass", "rewritten", "skipped", "exact", "step err", "total err", "cosine", "KL", "FLOPs",
              "attention FLOPs", "params", "s"):
        t.add_column(c)
    for p in report.passes:
        f = p.fidelity
        t.add_row(p.name, str(len(p.sites_rewritten)), str(len(p.sites_skipped)), "yes" if p.exact else "no",
                  f"{p.step_fidelity['max_rel_error']:.2e}", f"{f['max_rel_error']:.2e}", f"{f['cosine']:.6f}", "-" if f["kl"] is None else f"{f['kl']:.2e}",
                  f"{p.flops_before:.3g} → {p.flops_after:.3g}",
                  f"{p.attention_flops_before:.3g} → {p.attention_flops_after:.3g}",
                  f"{p.params_before} → {p.params_after}", f"{p.seconds:.1f}")
    return t


def optimize(model: str, specs: tuple[str, ...], output: str | None, report_path: str | None, inputs: str | None,
             input_shape: tuple[str, ...], layers: str | None, sites: str | None, max_error: float | None,
             force: bool, console: Console, html: str | None = None) -> None:
    from attn_opt import passes as registry
    from attn_opt.rewriter.io import save_onnx
    from attn_opt.rewriter.ir import onnx as onnx_adapter
    from attn_opt.rewriter.passbase import parse_ranges
    from attn_opt.rewriter.pipeline import FidelityError, run_pipeline

    if not specs:
        raise UserError(f"no --pass given; passes: {', '.join(sorted(registry.REGISTRY))}")
    if not output:
        raise UserError("missing -o OUTPUT.onnx")
    chain = [registry.parse(s) for s in specs]
    registry.check_chain(chain)
    if not Path(model).exists():
        raise UserError(f"no such file: {model}")
    if _same_file(model, output) if Path(output).exists() else Path(model).resolve() == Path(output).resolve():
        raise UserError("the output path is the input model; choose another -o (the input is never modified)")
    if Path(model).suffix == ".pt2":
        return _optimize_pt2(model, chain, output, report_path, force, console)
    proto = onnx_adapter.load_proto(model)
    _, _, gv = onnx_adapter.load_view(proto)
    feeds, note = load_feeds(onnx_adapter.input_specs(gv), inputs, input_shape)
    feeds, note = _runnable(proto, feeds, note, generated=not inputs and not input_shape)
    ids = set(sites.split(",")) if sites else None
    try:
        out, report = run_pipeline(proto, chain, feeds, parse_ranges(layers), ids, max_error, force, note)
    except FidelityError as e:
        if report_path and getattr(e, "report", None):
            _write_json(report_path, e.report.to_json())
        raise
    console.print(pass_table(report))
    for p in report.passes:
        for s in p.sites_skipped:
            console.print(f"  {p.name}: skipped {s['id']}: {s['reason']}")
        for n in p.notes:
            console.print(f"  {p.name}: {n}")
        for sid, r in p.sink_ratio.items():
            console.print(f"  {p.name}: {sid} sink ratio per head {r['before']} -> {r['after']}")
    save_onnx(out, output)
    if report_path:
        _write_json(report_path, report.to_json())
    if html:
        write_pipeline_page(proto, report, html)
        console.print(f"wrote {html}")
    console.print(f"wrote {output}")


def _runnable(proto, feeds, note, generated: bool):
    """The model must run on the fidelity inputs; generated ones retry at batch 1 (some
    exports only run at the batch they were traced with)."""
    from attn_opt.rewriter.ir import onnx as onnx_adapter

    tries = [feeds] + ([{k: v[:1] for k, v in feeds.items()}] if generated else [])
    for i, f in enumerate(tries):
        try:
            onnx_adapter.run(proto, f)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            continue
        if i:
            note = dict(note, shapes={k: list(v.shape) for k, v in f.items()},
                        retried="the model failed at batch 2 and runs at batch 1")
        return f, note
    raise UserError(f"the input model does not run in ONNX Runtime on these inputs ({first[:200]}); "
                    "give --inputs FILE.npz or --input-shape NAME=DIMS")


def _write_json(path: str, obj) -> None:
    from attn_opt.rewriter.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2))


def write_pipeline_page(proto, report, path: str) -> None:
    """One page for the whole pipeline: a tab per pass (the model before it → after it)."""
    from attn_opt.rewriter.io import atomic_path
    from attn_opt.rewriter.ir import onnx as onnx_adapter
    from attn_opt.tools.diff import diff_views
    from attn_opt.tools.visualizer import render

    steps, before = [], proto
    for p, after in zip(report.passes, report.models):
        d = diff_views(onnx_adapter.load_view(before)[2], onnx_adapter.load_view(after)[2], title=p.name)
        steps.append((d, p.to_json()))
        before = after
    with atomic_path(path) as tmp:
        Path(tmp).write_text(render(steps))


def _optimize_pt2(model: str, chain, output: str, report_path: str | None, force: bool, console: Console) -> None:
    """A torch.export program: the passes on its graph, checked in PyTorch, saved as .pt2."""
    import torch

    from attn_opt.rewriter.io import atomic_path
    from attn_opt.rewriter.ir import load
    from attn_opt.rewriter.fx_pipeline import run_fx_pipeline

    loaded = load(model)
    ex = getattr(loaded.program, "example_inputs", None)
    args = tuple(ex[0]) if ex and not ex[1] else tuple(torch.from_numpy(v) for v in loaded.view.sample_inputs().values())
    gm, report = run_fx_pipeline(loaded.native, chain, args, force=force)
    console.print(pass_table(report))
    for p in report.passes:
        for s in p.sites_skipped:
            console.print(f"  {p.name}: skipped {s['id']}: {s['reason']}")
    program = torch.export.export(gm, args)
    with atomic_path(output) as tmp:
        torch.export.save(program, tmp)
    if report_path:
        _write_json(report_path, report.to_json())
    console.print(f"wrote {output}")
