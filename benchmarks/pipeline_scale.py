"""Real-size models through the pipeline: wall time and peak RSS of `attn-opt inspect`,
`--pass fuse` and `--pass sparse:window=256,sinks=4`, beside ONNX Runtime's transformer
optimizer and onnxscript's `optimize_for_ort`, on the same files in one run.

Models (random weights, real geometry, built once into --workdir):
  bert-base-ts / bert-base-dynamo  12 layers, 768 hidden, 12 heads (440 MB fp32, inline)
  tinyllama-1.1b                    22 layers, 2048 hidden, 32 heads, 4 kv heads (4.4 GB, external data)
  llama3-8b-geometry                4096 hidden, 32 heads, 8 kv heads, --llama8b-layers layers
                                    (external data; checked with --check=sites)

Each command runs in its own process; peak RSS is that process's (os.wait4).

    python benchmarks/pipeline_scale.py                       # everything (needs ~25 GB disk)
    python benchmarks/pipeline_scale.py --models bert-base-ts # one model
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
if name.startswith("bert"):
    m = zoo._hf("BertModel", "BertConfig", "eager", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072)
elif name.startswith("tinyllama"):
    m = zoo._hf("LlamaModel", "LlamaConfig", "eager", vocab_size=32000, hidden_size=2048, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048)
else:
    m = zoo._hf("LlamaModel", "LlamaConfig", "eager", vocab_size=128256, hidden_size=4096, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=2048)
ids, mask = zoo._ids_and_padded_mask(2, 16)
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
    "tinyllama-1.1b": ("dynamo", 22, 32, 2048, "gpt_neox", True, "model"),
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
    n = layers if name == "llama3-8b-geometry" else default_layers
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


def run_model(name: str, path: Path, out: Path) -> list[dict]:
    exporter, layers, heads, hidden, kind, external, check = MODELS[name]
    ours = [PY, "-m", "attn_opt"]
    rows = []
    cmds = [("attn-opt inspect", ours + ["inspect", str(path)]),
            ("attn-opt --pass fuse", ours + [str(path), "--pass", "fuse", "--check", check, "-o", str(out / "fuse.onnx")]),
            ("attn-opt --pass sparse:window=256,sinks=4",
             ours + [str(path), "--pass", "sparse:window=256,sinks=4", "--check", check, "-o", str(out / "sparse.onnx")]),
            ("ORT transformer optimizer", [PY, "-c", ORT_OPT, str(path), str(out / "ort.onnx"), kind, str(heads), str(hidden)]),
            ("onnxscript optimize_for_ort", [PY, "-c", ONNXSCRIPT, str(path), str(out / "onnxscript.onnx")])]
    for tool, cmd in cmds:
        rep = out / "report.json"
        r = measured(cmd + (["--report", str(rep)] if "attn-opt --" in tool else []))
        if rep.exists():
            passes = json.loads(rep.read_text())["passes"]
            r["sites"] = len(passes[0]["sites_rewritten"])
        r.update(model=name, tool=tool, weights_mb=weights_mb(path), check=check if "attn-opt --" in tool else "")
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
        for f in out.iterdir():  # keep the disk for the next tool
            f.unlink()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "attn-opt" / "scale"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--llama8b-layers", type=int, default=4)
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
        rows += run_model(name, path, out)
    if args.build_only:
        return 0
    cols = ["model", "weights MB", "tool", "check", "s", "peak RSS MB", "sites", "rc"]
    table = [[r["model"], str(r["weights_mb"]), r["tool"], r["check"], f"{r['seconds']:.1f}", str(r["peak_mb"]),
              "-" if r["sites"] is None else str(r["sites"]), str(r["rc"]) + ("" if r["rc"] == 0 else f" ({r['tail']})")]
             for r in rows]
    write("pipeline_scale", "real-size models: attn-opt vs ORT optimizer vs onnxscript", cols, table, rows,
          preface=["# Real-size models through the pipeline", "",
                   "Wall time and peak RSS per command, each its own process, same files for every tool; "
                   "random weights with real geometry (benchmarks/pipeline_scale.py). attn-opt's commands "
                   "include every check (validity, one run per pass for fidelity, FLOPs); the peers check "
                   "nothing. Sites: attention ops in the peer's output.", ""],
          footer="rc -9: the process was killed by the kernel (out of memory on this 24 GB machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
