"""`attn-opt`: the command line.

    attn-opt inspect MODEL [--json] [--why]
    attn-opt zoo NAME -o model.onnx [--exporter dynamo|dynamo23|torchscript]

Every user error is one line on stderr and exit status 2; nothing prints a traceback
unless ATTN_OPT_DEBUG=1.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from attn_opt.core import strict_json
from attn_opt.core.errors import UserError



def out_console() -> Console:
    """Wide enough for the site table when stdout is a pipe or a file."""
    con = Console(highlight=False)
    return con if con.is_terminal else Console(highlight=False, width=200)


def _fmt(x) -> str:
    if x is None:
        return "?"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def sites_table(det, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    cached = any(s.cache for s in det.sites)  # a decoder step: which inputs/outputs carry each site's cache
    for col in ("id", "layer", "kind", "heads", "kv heads", "head dim", "causal", "mask", "scale", "found by", "module") \
            + (("cache: past -> present",) if cached else ()):
        t.add_column(col)
    for s in det.sites:
        t.add_row(s.id, _fmt(s.layer), s.kind, _fmt(s.heads), _fmt(s.kv_heads), _fmt(s.head_dim), _fmt(s.causal),
                  s.mask, _fmt(s.scale), s.rule, s.scope or "", *((s.cache.describe() if s.cache else "-",) if cached else ()))
    return t


def misses_table(det) -> Table:
    t = Table(title="softmaxes that are not attention sites, and why", title_justify="left")
    t.add_column("nodes")
    t.add_column("reason")
    for m in det.near_misses:
        t.add_row(", ".join(m.nodes), m.reason)
    return t


def attention_table(stats, window) -> Table:
    t = Table(title="attention per head (mean over rows of the sample inputs)", title_justify="left")
    for c in ("site", "layer", "head", "to token 0", "to tokens 1-3", "sinks", "entropy",
              f"outside window {window}" if window else "outside window", "state"):
        t.add_column(c)
    for h in stats:
        t.add_row(h.site, _fmt(h.layer), str(h.head), f"{h.first_tokens[0]:.3f}",
                  " ".join(f"{x:.3f}" for x in h.first_tokens[1:]), ",".join(map(str, h.sinks)) or "-",
                  f"{h.entropy:.2f}", "-" if h.outside_window is None else f"{h.outside_window:.3f}", h.state)
    return t


def _attention(model: str, det, feeds, window, heatmaps):
    from attn_opt.patterns.diagnostics import head_stats, probabilities
    from attn_opt.core.ir import load

    if not det.sites:
        raise UserError(f"{model} has no attention sites: nothing to diagnose")
    if det.probe_error:
        raise UserError(f"the model does not run on {'these' if feeds else 'generated'} inputs ({det.probe_error}); "
                        "give --inputs FILE.npz")
    gv = load(model).view
    feeds = feeds if feeds is not None else det.feeds
    probs = probabilities(gv, det.sites, feeds)
    stats = [h for s in det.sites if s.id in probs for h in head_stats(s, probs[s.id], window)]
    if heatmaps:
        from attn_opt.tools.heatmap import write_heatmaps

        write_heatmaps(probs, det.sites, heatmaps)
    return stats


MAX_MEMORY = click.option(
    "--max-memory", metavar="SIZE",
    help="Refuse inputs, runs and fits estimated (from shapes, before allocating) to need more than SIZE "
         "(8G, 512M, bytes); default: the memory available now.")


def _inspect_feeds(model: str, inputs: str) -> dict:
    """--inputs for inspect, checked like the rewrite's: the .npz headers against the model's
    signature, and (ONNX) a run at their shapes against the memory limit, before any data."""
    from attn_opt.core.inputs import feeds_from_npz
    from attn_opt.core.ir import load

    loaded = load(model)
    if loaded.ir == "onnx":
        from attn_opt.core.ir import onnx as adapter
        from attn_opt.core.ir.onnx_memory import check_run

        proto = loaded.native.graph_proto()
        return feeds_from_npz(adapter.input_specs(loaded.view), inputs, "--inputs",
                              lambda shapes: check_run(proto, shapes, "give smaller --inputs"))
    from attn_opt.core.ir import fx as adapter

    return feeds_from_npz(adapter.input_specs(loaded.view), inputs, "--inputs")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attn-opt")
@click.option("-v", "--verbose", is_flag=True,
              help="Show third-party warnings and log records (the exporters', onnx_ir's); anywhere on the line.")
def cli(verbose: bool):
    """Find attention in ONNX models and torch.export programs, and rewrite it."""


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option("--why", is_flag=True, help="List every softmax that is not a site, with the reason.")
@click.option("--attention", is_flag=True, help="Run the model and report sinks, entropy, dormant heads per head.")
@click.option("--inputs", help="Inputs for --attention as .npz (default: generated from the signature).")
@click.option("--window", type=click.IntRange(min=1), help="With --attention: report the attention mass outside this window.")
@click.option("--heatmaps", type=click.Path(file_okay=False), help="With --attention: write a PNG per site here.")
@MAX_MEMORY
def inspect(model: str, as_json: bool, why: bool, attention: bool, inputs, window, heatmaps, max_memory):
    """List the attention sites of MODEL (.onnx, or .pt2 saved by torch.export.save), or of
    every .onnx file in a folder (an Optimum export)."""
    from attn_opt import inspect as run_inspect
    from attn_opt.core import limits

    from attn_opt.tools.folder import inspect_folder

    if inspect_folder(model, as_json, why, out_console(), attention or inputs, max_memory):
        return

    with limits.use(max_memory):
        feeds = _inspect_feeds(model, inputs) if inputs else None
        det = run_inspect(model, feeds=feeds)
        stats = _attention(model, det, feeds, window, heatmaps) if attention else None
    if as_json:
        out = {"model": model, "sites": [s.to_json() for s in det.sites],
               "near_misses": [m.to_json() for m in det.near_misses], "rule_counts": det.counts,
               "probe_error": det.probe_error}
        if stats is not None:
            out["attention"] = [h.to_json() for h in stats]
        click.echo(strict_json.dumps(out, indent=2))
        return
    con = out_console()
    con.print(sites_table(det, f"{len(det.sites)} attention site(s) in {model}"))
    if det.probe_error:
        con.print(f"[yellow]note:[/] the model did not run on sample inputs ({det.probe_error}); "
                  "figures that need a run are shown as ?")
    if stats is not None:
        con.print(attention_table(stats, window))
    if why:
        if det.near_misses:
            con.print(misses_table(det))
        else:
            con.print("every softmax in the model is an attention site" if det.sites
                      else "the model has no softmax and no attention op")
    elif det.near_misses:
        con.print(f"{len(det.near_misses)} softmax(es) are not attention sites; --why says why")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("-p", "--pass", "specs", multiple=True, metavar="NAME[:k=v,...]",
              help="A pass to run, in order (fuse, sparse:window=128, ...). Lists inside a value use '+'. "
                   "`attn-opt passes` lists every pass's options, defaults and accepted values.")
@click.option("-o", "--output", help="Where to write the rewritten model (never the input).")
@click.option("--report", "report_path", help="Write the per-pass report as JSON.")
@click.option("--inputs", help="Fidelity inputs as .npz (default: generated from the model's signature).")
@click.option("--input-shape", multiple=True, metavar="NAME=1x4096", help="Size of an input's dynamic dims.")
@click.option("--layers", help="Only sites in these layers, e.g. 0-3,7 (an error if the model has no site there).")
@click.option("--sites", help="Only these site ids, e.g. a0,a3 (an error if the model has no such site).")
@click.option("--max-error", type=click.FloatRange(min=0), help="Stop if a pass moves outputs further (relative error, >= 0).")
@click.option("--force", is_flag=True, help="Write even when a fidelity bound is exceeded.")
@click.option("--html", help="Write a page showing what every pass changed (a tab per pass).")
@click.option("--check", type=click.Choice(["model", "sites", "none"]),
              help="How each pass is checked: run the whole model (default when it fits in memory), each "
                   "rewritten site alone on the previous model's activations (one segment in memory at a "
                   "time), or none: outputs not compared (the model runs, one segment at a time, only as far as "
                   "the values detection reads).")
@click.option("--calibrate", metavar="FILE.npz",
              help="Inputs to fit each rewritten site's per-head parameters on (temperature, offset, gain and "
                   "the form's own), layer by layer (the fidelity inputs are the held-out set).")
@click.option("--lora", type=click.IntRange(min=0), default=0, metavar="R",
              help="With --calibrate: also fit a rank-R correction of each rewritten site's output projection.")
@click.option("--allow-empty", is_flag=True,
              help="A model with no attention site is written unchanged (exit 0) instead of exit status 3.")
@click.option("--model-explorer", "explorer", metavar="FILE.json", help="Write Model Explorer node data (site, "
              "passes, attention FLOPs, error per node) to FILE.json, the error alone to FILE.error.json.")
@click.option("--share-weights", is_flag=True,
              help="The output references the input's external weight files in place instead of a copy (-o in "
                   "the input's folder); OUT.data holds only what the passes added. The output then reads the "
                   "input's files: keep them unchanged.")
@click.option("--budget", metavar="KIND=F", help="Search a form per site meeting a cost: attention=0.5 (attention "
              "FLOPs), flops=0.8 (the model's); writes OUT.plan.json and OUT.pareto.png (instead of --pass).")
@click.option("--candidates", metavar="SPECS", help="With --budget: the forms to choose from, ';' between forms, "
              "'|' between an option's values (default: sparse:window=8|16|32,sinks=auto).")
@click.option("--plan", "plan", metavar="PLAN.json", help="Apply a plan (what --budget wrote, or edited) without searching.")
@click.option("--objective", type=click.Choice(["auto", "spearman", "kl", "top1", "cosine"]), default="auto",
              help="With --budget: the fidelity to keep (auto: KL for logits, the Spearman of pairwise "
                   "similarities for embeddings, cosine otherwise).")
@MAX_MEMORY
def optimize(model, specs, output, report_path, inputs, input_shape, layers, sites, max_error, force, html, check,
             calibrate, lora, allow_empty, explorer, share_weights, budget, candidates, plan, objective, max_memory):
    """Rewrite MODEL's attention with the given passes, checking fidelity and FLOPs after each."""
    from attn_opt.tools.optimize import optimize as run

    run(model, specs, output, report_path, inputs, input_shape, layers, sites, max_error, force, out_console(),
        html, check, calibrate, lora, max_memory, allow_empty, explorer=explorer, share_weights=share_weights,
        budget=budget, candidates=candidates, plan=plan, objective=objective)


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--overlay", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Node data to load (default: MODEL.explorer.json and MODEL.explorer.error.json where they exist).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--no-browser", is_flag=True, help="Start the server only.")
def view(model, overlay, port, no_browser):
    """Open MODEL in Model Explorer (a local server) with attn-opt's overlays (extra: explorer)."""
    from attn_opt.tools.explorer import view as run

    run(model, list(overlay), port, not no_browser)


