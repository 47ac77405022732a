"""`attn-opt MODEL --pass ... -o OUT`: run the pass pipeline on an ONNX model."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attn_opt.core.errors import UserError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def load_feeds(specs, npz: str | None, shapes: tuple[str, ...], check=None) -> tuple[dict, dict]:
    """The fidelity inputs, read or generated once `check(shapes)` (a run at their shapes
    fits the memory limit) passed on their shapes alone."""
    from attn_opt.core.inputs import feeds_from_npz, make_inputs, parse_shape_overrides, resolve_shapes

    if npz:
        feeds = feeds_from_npz(specs, npz, "--inputs", check)
        return feeds, {"source": npz, "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    overrides = parse_shape_overrides(shapes)
    if check is not None:
        check(resolve_shapes(specs, overrides))
    feeds = make_inputs(specs, overrides, seed=0, pad=False)
    return feeds, {"source": "generated (seed 0; ids in the embedding range, masks of ones, floats N(0,1))",
                   "shapes": {k: list(v.shape) for k, v in feeds.items()},
                   "defaults": "dynamic dims: batch 2, others 16 unless --input-shape"}


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


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def choose_check(check: str | None, weight_bytes: int) -> tuple[str, str | None]:
    """--check as given, or model when the weights fit in memory twice over, else sites."""
    if check:
        return check, None
    avail = available_memory()
    if 2 * weight_bytes <= avail:
        return "model", None
    return "sites", (f"the weights ({weight_bytes / 2**30:.1f} GiB) do not fit twice in available memory "
                     f"({avail / 2**30:.1f} GiB): each rewritten site is checked alone (--check=sites)")


def _load(model: str):
    """(steps, model, view for the input signature) of an .onnx or .pt2 file."""
    if Path(model).suffix == ".pt2":
        from attn_opt.core.ir import load
        from attn_opt.pipeline.fx_steps import FxSteps

        loaded = load(model)
        return FxSteps(), loaded.native, loaded.view
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_steps import OnnxSteps

    om = onnx_adapter.load(model)
    return OnnxSteps(), om, onnx_adapter.view(om)


def optimize(model: str, specs: tuple[str, ...], output: str | None, report_path: str | None, inputs: str | None,
             input_shape: tuple[str, ...], layers: str | None, sites: str | None, max_error: float | None,
             force: bool, console: Console, html: str | None = None, check: str | None = None,
             calibrate: str | None = None, lora: int = 0, max_memory: str | None = None) -> None:
    from attn_opt.core import limits

    with limits.use(max_memory):
        _optimize(model, specs, output, report_path, inputs, input_shape, layers, sites, max_error, force, console,
                  html, check, calibrate, lora)


def _check_outputs(model: str, output: str, report: str | None, html: str | None) -> None:
    """Every path to be written can be, and names neither the input nor another output:
    checked before anything runs, so no model is written when its report could not be."""
    from attn_opt.core.io import check_writable

    named = [("-o", output)] + [(flag, p) for flag, p in (("--report", report), ("--html", html)) if p]
    for i, (flag, p) in enumerate(named):
        for other_flag, other in [("the input model", model)] + named[:i]:
            if Path(p).resolve() == Path(other).resolve() or (Path(p).exists() and _same_file(p, other)):
                raise UserError(f"{flag} {p} is also {other_flag if other_flag.startswith('the') else other_flag + ' ' + other}; "
                                "give each output its own path (the input is never modified)")
        check_writable(p, flag)


def _run_check(native, pt2: bool, hint: str):
    """What refuses, from shapes alone, a run of the model that would not fit in memory."""
    if pt2:
        return None
    from attn_opt.core.ir.onnx_memory import check_run

    proto = native.graph_proto()
    return lambda shapes: check_run(proto, shapes, hint)


def _optimize(model, specs, output, report_path, inputs, input_shape, layers, sites, max_error, force, console,
              html, check, calibrate, lora) -> None:
    from attn_opt import passes as registry
    from attn_opt.core.errors import DoesNotRun
    from attn_opt.core.inputs import parse_shape_overrides
    from attn_opt.core.passbase import parse_ranges, parse_sites
    from attn_opt.pipeline.run import FidelityError, run_passes
    from attn_opt.core.progress import Progress

    if not specs:
        raise UserError(f"no --pass given; passes: {', '.join(sorted(registry.REGISTRY))}")
    if not output:
        raise UserError("missing -o OUTPUT")
    chain = [registry.parse(s) for s in specs]
    registry.check_chain(chain)
    if not Path(model).exists():
        raise UserError(f"no such file: {model}")
    if _same_file(model, output) if Path(output).exists() else Path(model).resolve() == Path(output).resolve():
        raise UserError("the output path is the input model; choose another -o (the input is never modified)")
    _check_outputs(model, output, report_path, html)
    pt2 = Path(model).suffix == ".pt2"
    if pt2 != (Path(output).suffix == ".pt2"):
        raise UserError(f"a {'.pt2' if pt2 else 'ONNX'} model is written as {'.pt2' if pt2 else '.onnx'}; "
                        f"-o {output} has the other kind")
    if max_error is not None and not max_error >= 0:
        raise UserError(f"--max-error must be a number >= 0 (got {max_error:g})")
    if inputs and not Path(inputs).is_file():
        raise UserError(f"no such file: {inputs} (--inputs)")
    if calibrate and not Path(calibrate).is_file():
        raise UserError(f"no such file: {calibrate} (--calibrate)")
    parse_shape_overrides(input_shape)
    progress = Progress(console)
    kwargs = dict(layers=parse_ranges(layers), ids=parse_sites(sites), max_error=max_error, force=force, check=check,
                  keep_models=bool(html), progress=progress)
    with progress.step("load"):
        steps, native, gv = _load(model)
    specs_ = steps_input_specs(steps, gv)
    feeds, note = load_feeds(specs_, inputs, input_shape,
                             _run_check(native, pt2, "give smaller --inputs" if inputs else "give smaller --input-shape"))
    if calibrate:
        from attn_opt.core.inputs import feeds_from_npz

        kwargs["calibrate"] = feeds_from_npz(specs_, calibrate, "--calibrate",
                                             _run_check(native, pt2, "give smaller --calibrate arrays"))
        note = dict(note, calibration=calibrate, heldout="the fidelity inputs")
    if lora:
        kwargs["lora"] = lora
    from attn_opt.core.inputs import fidelity_variants
    from attn_opt.pipeline.run import onnx_variants

    def variants(f, overrides):  # ONNX decoder steps are also checked through their generation loop
        return fidelity_variants(f, specs_, overrides) if pt2 else onnx_variants(native, f, overrides)

    kwargs["variants"] = variants(feeds, parse_shape_overrides(input_shape) or bool(inputs))
    check, why = choose_check(check, native.weight_bytes() if not pt2 else 0)
    kwargs["check"] = check
    if why:
        note = dict(note, check=why)
        console.print(f"note: {why}")
    tries = [feeds] + ([{k: v[:1] for k, v in feeds.items()}] if not inputs and not input_shape else [])
    for i, f in enumerate(tries):
        try:
            note_i = note if not i else dict(note, shapes={k: list(v.shape) for k, v in f.items()},
                                             retried="the model failed at batch 2 and runs at batch 1")
            if i:
                kwargs["variants"] = variants(f, True)
            out, report = run_passes(steps, native, chain, f, input_note=note_i, **kwargs)
            feeds = f
            break
        except DoesNotRun:  # raised by the first run, before any rewrite: the model is untouched
            if i + 1 == len(tries):
                raise
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
        if p.calibration:
            console.print(calibration_table(p))
    with progress.step("write"):
        if pt2:
            _save_pt2(out, feeds, output)
            data = None
        else:
            data = out.save(output)
    if report_path:
        _write_json(report_path, report.to_json())
    if html:
        write_pipeline_page(steps, report, html, feeds)
        console.print(f"wrote {html}")
    console.print(f"wrote {output}" + (f" (weights in {data.name})" if data else ""))


def calibration_table(p) -> Table | str:
    c = p.calibration
    if "sites" not in c:  # a pass with nothing to calibrate says why
        return f"  {p.name}: calibration: {c.get('note', 'nothing fitted')}"
    b, a = c["model_error_before"], c["model_error_after"]
    t = Table(title=f"{p.name}: calibration ({c['seconds']:.1f} s); model error vs the original: calibration inputs "
                    f"{_num(b, 'calibration', '.3g')} -> {_num(a, 'calibration', '.3g')}, held-out "
                    f"{_num(b, 'heldout', '.3g')} -> {_num(a, 'heldout', '.3g')}"
                    + "".join(f"; held-out order of {k} {v:.4f} -> {(a.get('heldout_order') or {}).get(k, v):.4f}"
                              for k, v in (b.get("heldout_order") or {}).items()), title_justify="left")
    lora = any(s.get("lora") for s in c["sites"])
    for col in ("site", "layer", "error before", "after", "held-out before", "after", "kept", "s") + (
            ("LoRA: projection error (held-out)",) if lora else ()):
        t.add_column(col)
    for s in c["sites"]:
        row = [s["site"], str(s["layer"]), f"{s['error_before']:.3g}", f"{s['error_after']:.3g}",
               _num(s, "heldout_before", ".3g"), _num(s, "heldout_after", ".3g"),
               "reverted (held-out worse)" if s["reverted"] else ("yes" if s["values"] else "no gain"),
               f"{s['seconds']:.2f}"]
        if lora:
            row.append(_lora_cell(s.get("lora")))
        t.add_row(*row)
    if c.get("note"):
        t.caption = c["note"]
    return t


def _lora_cell(lo: dict | None) -> str:
    if not lo:
        return "-"
    if "skipped" in lo:
        return f"not fitted: {lo['skipped']}"
    cell = f"{lo['error_before']:.3g} -> {lo['error_after']:.3g}"
    if "heldout_before" in lo:
        cell += f" ({lo['heldout_before']:.3g} -> {lo['heldout_after']:.3g})"
    return cell + (", reverted" if lo.get("reverted") else "")


def steps_input_specs(steps, gv):
    if steps.ir == "onnx":
        from attn_opt.core.ir import onnx as adapter
    else:
        from attn_opt.core.ir import fx as adapter
    return adapter.input_specs(gv)


def _save_pt2(gm, feeds, output: str) -> None:
    import torch

    from attn_opt.core.io import atomic_path
    from attn_opt.pipeline.fx_steps import args_of

    program = torch.export.export(gm, args_of(gm, feeds))
    with atomic_path(output) as tmp:
        torch.export.save(program, tmp)


def _write_json(path: str, obj) -> None:
    from attn_opt.core import strict_json
    from attn_opt.core.io import atomic_path

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
    with atomic_path(path) as tmp:
        Path(tmp).write_text(render(pages))
