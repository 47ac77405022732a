"""Dense vs `sparse:topk` (content-based block top-k, a 1/8 kept fraction) in ONNX Runtime's
CPU provider, on the attention-heavy stack of benchmarks/sparse_ort.py (4 layers, 8 heads
of 64, no MLP), bidirectional and causal, each exported once with a dynamic sequence axis.

Per length: the rewrite keeps C = T/(8·block) key blocks per query block (its own block
forced, window=1, plus the best topk = C − 1); the median latency of dense and top-k,
timed interleaved in one run; the matrix FLOPs counted from each graph (the selection's
block scores included); the FLOP bound (dense matrix FLOPs / top-k matrix FLOPs) and the
share of it realized. Writes benchmarks/results/content_ort.{md,json}.

    nice -n 10 python benchmarks/content_ort.py --lengths 1024 2048 4096 [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from _report import write
from sparse_ort import D_MODEL, CausalAttentionStack

import attn_opt
from attn_opt import passes
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.core.ir import onnx_flops
from attn_opt.tools import zoo


class BidirectionalAttentionStack(CausalAttentionStack):
    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        for norm, qkv, out in zip(self.norms, self.qkv, self.out):
            q, k, v = qkv(norm(x)).view(b, t, 3, 8, 64).permute(2, 0, 3, 1, 4)
            p = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
            x = x + out((p @ v).transpose(1, 2).reshape(b, t, D_MODEL))
        return x


def interleaved(sessions: dict, feeds: dict, repeat: int) -> dict[str, float]:
    """Median seconds per session, the sessions run in turn each round (drift hits all alike)."""
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)  # warm-up
    for _ in range(repeat):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--name", default="content_ort", help="results/NAME.{md,json}")
    args = ap.parse_args()
    rows = []
    for kind, module in (("bidirectional", BidirectionalAttentionStack), ("causal", CausalAttentionStack)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "dense.onnx"
            zoo.export_module(module().eval(), (torch.randn(1, 16, D_MODEL),), ("x",), "dynamo", path)
            dense = onnx.load(str(path))
        for t in args.lengths:
            kept = max(1, t // args.block // 8)
            spec = f"sparse:topk={max(1, kept - 1)},block={args.block},window=1"
            feeds = {"x": np.random.default_rng(0).standard_normal((1, t, D_MODEL)).astype(np.float32)}
            sparse, rep = attn_opt.optimize(dense, [passes.parse(spec)], feeds=feeds, check="none", force=True)
            assert len(rep.passes[0].sites_rewritten) == 4, rep.passes[0].sites_skipped
            f_dense, f_sparse = onnx_flops.count(dense, feeds), onnx_flops.count(sparse, feeds)
            sec = interleaved({"dense": onnx_adapter.session(dense), "topk": onnx_adapter.session(sparse)}, feeds,
                              args.repeat)
            bound = f_dense.matmul / f_sparse.matmul
            speedup = sec["dense"] / sec["topk"]
            rows.append({"attention": kind, "T": t, "form": spec, "kept_fraction": kept * args.block / t,
                         "dense_ms": sec["dense"] * 1e3, "topk_ms": sec["topk"] * 1e3,
                         "gflop_dense": f_dense.matmul / 1e9, "gflop_topk": f_sparse.matmul / 1e9,
                         "selection_gflop": f_sparse.selection_matmul / 1e9, "speedup": speedup, "bound": bound,
                         "realized_of_bound": speedup / bound})
            print(json.dumps(rows[-1]), file=sys.stderr)
    cols = ["attention", "T", "form", "dense ms", "top-k ms", "GFLOP dense", "GFLOP top-k (selection)", "speedup",
            "FLOP bound", "realized/bound"]
    table = [[r["attention"], str(r["T"]), r["form"], f"{r['dense_ms']:.1f}", f"{r['topk_ms']:.1f}",
              f"{r['gflop_dense']:.2f}", f"{r['gflop_topk']:.2f} ({r['selection_gflop']:.3f})", f"{r['speedup']:.2f}x",
              f"{r['bound']:.2f}x", f"{r['realized_of_bound']:.0%}"] for r in rows]
    load = os.getloadavg()[0]
    write(args.name, "sparse:topk (1/8 of the key blocks) vs dense in ONNX Runtime (CPU)", cols, table, rows,
          [f"# sparse:topk in ONNX Runtime (CPU, {torch.get_num_threads()} threads, load average {load:.1f})", "",
           "Model: 4 attention layers, 8 heads of 64, batch 1, no MLP. FLOPs: matrix products counted from each",
           "graph, the selection's block scores included. Bound: dense / top-k matrix FLOPs; realized/bound:",
           "measured speedup / bound. Latencies are medians, dense and top-k timed in turn each round.", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
