"""Real-size models through the pipeline: wall time and peak RSS of `attn-opt inspect`,
`--pass fuse` and `--pass sparse:window=256,sinks=4`, beside ONNX Runtime's transformer
optimizer and onnxscript's `optimize_for_ort`, on the same files in one run.

Models (random weights, real geometry, built once into --workdir):
  bert-base-ts / bert-base-dynamo  12 layers, 768 hidden, 12 heads (440 MB fp32, inline)
  bert-24-layers                    24 layers, 64 hidden, 4 heads (TorchScript export): whole-process
                                    `inspect` vs ORT's optimizer on a deep, small model
  tinyllama-1.1b                    22 layers, 2048 hidden, 32 heads, 4 kv heads (4.4 GB, external data)
  llama3-8b-geometry                4096 hidden, 32 heads, 8 kv heads, --llama8b-layers layers
                                    (external data; checked with --check=sites)

Each command runs in its own process; peak RSS is that process's (os.wait4). Every tool
runs --repeat times, interleaved (round r runs each tool once, the order rotated), and
the table gives medians, each tool's ratio to onnxscript's, and the load average seen.

    python benchmarks/pipeline_scale.py                       # everything (needs ~25 GB disk)
    python benchmarks/pipeline_scale.py --models bert-base-dynamo --repeat 5
    python benchmarks/pipeline_scale.py --models tinyllama-1.1b --tools "check sites" onnxscript
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import write  # noqa: E402

HERE = Path(__file__).parent
PY = sys.executable

BUILD = r'''
import sys, torch
from attn_opt.tools import zoo
name, exporter, out, layers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if name == "bert-24-layers":  # benchmarks/detect_speed.py's large-model row: many layers, small weights
    m = zoo._hf("BertModel", "BertConfig", "eager", vocab_size=zoo.VOCAB, hidden_size=64, num_hidden_layers=layers,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
elif name.startswith("bert"):
    m = zoo._hf("BertModel", "BertConfig", "eager", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072)
elif name.startswith("tinyllama"):
    m = zoo._hf("LlamaModel", "LlamaConfig", "eager", vocab_size=32000, hidden_size=2048, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048)
else:
    m = zoo._hf("LlamaModel", "LlamaConfig", "eager", vocab_size=128256, hidden_size=4096, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=2048)
ids, mask = zoo._ids_and_padded_mask() if name == "bert-24-layers" else zoo._ids_and_padded_mask(2, 16)
zoo.export_module(zoo._Text(m), (ids, mask), ("input_ids", "attention_mask"), exporter, out)
'''

ORT_OPT = r'''
import sys
from onnxruntime.transformers.optimizer import optimize_model
src, out, kind, heads, hidden = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
m = optimize_model(src, model_type=kind, num_heads=heads, hidden_size=hidden, opt_level=0)
ops = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
print("SITES", sum(n.op_type in ops for n in m.model.graph.node))
m.save_model_to_file(out, use_external_data_format=src.endswith("x.onnx"))
'''

ONNXSCRIPT = r'''
import sys, os
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort
src, out = sys.argv[1], sys.argv[2]
m = ir.load(src)
m, counts = optimize_for_ort(m)
ops = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
print("SITES", sum(n.op_type in ops for n in m.graph.all_nodes()))
ir.save(m, out, external_data=os.path.basename(out) + ".data")
'''

MODELS = {  # name: (exporter, layers, heads, hidden, ORT model type, external data, check)
    "bert-base-ts": ("torchscript", 12, 12, 768, "bert", False, "model"),
    "bert-base-dynamo": ("dynamo", 12, 12, 768, "bert", True, "model"),
    "bert-24-layers": ("torchscript", 24, 4, 64, "bert", False, "model"),
    "tinyllama-1.1b": ("dynamo", 22, 32, 2048, "gpt_neox", True, "sites"),
    "llama3-8b-geometry": ("dynamo", 4, 32, 4096, "gpt_neox", True, "sites"),
}


def measured(cmd: list[str], env=None) -> dict:
    """Run `cmd`; wall seconds, peak RSS (MB) of that process, exit code, its last line."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    sites = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("SITES")), None)
    found = re.search(r"(\d+) attention site\(s\) in", out)
    sites = int(found.group(1)) if found and sites is None else sites
    return {"seconds": round(dt, 2), "peak_mb": round(usage.ru_maxrss / 1024), "rc": p.returncode,
            "sites": sites, "tail": out.strip().splitlines()[-1][:200] if out.strip() else ""}


