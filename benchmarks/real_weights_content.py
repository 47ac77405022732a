"""Content-based sparse attention on real pretrained weights: the fidelity-vs-attention-FLOPs
curve of sparse:topk (HiP-style block top-k) and sparse:pyramid (PSA pooled levels)
(patterns/form.py: Selection) next to the
fixed patterns (window, window + sinks) on all-MiniLM-L6-v2 (the packaged weights and
the installed-documentation sentences of benchmarks/real_weights.py; nothing is fetched).

Two input sets: the sentences one by one (short, padded), and the same sentences
concatenated in groups so each text reaches a few hundred tokens. Per form: the Spearman
correlation of all pairwise text similarities with the original model's, uncalibrated,
and the attention FLOPs counted from the rewritten graph (the selection's pooling and
block scores included: every node the pass emits counts as attention). Writes
benchmarks/results/real_weights_content.{md,json,png}.

    nice -n 10 python benchmarks/real_weights_content.py [--sentences 128] [--group 8]
    (or the two sets apart: --only short, --only long, then --merge)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from _report import RESULTS, write
from real_weights import Encoder, embed, load_minilm, sentences, spearman

import attn_opt
from attn_opt import passes
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.patterns.form import Pattern, Selection
from attn_opt.tools import zoo

def fixed_specs(length: int) -> dict[str, list[str]]:
    ws = (16, 32, 64) if length < 128 else (32, 64, 128)
    return {"window": [f"sparse:window={w}" for w in ws], "window + sinks": [f"sparse:window={w},sinks=1" for w in ws]}


def content_specs(length: int) -> dict[str, list[str]]:
    """topk curves at one block size (8 on short texts, 16 and 8 on long ones), the first
    token's block always kept (sinks=1), with and without the local band (window=1 on
    short texts: the query's own block; 16 on long ones: it and its neighbours): every
    K whose kept keys stay within half the (padded) sequence, at most four per curve. The
    pyramid once per set (this export's [B,1,T,T] mask: refused in words)."""
    block, band = (8, 1) if length < 128 else (16, 16)
    out = {}
    for family, extra in ((f"topk, block {block}, sink", ""), (f"topk, block {block}, sink + band {band}",
                                                                f",window={band}")):
        forced = Pattern("topk", False, band if extra else 0, block, sinks=1,
                         selection=Selection("topk", 1)).forced_count()
        ks = [k for k in range(1, length // block) if (k + forced) * block <= 0.5 * length]
        ks = ks[::max(1, -(-len(ks) // 4))]
        out[family] = [f"sparse:topk={k},block={block},sinks=1{extra}" for k in ks]
    if length >= 128:  # finer blocks on long texts: 8 tokens, band 8 (the query's block and its neighbours) or 1
        out["topk, block 8, sink + band 8"] = [f"sparse:topk={k},block=8,sinks=1,window=8" for k in (1, 2, 4, 8, 12)]
        out["topk, block 8, sink + own block"] = [f"sparse:topk={k},block=8,sinks=1,window=1" for k in (3, 6)]
    out[f"pyramid 1, block {block}, sink"] = [f"sparse:pyramid=1,topk=1,block={block},sinks=1"]
    return out


def export(bert, feeds: dict, path: Path) -> onnx.ModelProto:
    ids = torch.from_numpy(feeds["input_ids"][:2, :16])
    zoo.export_module(Encoder(bert), (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), "dynamo", path)
    return onnx.load(str(path))


def curve(proto, feeds, specs: dict[str, list[str]], label: str) -> list[dict]:
    base = onnx_adapter.run(proto, feeds)
    ref = embed(list(base.values())[0], feeds["attention_mask"])
    iu = np.triu_indices(len(ref), 1)
    ref_sim = (ref @ ref.T)[iu]
    rows = []
    for family, group in specs.items():
        for spec in group:
            few = {k: v[:2] for k, v in feeds.items()}  # the same length: the FLOP ratio does not depend on the batch
            out, report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=few, force=True, check="none")
            p = report.passes[0]
            e = embed(list(onnx_adapter.run(out, feeds).values())[0], feeds["attention_mask"])
            rows.append({"inputs": label, "family": family, "form": spec, "spearman": spearman(ref_sim, (e @ e.T)[iu]),
                         "cosine": float(np.mean(np.sum(e * ref, -1))), "attention_flops": p.attention_flops_after,
                         "dense_attention_flops": p.attention_flops_before,
                         "skipped": [s.reason for s in p.sites_skipped][:1]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def best_at(rows, family_pick, budget: float) -> dict | None:
    ok = [r for r in rows if family_pick(r["family"]) and r["attention_flops"] <= budget * r["dense_attention_flops"]]
    return max(ok, key=lambda r: r["spearman"], default=None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--group", type=int, default=8, help="sentences concatenated per long text")
    ap.add_argument("--skip", type=int, default=0,
                    help="held-out texts: skip the first SKIP sentences (sets labelled 'short, held-out', …)")
    ap.add_argument("--only", choices=("short", "long"), help="one input set (results/…_SET.json); --merge joins them")
    ap.add_argument("--merge", action="store_true", help="write the table and plot from the --only runs")
    ap.add_argument("--forms", help="with --only: these specs (';'-separated, family 'FAMILY=spec;...') instead")
    ap.add_argument("--tag", default="", help="with --only: results/real_weights_content_SET[_TAG].json")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("real_weights_content_*.json"))]
        shapes = {p["rows"][0]["inputs"]: tuple(p["shape"]) for p in parts if p["rows"]}
        report([r for p in parts for r in p["rows"]], dict(sorted(shapes.items(), reverse=True)))
        return 0
    tok, bert = load_minilm()
    text = sentences(args.skip + args.sentences)[args.skip:]
    long_text = [" ".join(text[i:i + args.group]) for i in range(0, len(text) - args.group + 1, args.group)]
    rows, shapes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        proto = None
        for label, texts, cap in (("short", text, 128), ("long", long_text, 512)):
            if args.only and label != args.only:
                continue
            enc = tok(texts, padding=True, truncation=True, max_length=cap, return_tensors="np")
            feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                     "attention_mask": enc["attention_mask"].astype(np.int64)}
            proto = proto or export(bert, feeds, Path(tmp) / "minilm.onnx")
            length = feeds["input_ids"].shape[1]
            name = label + (", held-out" if args.skip else "")
            shapes[name] = (len(texts), length, float(feeds["attention_mask"].sum(1).mean()))
            specs = fixed_specs(length) | content_specs(length)
            if args.forms:
                specs = {}
                for item in args.forms.split(";"):
                    family, spec = item.split("=", 1)
                    specs.setdefault(family, []).append(spec)
            rows += curve(proto, feeds, specs, name)
    if args.only:
        RESULTS.mkdir(exist_ok=True)
        tag = args.tag or ("heldout" if args.skip else "")
        (RESULTS / f"real_weights_content_{args.only}{'_' + tag if tag else ''}.json").write_text(
            json.dumps({"rows": rows, "shape": next(iter(shapes.values())), "skip": args.skip}, indent=1))
        return 0
    report(rows, shapes)
    return 0


def report(rows, shapes) -> None:
    refused = [f"- {r['inputs']}: {r['form']} rewrote nothing: {r['skipped'][0]}" for r in rows if r.get("skipped")]
    rows = [r for r in rows if not r.get("skipped")]
    cols = ["inputs", "form", "Spearman", "cosine", "attention FLOPs vs dense"]
    table = [[r["inputs"], r["form"], f"{r['spearman']:.4f}", f"{r['cosine']:.4f}",
              f"{r['attention_flops'] / r['dense_attention_flops']:.3f}"] for r in rows]
    verdict = []
    for label in shapes:
        mine = [r for r in rows if r["inputs"] == label]
        for budget in (0.25, 0.5):
            fixed = best_at(mine, lambda f: f.startswith("window"), budget)
            content = best_at(mine, lambda f: not f.startswith("window"), budget)
            verdict.append(f"- {label}, ≤ {budget}× dense attention FLOPs: best fixed "
                           + (f"{fixed['form']} {fixed['spearman']:.4f}" if fixed else "none")
                           + "; best content " + (f"{content['form']} {content['spearman']:.4f}" if content else "none"))
        lost = []  # every fixed point on the curve: the best content form at no more FLOPs
        for r in (r for r in mine if r["family"].startswith("window")):
            budget = r["attention_flops"] / r["dense_attention_flops"]
            content = best_at(mine, lambda f: not f.startswith("window"), budget)
            if content is None or content["spearman"] <= r["spearman"]:
                lost.append(f"{r['form']} {r['spearman']:.4f} at {budget:.3f}×")
        verdict.append(f"- {label}: " + ("a content form at no more FLOPs beats every fixed point on the curve"
                                         if not lost else "fixed points no content form beats: " + "; ".join(lost)))
    preface = ["# Content-based sparse attention on real weights: all-MiniLM-L6-v2", "",
               "Inputs: " + "; ".join(f"{k}: {n} texts padded to {t} tokens (mean {m:.0f} real)"
                                      for k, (n, t, m) in shapes.items()) + ".",
               "Spearman: rank correlation of all pairwise text similarities with the original's (uncalibrated).",
               "Attention FLOPs counted from each rewritten graph, the selection's own nodes included.", ""] + verdict + [""] + refused
    preface += [""] if refused else []
    write("real_weights_content", "all-MiniLM-L6-v2: content-based vs fixed sparse patterns", cols, table, rows,
          preface, "![fidelity vs attention FLOPs](real_weights_content.png)")
    plot(rows, shapes)


def plot(rows, shapes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, label in zip(axes[0], shapes):
        mine = [r for r in rows if r["inputs"] == label]
        for family in dict.fromkeys(r["family"] for r in mine):
            pts = sorted((r["attention_flops"] / r["dense_attention_flops"], r["spearman"]) for r in mine
                         if r["family"] == family)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if family.startswith("window") else "o",
                    linestyle="--" if family.startswith("window") else "-", label=family)
        ax.axvline(0.5, color="grey", linewidth=0.8)
        ax.axhline(0.97, color="grey", linewidth=0.8, linestyle=":")
        n, t, _ = shapes[label]
        ax.set_title(f"{label}: {n} texts, {t} tokens")
        ax.set_xlabel("attention FLOPs / dense (selection included)")
        ax.set_ylabel("Spearman vs original")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "real_weights_content.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