@cli.command("passes")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
def passes_cmd(name: str | None, as_json: bool):
    """List the passes, or one pass, with every option's type, default and accepted values."""
    import dataclasses
    import typing

    from attn_opt.passes import REGISTRY
    from attn_opt.core.passbase import accepted, type_name

    if name is not None and name not in REGISTRY:
        raise UserError(f"unknown pass {name!r}; passes: {', '.join(sorted(REGISTRY))}")
    out = {}
    for pname, cls in sorted(REGISTRY.items()):
        if name is not None and pname != name:
            continue
        hints = typing.get_type_hints(cls)
        out[pname] = {"exact": cls.exact, "what": cls.why, "options": [
            {"name": f.name, "type": type_name(hints[f.name]), "default": f.default, "accepted": accepted(f),
             "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls)]}
    if as_json:
        click.echo(strict_json.dumps(out, indent=2, default=str))
        return
    con = out_console()
    for pname, info in out.items():
        t = Table(title=f"{pname}: {info['what']} ({'exact' if info['exact'] else 'approximate'})",
                  title_justify="left")
        for c in ("option", "type", "default", "accepted", "meaning"):
            t.add_column(c)
        for o in info["options"]:
            t.add_row(o["name"], o["type"], _fmt(o["default"]) if o["default"] is not None else "-", o["accepted"],
                      o["help"])
        con.print(t)


@cli.command()
@click.argument("before", type=click.Path(dir_okay=False, path_type=str))
@click.argument("after", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", help="Write the side-by-side page (one self-contained HTML file).")
@click.option("--text", is_flag=True, help="Print a summary: sites changed, ops added/removed, FLOPs and params.")
def diff(before, after, output, text):
    """Show what changed between two models (.onnx or .pt2)."""
    from attn_opt.core.io import atomic_path
    from attn_opt.core.ir import load
    from attn_opt.tools.diff import diff_views

    if not output and not text:
        raise UserError("give -o DIFF.html, --text, or both")
    if output:
        from attn_opt.core.io import check_writable

        check_writable(output)
    lb, la = load(before), load(after)
    if lb.ir != la.ir:
        raise UserError(f"cannot diff a {lb.ir} model against a {la.ir} model")
    d = diff_views(lb.view, la.view, title=f"{before} → {after}")
    if text:
        print_diff_summary(d, lb, la)
    if output:
        from pathlib import Path

        from attn_opt.tools.visualizer import render

        with atomic_path(output) as tmp:
            Path(tmp).write_text(render([(d, None)]))
        click.echo(f"wrote {output}")


def print_diff_summary(d, lb, la) -> None:
    s = d.summary()
    con = out_console()
    con.print(f"nodes {s['nodes_before']} → {s['nodes_after']}: {s['added']} added, {s['removed']} removed, "
              f"{s['changed']} changed")
    t = Table(title="attention sites", title_justify="left")
    t.add_column("site")
    t.add_column("before")
    t.add_column("after")
    for k in sorted(set(s["sites_before"]) | set(s["sites_after"])):
        t.add_row(k, s["sites_before"].get(k, "-"), s["sites_after"].get(k, "-"))
    con.print(t)
    ops = Table(title="ops added / removed", title_justify="left")
    ops.add_column("op")
    ops.add_column("added")
    ops.add_column("removed")
    for op in sorted(set(s["ops_added"]) | set(s["ops_removed"])):
        ops.add_row(op, str(s["ops_added"].get(op, 0)), str(s["ops_removed"].get(op, 0)))
    con.print(ops)
    if lb.ir == "onnx":
        from attn_opt.core.inputs import make_inputs
        from attn_opt.core.ir import onnx as onnx_adapter
        from attn_opt.core.ir import onnx_flops

        try:
            feeds = make_inputs(onnx_adapter.input_specs(lb.view), pad=False)
            fb, fa = onnx_flops.count(lb.native, feeds), onnx_flops.count(la.native, feeds)
            con.print(f"FLOPs {fb.total:.4g} → {fa.total:.4g} ({fa.total - fb.total:+.4g}) at "
                      f"{ {k: list(v.shape) for k, v in feeds.items()} }")
        except Exception as e:
            con.print(f"FLOPs: not counted ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        pb, pa = onnx_flops.params(lb.native), onnx_flops.params(la.native)
        con.print(f"parameters {pb} → {pa} ({pa - pb:+d})")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt-ids", "prompt", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The prompt's token ids: a .npy array [B, T] (or [T]).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--compare", "other", type=click.Path(exists=True, dir_okay=False),
              help="Another model of the same step (e.g. rewritten): per-step logit error and token agreement on "
                   "MODEL's greedy path.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
def generate(model: str, prompt: str, max_new_tokens: int, other: str | None, as_json: bool):
    """Run a decoder-step ONNX model's greedy generation loop in ONNX Runtime (the present
    cache fed back as past): tokens/s, cache size, and with --compare the agreement of two models."""
    from attn_opt.tools.generate import run

    out = run(model, prompt, max_new_tokens, other)
    con = out_console()
    if as_json:
        click.echo(strict_json.dumps(out))
        return
    con.print(f"prompt {out['prompt_tokens']} tokens x batch {out['batch']}: {out['prompt_seconds'] * 1e3:.1f} ms; "
              f"{out['new_tokens']} new tokens: {out['tokens_per_second']:.1f} tokens/s; "
              f"cache {_size(out['cache_bytes'])} at {out['total_tokens']} tokens")
    con.print(f"tokens: {out['tokens']}")
    if other:
        c = out["compare"]
        con.print(f"vs {other}: max relative logit error {c['max_rel_error']:.3g} over {c['steps']} steps, "
                  f"token agreement {c['token_agreement']:.3f}; its cache {_size(c['cache_bytes'])}, "
                  f"{c['tokens_per_second']:.1f} tokens/s")


@cli.command()
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the ONNX model.")
@click.option("--exporter", type=click.Choice(["dynamo", "dynamo23", "torchscript"]), default="dynamo",
              show_default=True)
def zoo(name: str | None, output: str | None, exporter: str):
    """Build a small random-weight model from the test zoo (or the trained llama-bytes) and export it to ONNX."""
    from attn_opt.tools import zoo as z

    if name is None:
        for k, m in z.MODELS.items():
            click.echo(f"{k:18s} {m.expected.sites} sites, {m.expected.heads} heads, {m.expected.kv_heads} kv heads")
        for k, what in z.TRAINED.items():
            click.echo(f"{k:18s} decoder step, trained: {what} ({k}-full: the whole sequence)")
        return
    trained = {**{n: True for n in z.TRAINED}, **{f"{n}-full": False for n in z.TRAINED}}  # step / full sequence
    if name not in z.MODELS and name not in trained:
        raise UserError(f"unknown zoo model {name!r}; choose from {', '.join([*z.MODELS, *trained])}")
    if not output:
        raise UserError("missing -o OUTPUT.onnx")
    from attn_opt.core.io import atomic_path, check_writable

    check_writable(output)

    from attn_opt.core.progress import Progress

    with atomic_path(output) as tmp, Progress(out_console()).step(f"build {name} and export it ({exporter})"):
        if name in trained:  # trained weights: a decoder step (past/present), or -full: the whole sequence
            z.export_trained(name.removesuffix("-full"), exporter, tmp, step=trained[name])
        else:
            z.export_onnx(name, exporter, tmp)
    click.echo(f"wrote {output} ({name}, {exporter} exporter)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]  # a group option, given anywhere
    if argv and not argv[0].startswith("-") and argv[0] not in cli.commands:
        argv = ["optimize"] + argv  # `attn-opt model.onnx --pass ...` is `attn-opt optimize ...`
    from attn_opt.tools.guard import guarded

    argv = ["--verbose"] * verbose + argv
    return guarded(lambda: cli.main(args=argv, prog_name="attn-opt", standalone_mode=False), verbose)


if __name__ == "__main__":
    sys.exit(main())