def build(name: str, work: Path, layers: int) -> Path:
    exporter, default_layers, *_ = MODELS[name]
    path = work / name / f"{name}{'x' if MODELS[name][5] else ''}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n = layers if name == "llama3-8b-geometry" else default_layers  # (bert-24-layers: its 24)
    r = measured([PY, "-c", BUILD, name, exporter, str(path), str(n)])
    if r["rc"] != 0:
        raise SystemExit(f"building {name} failed: {r['tail']}")
    if MODELS[name][5] and not any(p.suffix == ".data" or p.name.endswith(".onnx.data") for p in path.parent.iterdir()):
        import onnx  # the exporter kept the weights inline: save them next to it, as users ship large models

        m = onnx.load(str(path))
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    return path


def weights_mb(path: Path) -> int:
    return round(sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)) / 2**20)


def tools(name: str, path: Path, out: Path) -> list[tuple[str, str, list[str]]]:
    """(tool, check, command) per tool compared on `name`; outputs under `out` (--share-weights
    writes beside the input: its weight files are referenced where they are)."""
    exporter, layers, heads, hidden, kind, external, check = MODELS[name]
    ours = [PY, "-m", "attn_opt"]
    fuse = ours + [str(path), "--pass", "fuse"]
    rows = [("attn-opt inspect", "", ours + ["inspect", str(path)]),
            ("attn-opt --pass fuse", check, fuse + ["--check", check, "-o", str(out / "fuse.onnx")]),
            ("attn-opt --pass fuse --check none", "none", fuse + ["--check", "none", "-o", str(out / "none.onnx")])]
    if check != "sites":
        rows.append(("attn-opt --pass fuse --check sites", "sites",
                     fuse + ["--check", "sites", "-o", str(out / "sites.onnx")]))
    if external:
        rows.append(("attn-opt --pass fuse --share-weights", check,
                     fuse + ["--check", check, "--share-weights", "-o", str(path.parent / "shared.onnx")]))
    if name.startswith("bert"):  # the sparse pass, and ORT's optimizer where it fits in memory (bert)
        rows.append(("attn-opt --pass sparse:window=256,sinks=4", check,
                     ours + [str(path), "--pass", "sparse:window=256,sinks=4", "--check", check,
                             "-o", str(out / "sparse.onnx")]))
        rows.append(("ORT transformer optimizer", "", [PY, "-c", ORT_OPT, str(path), str(out / "ort.onnx"), kind,
                                                         str(heads), str(hidden)]))
    rows.append(("onnxscript optimize_for_ort + save", "", [PY, "-c", ONNXSCRIPT, str(path),
                                                             str(out / "onnxscript.onnx")]))
    return rows


