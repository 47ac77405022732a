"""`attn-opt MODEL --pass ... -o OUT`: run the pass pipeline on an ONNX model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attn_opt.core.errors import NothingFound, UserError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _num(d: dict, key: str, fmt: str) -> str:
    v = d.get(key) if d else None
    return "-" if v is None else format(v, fmt)


def pass_table(report) -> Table:
    t = Table(title=f"passes (check={report.check})", title_justify="left")
    for c in ("pass", "rewritten", "skipped", "exact", "step err", "total err", "cosine", "KL",
              "err, all inputs", "FLOPs", "attention FLOPs", "params", "s"):
        t.add_column(c)
    for p in report.passes:
        f = p.fidelity
        t.add_row(p.name, str(len(p.sites_rewritten)), str(len(p.sites_skipped)), "yes" if p.exact else "no",
                  _num(p.step_fidelity, "max_rel_error", ".2e"), _num(f, "max_rel_error", ".2e"),
                  _num(f, "cosine", ".6f"), _num(f, "kl", ".2e"), _num(p.fidelity_all, "max_rel_error", ".2e"),
                  f"{p.flops_before:.3g} → {p.flops_after:.3g}",
                  f"{p.attention_flops_before:.3g} → {p.attention_flops_after:.3g}",
                  f"{p.params_before} → {p.params_after}", f"{p.seconds:.1f}")
    return t


def optimize(model: str, specs: tuple[str, ...], output: str | None, report_path: str | None, inputs: str | None,
             input_shape: tuple[str, ...], layers: str | None, sites: str | None, max_error: float | None,
             force: bool, console: Console, html: str | None = None, check: str | None = None,
             calibrate: str | None = None, lora: int = 0, max_memory: str | None = None,
             allow_empty: bool = False, explorer: str | None = None, share_weights: bool = False,
             budget: str | None = None, candidates: str | None = None, plan: str | None = None,
             objective: str = "auto") -> None:
    """The command: check the paths, run `attn_opt.optimize`, print the tables, write."""
    from attn_opt import api
    from attn_opt import passes as registry
    from attn_opt.core.inputs import parse_shape_overrides
    from attn_opt.core.passbase import parse_ranges, parse_sites
    from attn_opt.core.progress import Progress
    from attn_opt.pipeline.run import FidelityError

    planned = budget is not None or plan is not None
    if candidates is not None and budget is None:
        raise UserError("--candidates narrows a --budget search; give --budget too")
    if not specs and not planned:
        raise UserError(f"no --pass given; passes: {', '.join(sorted(registry.REGISTRY))}")
    if specs and planned:
        raise UserError(f"--{'budget' if budget is not None else 'plan'} chooses every site's form: give no --pass")
    if not output:
        raise UserError("missing -o OUTPUT")
    if planned:
        _check_plan_flags(budget, candidates, plan)
    registry.check_chain([registry.parse(s) for s in specs])
    if not Path(model).exists():
        raise UserError(f"no such file: {model}")
    if _same_file(model, output) if Path(output).exists() else Path(model).resolve() == Path(output).resolve():
        raise UserError("the output path is the input model; choose another -o (the input is never modified)")
    pt2 = Path(model).suffix == ".pt2"
    if pt2 != (Path(output).suffix == ".pt2"):
        raise UserError(f"a {'.pt2' if pt2 else 'ONNX'} model is written as {'.pt2' if pt2 else '.onnx'}; "
                        f"-o {output} has the other kind")
    if share_weights and pt2:
        raise UserError("--share-weights applies to ONNX models with external data (a .pt2 is written whole)")
    if share_weights and Path(output).resolve().parent != Path(model).resolve().parent:
        raise UserError(f"--share-weights: -o must be in the input model's folder ({Path(model).resolve().parent}): "
                        "external data is read from the model's own folder")
    if max_error is not None and not max_error >= 0:
        raise UserError(f"--max-error must be a number >= 0 (got {max_error:g})")
    for path, flag in ((inputs, "--inputs"), (calibrate, "--calibrate")):
        if path and not Path(path).is_file():
            raise UserError(f"no such file: {path} ({flag})")
    parse_shape_overrides(input_shape)
    if explorer and Path(model).suffix == ".pt2":
        raise UserError("--model-explorer: overlays are written for ONNX models only (not .pt2)")
    extra = plan_outputs(output) if budget is not None else {}
    _check_outputs(model, output, report_path, html, explorer, extra)
    progress = Progress(console)
    try:
        out, report = api.optimize(model, specs, inputs=inputs, input_shape=input_shape, force=force,
                                   layers=parse_ranges(layers), sites=parse_sites(sites), max_error=max_error,
                                   check=check, calibrate=calibrate, lora=lora, progress=progress,
                                   keep_models=bool(html), max_memory=max_memory,
                                   **({"budget": budget, "candidates": candidates, "plan": plan, "objective": objective}
                                      if planned else {}))
    except FidelityError as e:
        if report_path and getattr(e, "report", None):
            _write_json(report_path, e.report.to_json())
        raise
    if not report.sites_found and any(p.touches_sites() for p in [registry.parse(s) for s in specs]) and not allow_empty:
        raise NothingFound(nothing_found(model, report.near_misses))
    if report.inputs.get("check"):
        console.print(f"note: {report.inputs['check']}")
    console.print(pass_table(report))
    if report.plan:
        from attn_opt.tools.plan_report import plan_table

        console.print(plan_table(report.plan))
    for p in report.passes:
        for s in p.sites_skipped:
            console.print(f"  {p.name}: skipped {s.id}: {s.reason}")
        for n in p.notes:
            console.print(f"  {p.name}: {n}")
        for sid, r in p.sink_ratio.items():
            console.print(f"  {p.name}: {sid} sink ratio per head {r['before']} -> {r['after']}")
        if p.calibration:
            console.print(calibration_table(p))
    steps = api.steps_for(report.ir)
    with progress.step("write"):
        data = steps.save(out, output, report.feeds, share=True) if share_weights else steps.save(
            out, output, report.feeds)
    if report_path:
        _write_json(report_path, report.to_json())
    if html:
        write_pipeline_page(steps, report, html, report.feeds)
        console.print(f"wrote {html}")
    console.print(f"wrote {output}" + (f" (weights in {data})" if data else "")
                  + (" (the input's weight files referenced in place: keep them unchanged)" if share_weights else ""))
    if explorer:
        from attn_opt.tools import explorer as me

        with progress.step("Model Explorer overlay"):
            notes = me.write(explorer, model, output, report)
        for n in notes:
            console.print(f"note: {n}")
        console.print(f"wrote {explorer} and {me.error_path(explorer)} (Model Explorer node data; "
                      f"attn-opt view {output} --overlay {explorer})")
    if report.plan:
        from attn_opt.tools.plan_report import write_pareto

        _write_json(extra["plan"], report.plan)
        write_pareto(report.plan, extra["pareto"])
        console.print(f"wrote {extra['plan']} and {extra['pareto']}")


def plan_outputs(output: str) -> dict[str, str]:
    """Where --budget writes the plan and its Pareto plot: OUT.plan.json, OUT.pareto.png."""
    stem = str(Path(output).with_suffix(""))
    return {"plan": stem + ".plan.json", "pareto": stem + ".pareto.png"}


def _check_plan_flags(budget, candidates, plan) -> None:
    from attn_opt.pipeline.budget import expand_candidates, parse_budget

    if budget is not None and plan is not None:
        raise UserError("give --budget (search a plan) or --plan (apply one), not both")
    if budget is not None:
        parse_budget(budget)
        expand_candidates(candidates)
    elif not Path(plan).is_file():
        raise UserError(f"no such file: {plan} (--plan)")


def nothing_found(model: str, misses) -> str:
    """One line: no site, and each softmax seen with the reason it is not one (`--why`)."""
    if not misses:
        return f"{model} has no attention site (no softmax and no attention op); nothing written (--allow-empty writes it unchanged)"
    said = "; ".join(f"{', '.join(m.nodes[:1]) or '?'}: {m.reason}" for m in misses[:4])
    more = f"; and {len(misses) - 4} more" if len(misses) > 4 else ""
    return (f"{model} has no attention site; {len(misses)} softmax(es) seen, none attention ({said}{more}); "
            "nothing written (--allow-empty writes it unchanged)")


def _check_outputs(model: str, output: str, report: str | None, html: str | None,
                   explorer: str | None = None, extra: dict | None = None) -> None:
    """Every path to be written can be, and names neither the input nor another output:
    checked before anything runs, so no model is written when its report could not be."""
    from attn_opt.core.io import check_writable

    named = [("-o", output)] + [(flag, p) for flag, p in (("--report", report), ("--html", html)) if p]
    if explorer:
        from attn_opt.tools.explorer import error_path

        named += [("--model-explorer", explorer), ("--model-explorer", error_path(explorer))]
    named += [(f"--budget's {k}", p) for k, p in (extra or {}).items()]
    for i, (flag, p) in enumerate(named):
        for other_flag, other in [("the input model", model)] + named[:i]:
            if Path(p).resolve() == Path(other).resolve() or (Path(p).exists() and _same_file(p, other)):
                said = other_flag if other_flag.startswith("the") else f"{other_flag} {other}"
                raise UserError(f"{flag} {p} is also {said}; give each output its own path (the input is never "
                                "modified)")
        check_writable(p, flag)


def calibration_table(p) -> Table | str:
    c = p.calibration
    if not c.fitted:  # a pass with nothing to calibrate says why
        return f"  {p.name}: calibration: {c.note or 'nothing fitted'}"
    b, a = c.model_error_before, c.model_error_after
    t = Table(title=f"{p.name}: calibration ({c.seconds:.1f} s); model error vs the original: calibration inputs "
                    f"{_num(b, 'calibration', '.3g')} -> {_num(a, 'calibration', '.3g')}, held-out "
                    f"{_num(b, 'heldout', '.3g')} -> {_num(a, 'heldout', '.3g')}"
                    + "".join(f"; held-out order of {k} {v:.4f} -> {(a.get('heldout_order') or {}).get(k, v):.4f}"
                              for k, v in (b.get("heldout_order") or {}).items()), title_justify="left")
    lora = any(f.lora for f in c.sites)
    for col in ("site", "layer", "error before", "after", "held-out before", "after", "kept", "s") + (
            ("LoRA: projection error (held-out)",) if lora else ()):
        t.add_column(col)
    for f in c.sites:
        row = [f.site, str(f.layer), f"{f.error_before:.3g}", f"{f.error_after:.3g}",
               _num(f.__dict__, "heldout_before", ".3g"), _num(f.__dict__, "heldout_after", ".3g"),
               "reverted (held-out worse)" if f.reverted else ("yes" if f.values else "no gain"),
               f"{f.seconds:.2f}"]
        if lora:
            row.append(_lora_cell(f.lora))
        t.add_row(*row)
    if c.note:
        t.caption = c.note
    return t


def _lora_cell(lo) -> str:
    if lo is None:
        return "-"
    if lo.skipped is not None:
        return f"not fitted: {lo.skipped}"
    cell = f"{lo.error_before:.3g} -> {lo.error_after:.3g}"
    if lo.heldout_before is not None:
        cell += f" ({lo.heldout_before:.3g} -> {lo.heldout_after:.3g})"
    return cell + (", reverted" if lo.reverted else "")


def _write_json(path: str, obj) -> None:
    from attn_opt.core.io import atomic_path

    from attn_opt.core import strict_json

    with atomic_path(path) as tmp:
        Path(tmp).write_text(strict_json.dumps(obj, indent=2))  # strict: null (and why) for inf/NaN


def write_pipeline_page(steps, report, path: str, feeds) -> None:
    """One page for the whole pipeline: a tab per pass (the model before it → after it)."""
    from attn_opt.core.io import atomic_path
    from attn_opt.tools.diff import diff_views
    from attn_opt.tools.visualizer import render

    pages = []
    for p, (before, after) in zip(report.passes, report.models):
        d = diff_views(steps.view_for_diff(before, feeds), steps.view_for_diff(after, feeds), title=p.name)
        pages.append((d, p.to_json()))
    page = render(pages)
    if report.plan:  # --budget: the plan's Pareto plot under the tabs
        page = page.replace("</body>", _pareto_section(report.plan) + "</body>", 1)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page)


def _pareto_section(plan: dict) -> str:
    """The Pareto plot of a --budget search (every assignment tried, the chosen one marked)
    as an inline PNG."""
    import base64
    import html
    import tempfile

    from attn_opt.tools.plan_report import write_pareto

    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "pareto.png"
        write_pareto(plan, str(png))
        data = base64.b64encode(png.read_bytes()).decode()
    title = html.escape(f"--budget {plan['budget']}: every assignment tried (cost {plan['cost']:.3f} chosen)")
    return (f'<section id="budget-pareto" style="margin:1em"><h3>{title}</h3>'
            f'<img alt="Pareto plot of the budget search" src="data:image/png;base64,{data}"></section>\n')
