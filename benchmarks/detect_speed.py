"""Detection recall and time: `attn_opt.inspect` vs ONNX Runtime's transformer optimizer.

Both read the same exported files. ORT's sites are the attention ops in its output
(ONNX `Attention` and the com.microsoft attention ops), counted the same way for every
exporter, so a model that the exporter already fused counts for ORT too. Expected site
counts come from the zoo table. Writes benchmarks/results/detect_speed.{md,json}.

    python benchmarks/detect_speed.py            # the zoo x 3 exporters + a 24-layer BERT
    python benchmarks/detect_speed.py --quick    # a few models, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

import attn_opt
from attn_opt.tools import zoo

RESULTS = Path(__file__).parent / "results"
ORT_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt_neox", "vit": "vit", "t5": "t5", "torch": "bert"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
                 "SparseAttention", "DecoderAttention", "LongformerAttention"}


def deep_bert(layers: int = 24):
    """A 24-layer BERT (hidden 64, 4 heads): the 'large model' row."""

    def build():
        model = zoo._hf("BertModel", "BertConfig", "eager", vocab_size=zoo.VOCAB, hidden_size=64,
                        num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
        ids, mask = zoo._ids_and_padded_mask()
        return zoo._Text(model), (ids, mask), ("input_ids", "attention_mask")

    return build


def ort_sites(path: Path, family: str, heads: int, hidden: int) -> tuple[int | None, float, str]:
    from onnxruntime.transformers.optimizer import optimize_model

    t = time.perf_counter()
    try:
        m = optimize_model(str(path), model_type=ORT_TYPES[family], num_heads=heads, hidden_size=hidden,
                           opt_level=0)
    except Exception as e:  # the optimizer crashed on this export
        return None, time.perf_counter() - t, type(e).__name__
    dt = time.perf_counter() - t
    return sum(n.op_type in ATTENTION_OPS for n in m.model.graph.node), dt, ""


def ours(path: Path, repeat: int = 3) -> tuple[int, float]:
    times, n = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = len(attn_opt.inspect(str(path)).sites)
        times.append(time.perf_counter() - t)
    return n, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    names = ["bert-eager", "llama-sdpa", "t5-eager"] if args.quick else list(zoo.MODELS)
    cases = [(n, zoo.MODELS[n].build, zoo.MODELS[n].expected, 32) for n in names]  # zoo hidden size
    cases.append(("bert-24-layers", deep_bert(), zoo.Expected(24, 4, 4, (False,)), 64))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, expected, hidden in cases:
            zm = zoo.MODELS.get(name)
            for exporter in zoo.EXPORTERS:
                if zm is not None and exporter in zm.unsupported:
                    continue
                path = Path(tmp) / f"{name}-{exporter}.onnx"
                model, margs, inames = build()
                zoo.export_module(model, margs, inames, exporter, path)
                family = name.split("-")[0]
                n_ours, t_ours = ours(path)
                n_ort, t_ort, err = ort_sites(path, family, expected.heads, hidden)
                rows.append({"model": name, "exporter": exporter, "nodes": len(onnx.load(str(path)).graph.node),
                             "expected": expected.sites, "ours": n_ours, "ours_s": t_ours,
                             "ort": n_ort, "ort_s": t_ort, "ort_error": err})
                print(json.dumps(rows[-1]), file=sys.stderr)
    report(rows)
    return 0


def _recall(rows, key):
    exp = sum(r["expected"] for r in rows)
    got = sum(min(r[key] or 0, r["expected"]) for r in rows)
    return got / exp if exp else 0.0


def report(rows):
    t = Table(title="attention sites found: attn-opt vs ONNX Runtime transformer optimizer")
    for c in ("model", "exporter", "nodes", "expected", "attn-opt", "attn-opt s", "ORT", "ORT s"):
        t.add_column(c)
    for r in rows:
        ort = "crash" if r["ort"] is None else str(r["ort"])
        t.add_row(r["model"], r["exporter"], str(r["nodes"]), str(r["expected"]), str(r["ours"]),
                  f"{r['ours_s']:.3f}", ort, f"{r['ort_s']:.3f}")
    con = Console(width=140)
    con.print(t)
    lines = ["| exporter | attn-opt recall | ORT optimizer recall | attn-opt median s | ORT median s |", "|---|---|---|---|---|"]
    for exporter in zoo.EXPORTERS:
        rs = [r for r in rows if r["exporter"] == exporter]
        if rs:
            lines.append(f"| {exporter} | {_recall(rs, 'ours'):.0%} | {_recall(rs, 'ort'):.0%} | "
                         f"{statistics.median(r['ours_s'] for r in rs):.3f} | {statistics.median(r['ort_s'] for r in rs):.3f} |")
    summary = "\n".join(lines)
    con.print(summary)
    RESULTS.mkdir(exist_ok=True)
    md = ["# Detection: attn-opt vs ONNX Runtime transformer optimizer", "",
          "Recall = sites found / sites in the model (counted per model, capped at the expected count).",
          "ORT counts attention ops in its optimized output, so models the exporter already fused count for it.", "",
          summary, "", "| model | exporter | nodes | expected | attn-opt | attn-opt s | ORT | ORT s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['exporter']} | {r['nodes']} | {r['expected']} | {r['ours']} | "
                  f"{r['ours_s']:.3f} | {'crash: ' + r['ort_error'] if r['ort'] is None else r['ort']} | {r['ort_s']:.3f} |")
    (RESULTS / "detect_speed.md").write_text("\n".join(md) + "\n")
    (RESULTS / "detect_speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
