"""Dense vs `sparse:window=W` vs ONNX Runtime's GroupQueryAttention(local_window_size=W).

An attention-heavy causal model (4 layers, 8 heads of 64, pre-norm, no MLP) exported
once with a dynamic sequence axis; the three variants are rewrites of that one file and
run on the same inputs in ONNX Runtime's CPU provider. For each length: median latency,
attention FLOPs counted from each graph, the realized speedup over dense and the
analytic bound (dense FLOPs / FLOPs of only the pairs the window keeps), and the share
of the bound realized. Writes benchmarks/results/sparse_ort.{md,json}.

    python benchmarks/sparse_ort.py                  # 1024 2048 4096 8192
    python benchmarks/sparse_ort.py --lengths 1024 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import attn_opt
from attn_opt.backends.onnx.edit import MS, SiteEdit, ensure_opset, sweep
from attn_opt.passes.sparse import Sparse
from attn_opt.patterns.detect import detect
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.core.ir import onnx_flops
from attn_opt.tools import zoo

RESULTS = Path(__file__).parent / "results"
LAYERS, HEADS, HEAD_DIM = 4, 8, 64
D_MODEL = HEADS * HEAD_DIM


class CausalAttentionStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(nn.LayerNorm(D_MODEL) for _ in range(LAYERS))
        self.qkv = nn.ModuleList(nn.Linear(D_MODEL, 3 * D_MODEL) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(D_MODEL, D_MODEL) for _ in range(LAYERS))

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        hide = x.new_ones(t, t, dtype=torch.bool).triu(1)
        for norm, qkv, out in zip(self.norms, self.qkv, self.out):
            q, k, v = qkv(norm(x)).view(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
            s = (q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5
            p = s.masked_fill(hide, float("-inf")).softmax(-1)
            x = x + out((p @ v).transpose(1, 2).reshape(b, t, D_MODEL))
        return x


def gqa_local_window(proto: onnx.ModelProto, window: int) -> onnx.ModelProto:
    """Each site as com.microsoft.GroupQueryAttention with local_window_size (the peer)."""
    _, model, gv = onnx_adapter.load_view(proto)
    for site in detect(gv).sites:
        e = SiteEdit(model, site, "gqa")
        ensure_opset(model, MS, 1)
        q, k, v = (e.op("Reshape", [e.op("Transpose", [e.bhsd(op)], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])
                   for op in (site.q, site.k, site.v))
        t = e.shape_dim(q, 1)
        seqlens = e.op("Cast", [e.op("Expand", [e.op("Sub", [t, e.ints(1)]), e.shape_dim(q, 0)])], {"to": 6})
        total = e.op("Cast", [e.op("Squeeze", [t, e.ints(0)])], {"to": 6})
        o = e.op("GroupQueryAttention", [q, k, v, None, None, seqlens, total],
                 {"num_heads": site.heads, "kv_num_heads": site.kv_heads, "scale": float(site.scale),
                  "local_window_size": window}, domain=MS, outputs=3)[0]
        e.commit(e.op("Transpose", [e.op("Reshape", [o, e.ints(0, 0, site.heads, -1)])], {"perm": [0, 2, 1, 3]}))
    sweep(model)
    return onnx_adapter.ir.serde.serialize_model(model)


def latency(proto: onnx.ModelProto, feeds: dict, repeat: int) -> tuple[float, np.ndarray]:
    sess = onnx_adapter.session(proto)
    out = sess.run(None, feeds)[0]
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.onnx"
        x = torch.randn(1, 16, D_MODEL)  # the sequence axis is exported dynamic
        zoo.export_module(CausalAttentionStack().eval(), (x,), ("x",), "dynamo", path)
        dense = onnx.load(str(path))
    sparse_spec = Sparse(window=args.window)
    t0 = min(args.lengths)  # the lowering is chosen by cost at this length (banded where it pays)
    at = {"x": np.zeros((1, t0, D_MODEL), np.float32)}
    sparse, rep = attn_opt.optimize(dense, [sparse_spec], feeds=at, check="none", force=True)
    rewritten, skipped, notes = rep.passes[0].sites_rewritten, rep.passes[0].sites_skipped, rep.passes[0].notes
    assert len(rewritten) == LAYERS, skipped
    peer = gqa_local_window(dense, args.window)
    form = sparse_spec.pattern(type("S", (), {"causal": True})())
    rows = []
    for t in args.lengths:
        feeds = {"x": np.random.default_rng(0).standard_normal((1, t, D_MODEL)).astype(np.float32)}
        det = detect(onnx_adapter.load_view(dense)[2])
        covered = {n for s in det.sites for n in s.nodes}
        f_dense = onnx_flops.count(dense, feeds, covered)
        f_sparse = onnx_flops.count(sparse, feeds)
        f_peer = onnx_flops.count(peer, feeds)
        kept = int(form.visible(t).sum())  # pairs the causal window keeps
        per_pair = LAYERS * HEADS * 2 * (2 * HEAD_DIM)  # FLOPs of Q·Kᵀ and P·V per kept (query, key) pair
        bound_attn = f_dense.attention_matmul / (kept * per_pair)
        bound_model = f_dense.matmul / (f_dense.matmul - f_dense.attention_matmul + kept * per_pair)
        t_dense, o_dense = latency(dense, feeds, args.repeat)
        t_sparse, o_sparse = latency(sparse, feeds, args.repeat)
        t_peer, o_peer = latency(peer, feeds, args.repeat)
        speedup = t_dense / t_sparse
        rows.append({"T": t, "dense_ms": t_dense * 1e3, "sparse_ms": t_sparse * 1e3, "ort_local_window_ms": t_peer * 1e3,
                     "attn_gflops_dense": f_dense.attention / 1e9, "attn_gflops_sparse": f_sparse.attention / 1e9,
                     "attn_gflops_ort_local_window": f_peer.attention / 1e9,
                     "speedup": speedup, "peer_speedup": t_dense / t_peer,
                     "bound_model": bound_model, "bound_attention": bound_attn,
                     "realized_of_bound": speedup / bound_model,
                     "max_diff_sparse_vs_peer": float(np.abs(o_sparse - o_peer).max())})
        print(json.dumps(rows[-1]), file=sys.stderr)
    report(rows, args.window, form.describe())
    return 0


def report(rows, window: int, form: str) -> None:
    cols = ["T", "dense ms", "sparse ms", "ORT local-window ms", "attn GFLOP dense", "attn GFLOP sparse",
            "attn GFLOP ORT lw", "speedup", "ORT lw speedup", "bound (model)", "bound (attn)", "realized/bound",
            "|sparse-ORT lw|"]
    t = Table(title=f"causal window {window}: dense vs attn-opt sparse vs ORT GroupQueryAttention local_window_size")
    for c in cols:
        t.add_column(c)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [str(r["T"]), f"{r['dense_ms']:.1f}", f"{r['sparse_ms']:.1f}", f"{r['ort_local_window_ms']:.1f}",
                f"{r['attn_gflops_dense']:.2f}", f"{r['attn_gflops_sparse']:.2f}", f"{r['attn_gflops_ort_local_window']:.2f}",
                f"{r['speedup']:.2f}x", f"{r['peer_speedup']:.2f}x", f"{r['bound_model']:.2f}x",
                f"{r['bound_attention']:.2f}x", f"{r['realized_of_bound']:.0%}", f"{r['max_diff_sparse_vs_peer']:.1e}"]
        t.add_row(*vals)
        lines.append("| " + " | ".join(vals) + " |")
    Console(width=200).print(t)
    RESULTS.mkdir(exist_ok=True)
    md = [f"# sparse:window={window} in ONNX Runtime (CPU, {torch.get_num_threads()} threads)", "",
          f"Model: {LAYERS} causal attention layers, {HEADS} heads of {HEAD_DIM}, batch 1. Lowering: {form}.",
          "bound (model) = dense model matrix FLOPs / model matrix FLOPs if only the kept pairs were computed;",
          "realized/bound = measured speedup / bound (model). ORT lw = GroupQueryAttention local_window_size.", ""]
    (RESULTS / "sparse_ort.md").write_text("\n".join(md + lines) + "\n")
    (RESULTS / "sparse_ort.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
