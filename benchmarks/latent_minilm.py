"""latent's fidelity-vs-rank curve on the pretrained all-MiniLM-L6-v2 (an encoder: 6 layers,
12 heads of 32, hidden 384; the joint K/V projection is 384 x 768, full rank 384).

For each rank R: the latent rewrite from an SVD of the weights alone, and with
`--calibrate` (the SVD of the projections' activations on 48 other sentences); sentence
embedding cosine to the original (mean over sentences) and the Spearman correlation of
all pairwise similarities with the original's, on the 48 evaluation sentences
(benchmarks/real_weights.py's text and metrics, next to the other forms' curves there).
"K/V values per token" is what a decoder step would cache per layer: R against 2·H·d.
Writes benchmarks/results/latent_minilm.{md,json}.

    python benchmarks/latent_minilm.py
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
from _report import write
from real_weights import Encoder, embed, load_minilm, sentences, spearman

import attn_opt
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.tools import zoo

RANKS = (384, 192, 96, 48)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=48)
    ap.add_argument("--ranks", type=int, nargs="*", default=list(RANKS))
    args = ap.parse_args()
    tok, bert = load_minilm()
    text = sentences(2 * args.sentences)
    evaluate, calibrate = text[:args.sentences], text[args.sentences:]

    def tokens(batch):
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    feeds, cal = tokens(evaluate), tokens(calibrate)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        ids = torch.from_numpy(feeds["input_ids"][:2, :16])
        zoo.export_module(Encoder(bert), (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), "dynamo", path)
        proto = onnx.load(str(path))
    ref = embed(list(onnx_adapter.run(proto, feeds).values())[0], feeds["attention_mask"])
    iu = np.triu_indices(len(evaluate), 1)
    ref_sim = (ref @ ref.T)[iu]
    heads, d = bert.config.num_attention_heads, bert.config.hidden_size // bert.config.num_attention_heads
    rows = []
    for rank in args.ranks:
        for fit in ("weights", "calibrated"):
            out, report = attn_opt.optimize(proto, [f"latent:rank={rank}"], feeds=feeds, force=True,
                                            calibrate=cal if fit == "calibrated" else None,
                                            check="model" if fit == "calibrated" else "none")  # --calibrate runs it
            p = report.passes[0]
            assert len(p.sites_rewritten) == 6, p.sites_skipped
            e = embed(list(onnx_adapter.run(out, feeds).values())[0], feeds["attention_mask"])
            rows.append({"rank": rank, "svd": fit, "cosine": float(np.mean(np.sum(e * ref, -1))),
                         "spearman": spearman(ref_sim, (e @ e.T)[iu]), "kv_per_token": rank,
                         "dense_kv_per_token": 2 * heads * d,
                         "params_after": p.params_after, "params_before": p.params_before})
            print(json.dumps(rows[-1]), file=sys.stderr)
    table = [[str(r["rank"]), r["svd"], f"{r['cosine']:.4f}", f"{r['spearman']:.4f}",
              f"{r['kv_per_token']} / {r['dense_kv_per_token']} ({r['kv_per_token'] / r['dense_kv_per_token']:.0%})",
              f"{r['params_after'] / r['params_before']:.3f}"] for r in rows]
    write("latent_minilm", f"latent on all-MiniLM-L6-v2, {len(evaluate)} sentences",
          ["rank R", "SVD of", "embedding cosine", "Spearman", "K/V values per token", "params vs dense"], table,
          {"rows": rows},
          preface=[f"# latent: fidelity vs rank on all-MiniLM-L6-v2\n",
                   f"Evaluation: {len(evaluate)} sentences padded to {feeds['input_ids'].shape[1]} tokens; calibration: "
                   f"{len(calibrate)} other sentences. Spearman: rank correlation of all pairwise sentence similarities "
                   "with the original's (as benchmarks/results/real_weights.md). Full rank 384 is exact.\n"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