def run_model(name: str, path: Path, out: Path, repeat: int, only: list[str] | None) -> list[dict]:
    """Every tool `repeat` times, interleaved (round r runs each tool once, the order rotated
    by r), so the machine's load falls on all of them alike; per tool the medians."""
    cmds = [t for t in tools(name, path, out) if not only or any(o in t[0] for o in only)]
    got: dict[str, list[dict]] = {t: [] for t, _, _ in cmds}
    for r in range(repeat):
        for tool, check, cmd in cmds[r % len(cmds):] + cmds[:r % len(cmds)]:
            rep = out / "report.json"
            one = measured(cmd + (["--report", str(rep)] if "attn-opt --" in tool else []))
            one["load"] = round(os.getloadavg()[0], 2)
            if rep.exists():
                data = json.loads(rep.read_text())
                one["sites"] = len(data["passes"][0]["sites_rewritten"])
                one["steps"] = data["steps"]
            print(json.dumps({"model": name, "tool": tool, "round": r, **{k: v for k, v in one.items()
                                                                           if k != "steps"}}), file=sys.stderr)
            got[tool].append(one)
            for f in list(out.iterdir()) + list(path.parent.glob("shared.onnx*")):  # the disk for the next
                f.unlink()
    rows = []
    for tool, check, _ in cmds:
        runs = got[tool]
        row = {"model": name, "tool": tool, "check": check, "weights_mb": weights_mb(path), "repeat": len(runs),
               "seconds": statistics.median(x["seconds"] for x in runs),
               "seconds_all": [x["seconds"] for x in runs],
               "peak_mb": statistics.median(x["peak_mb"] for x in runs),
               "rc": max((x["rc"] for x in runs), key=abs), "sites": runs[-1]["sites"], "tail": runs[-1]["tail"],
               "load": [x["load"] for x in runs]}
        if runs[-1].get("steps"):
            names = [s for s, _ in runs[-1]["steps"]]
            row["steps"] = {s: round(statistics.median(dict(x["steps"]).get(s, 0.0) for x in runs if x.get("steps")), 3)
                            for s in names}
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "attn-opt" / "scale"))
    ap.add_argument("--models", nargs="*", default=list(MODELS),
                    help="Models to run (none: rewrite the table from results/pipeline_scale.json).")
    ap.add_argument("--llama8b-layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5, help="Rounds of every tool, interleaved; medians reported.")
    ap.add_argument("--tools", nargs="*", help="Only the tools whose name contains one of these words.")
    ap.add_argument("--build-only", action="store_true", help="Build (export) the models and stop.")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for name in args.models:
        path = build(name, work, args.llama8b_layers)
        if args.build_only:
            print(f"{name}: {path} ({weights_mb(path)} MB)")
            continue
        out = work / "out"
        out.mkdir(parents=True, exist_ok=True)
        rows += run_model(name, path, out, args.repeat, args.tools)
    if args.build_only:
        return 0
    kept = HERE / "results" / "pipeline_scale.json"  # other models' rows of an earlier run stay in the table
    if kept.exists():
        rows = [r for r in json.loads(kept.read_text()) if r["model"] not in args.models and "seconds_all" in r] + rows
    peers = {r["model"]: r for r in rows if r["tool"].startswith("onnxscript")}
    cols = ["model", "weights MB", "tool", "check", "s (median)", "peak RSS MB", "vs onnxscript s / RSS", "sites",
            "rc", "load (1 min)"]
    table = []
    for r in rows:
        peer = peers.get(r["model"])
        ratio = (f"{r['seconds'] / peer['seconds']:.2f}x / {r['peak_mb'] / peer['peak_mb']:.2f}x"
                 if peer and peer["seconds"] else "-")
        table.append([r["model"], str(r["weights_mb"]), r["tool"], r["check"],
                      f"{r['seconds']:.2f} ({min(r['seconds_all']):.2f}-{max(r['seconds_all']):.2f})",
                      str(round(r["peak_mb"])), ratio, "-" if r["sites"] is None else str(r["sites"]),
                      str(r["rc"]) + ("" if r["rc"] == 0 else f" ({r['tail']})"),
                      f"{min(r['load']):.1f}-{max(r['load']):.1f}"])
    loads = [x for r in rows for x in r["load"]]
    shared = (f"The 1-minute load average over this run was {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} "
              f"cores: besides the command measured, about {max(0, round(statistics.median(loads)) - 1)} other "
              "processes were runnable at any time (other engineers' tests and benchmarks). " if loads else "")
    steps = [f"- {r['model']}, {r['tool']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items())
             for r in rows if r.get("steps")]
    write("pipeline_scale", "real-size models: attn-opt vs ORT optimizer vs onnxscript", cols, table, rows,
          preface=["# Real-size models through the pipeline", "",
                   "Wall time and peak RSS per command, each its own process (os.wait4), same files for every "
                   "tool; random weights with real geometry (benchmarks/pipeline_scale.py). Every tool ran "
                   f"{args.repeat} times, interleaved (each round runs each tool once, the order rotated), and the "
                   "table gives medians (range in brackets) and the 1-minute load average seen after each run: the "
                   "machine is shared, so compare the ratios within one table, not with other runs. " + shared
                   + "attn-opt's "
                   "commands include every check their `check` says (model: validity, the original and each "
                   "pass's model on the fidelity inputs and the padded and length+5 variants, FLOPs; sites: each "
                   "rewritten site alone; none: validity only) and writing the output with its weights (copied, "
                   "or referenced in place with --share-weights); the peers check nothing. Sites: attention ops "
                   "in the output.", ""],
          footer="attn-opt's own steps (median seconds):\n\n" + "\n".join(steps)
                 + "\n\nrc -9: the process was killed by the kernel (out of memory).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
