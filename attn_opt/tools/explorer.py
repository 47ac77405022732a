"""Model Explorer overlays (`--model-explorer FILE.json`) and `attn-opt view`.

Model Explorer (`ai-edge-model-explorer`, ONNX through `model-explorer-onnx`) shows
"custom node data" over a graph: a JSON object of graphs (by graph id: the ONNX graph's
name, `<main>` where it has none), each with `results`, node id (the ONNX node's name)
-> `{"value": number or text}` (its `node_data_builder.ModelNodeData`). attn-opt writes two:

    FILE.json          per node a pass emitted: "a0: sparse, gated | attention FLOPs 2.6e5 -> 9.8e4 | error 6.0e-03"
                       (text values: Model Explorer colours each site's label)
    FILE.error.json    the same nodes with the error as a number, on a green-to-red gradient

The nodes are those a pass tagged (`attn_opt.site`) in the output model's main graph;
sites inside functions and control-flow subgraphs are not in the overlay (said at run
time). The error is the site's own (`--check=sites`), else the pass's whole-model error,
and the label says which.
"""

from __future__ import annotations

import json
from pathlib import Path

from attn_opt.core.errors import UserError
from attn_opt.core.graph import SITE_TAG

GRADIENT = [{"stop": 0, "bgColor": "#c8e6c9"}, {"stop": 0.5, "bgColor": "#fff59d"}, {"stop": 1, "bgColor": "#ef9a9a"}]


def _site_flops(proto, shapes, names_of: dict[str, set[str]]) -> dict[str, int]:
    """Attention FLOPs per site: the sum over the site's nodes (`names_of`: site -> node names)."""
    from attn_opt.core.ir.onnx_flops import node_flops

    per_node = {n.name: node_flops(n, shapes)[0] for n in proto.graph.node}
    return {sid: sum(per_node.get(n, 0) for n in names) for sid, names in names_of.items()}


def _tagged(proto) -> dict[str, list[str]]:
    """site id -> names of the main graph's nodes a pass emitted for it."""
    out: dict[str, list[str]] = {}
    for n in proto.graph.node:
        sid = next((p.value for p in n.metadata_props if p.key == SITE_TAG), None)
        if sid is not None and n.name:
            out.setdefault(sid, []).append(n.name)
    return out


def overlay(model_in: str, output: str, report) -> tuple[dict, dict, list[str]]:
    """(labels, errors, notes): the two ModelNodeData objects for the written model
    `output` of the run `report` on `model_in`."""
    from attn_opt import inspect as run_inspect
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.core.ir import onnx_flops

    feeds = report.feeds
    before_model = onnx_adapter.load(model_in)
    det = run_inspect(model_in, feeds=feeds)
    before = _site_flops(before_model.graph_proto(), onnx_flops.shapes(before_model, feeds),
                         {s.id: set(s.nodes) for s in det.sites})
    after_model = onnx_adapter.load(output)
    proto = after_model.graph_proto()
    tagged = _tagged(proto)
    after = _site_flops(proto, onnx_flops.shapes(after_model, feeds), {k: set(v) for k, v in tagged.items()})
    passes, errors = {}, {}
    for p in report.passes:
        for sid in p.sites_rewritten:
            passes.setdefault(sid, []).append(p.name)
            if sid in p.per_site:
                errors[sid] = (p.per_site[sid].get("max_rel_error"), "site")
            elif p.fidelity:
                errors[sid] = (p.fidelity.get("max_rel_error"), "model")
    labels, numbers = {}, {}
    for sid, nodes in tagged.items():
        err, kind = errors.get(sid, (None, ""))
        text = f"{sid}: {', '.join(passes.get(sid, ['rewritten']))}"
        if sid in before:
            text += f" | attention FLOPs {before[sid]:.3g} -> {after.get(sid, 0):.3g}"
        if err is not None:
            text += f" | {'site' if kind == 'site' else 'model'} error {err:.2e}"
        for name in nodes:
            labels[name] = {"value": text}
            if err is not None:
                numbers[name] = {"value": float(err)}
    graph = proto.graph.name or "<main>"  # model-explorer-onnx names an unnamed main graph so
    notes = []
    regional = sorted({s for s in passes if "/" in s})
    if regional:
        notes.append(f"sites inside functions or subgraphs are not in the Model Explorer overlay: {', '.join(regional)}")
    return ({graph: {"name": "attn-opt sites", "results": labels}},
            {graph: {"name": "attn-opt error (max relative)", "results": numbers, "gradient": GRADIENT}}, notes)


def error_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(p.stem + ".error" + (p.suffix or ".json")))


def write(path: str, model_in: str, output: str, report) -> list[str]:
    """Write FILE.json and FILE.error.json (atomically); the notes to print."""
    from attn_opt.core import strict_json
    from attn_opt.core.io import atomic_path

    labels, errors, notes = overlay(model_in, output, report)
    for target, data in ((path, labels), (error_path(path), errors)):
        with atomic_path(target) as tmp:
            Path(tmp).write_text(strict_json.dumps(data, indent=1))
    return notes


def view(model: str, overlays: list[str], port: int, browser: bool) -> None:
    """Start Model Explorer on `model` with the overlays loaded (blocks until Ctrl-C); no
    overlay given: MODEL.explorer.json and MODEL.explorer.error.json where they exist."""
    if not overlays:
        beside = str(Path(model).with_suffix(".explorer.json"))
        overlays = [p for p in (beside, error_path(beside)) if Path(p).is_file()]
    try:
        import model_explorer
        import model_explorer_onnx  # noqa: F401  (registers the ONNX adapter as an extension)
    except ImportError as e:
        raise UserError(f"Model Explorer is not installed ({e.name}): pip install -e \".[explorer]\" "
                        "(ai-edge-model-explorer and model-explorer-onnx)") from None
    for p in overlays:
        try:
            json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--overlay {p}: not a JSON file ({str(e).splitlines()[0]})") from None
    config = model_explorer.config()
    config.add_model_from_path(str(Path(model).resolve()))
    for p in overlays:
        config.add_node_data_from_path(str(Path(p).resolve()))
    model_explorer.visualize_from_config(config=config, extensions=["model_explorer_onnx"], port=port,
                                         no_open_in_browser=not browser)
