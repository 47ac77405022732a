"""`attn-opt inspect FOLDER/`: an export folder (Optimum writes one ONNX file per
component: encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
decoder_model_merged.onnx) listed file by file with its sites."""

from __future__ import annotations

from pathlib import Path

import click

from attn_opt.core import strict_json
from attn_opt.core.errors import UserError, first_line


def onnx_files(folder: str) -> list[Path]:
    """Every .onnx file under `folder`, sorted by path; an error if there is none."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*.onnx") if p.is_file())
    if not files:
        raise UserError(f"{folder} is a folder with no .onnx file in it")
    return files


def inspect_folder(folder: str, as_json: bool, why: bool, con, one_model_options, max_memory) -> bool:
    """False where `folder` is not a folder (inspect one model); else each file's sites (a
    file that cannot be read is listed with its one-line reason, and the command fails at
    the end, so a folder with one bad file still shows the rest)."""
    if not Path(folder).is_dir():
        return False
    if one_model_options:
        raise UserError(f"{folder} is a folder: --attention and --inputs take one model file")
    from attn_opt.core import limits

    with limits.use(max_memory):
        _inspect_all(folder, as_json, why, con)
    return True


def _inspect_all(folder: str, as_json: bool, why: bool, con) -> None:
    from attn_opt import inspect as run_inspect
    from attn_opt.tools.cli import misses_table, sites_table

    out, bad = [], []
    for path in onnx_files(folder):
        name = str(path)
        try:
            det = run_inspect(name)
        except UserError as e:
            bad.append(name)
            out.append({"model": name, "error": str(e)})
            if not as_json:
                con.print(f"[red]{name}: {first_line(e)}[/]")
            continue
        out.append({"model": name, "sites": [s.to_json() for s in det.sites],
                    "near_misses": [m.to_json() for m in det.near_misses], "rule_counts": det.counts,
                    "probe_error": det.probe_error})
        if not as_json:
            con.print(sites_table(det, f"{len(det.sites)} attention site(s) in {name}"))
            if det.probe_error:
                con.print(f"[yellow]note:[/] {name} did not run on sample inputs ({det.probe_error}); "
                          "figures that need a run are shown as ?")
            if why and det.near_misses:
                con.print(misses_table(det))
    if as_json:
        click.echo(strict_json.dumps({"folder": folder, "models": out}, indent=2))
    else:
        total = sum(len(m.get("sites", [])) for m in out)
        con.print(f"{len(out)} ONNX file(s) in {folder}: {total} attention site(s) in all")
    if bad:
        raise UserError(f"{len(bad)} of {len(out)} file(s) in {folder} could not be inspected: {', '.join(bad)}")
