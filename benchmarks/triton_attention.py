"""The Triton attention kernel on a CUDA GPU: dense and windowed forms against
torch's scaled_dot_product_attention and FlexAttention with the equivalent block mask.
Prints TFLOP/s (of the pairs each variant keeps) and the fraction of the analytic
speedup realized; writes benchmarks/results/triton_attention.{md,json}.
On a machine without CUDA it says so and exits 0.

    python benchmarks/triton_attention.py [--lengths 4096 8192 16384] [--window 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeat=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: the Triton kernel benchmark needs a GPU; nothing measured")
        return 0
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attn_opt.backends.triton.launcher import attention
    from attn_opt.patterns.form import Pattern

    rows, h, d, w = [], args.heads, args.head_dim, args.window
    for t in args.lengths:
        q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.float16) for _ in range(3))
        kept_dense = t * (t + 1) / 2
        kept_window = sum(min(i + 1, w) for i in range(t))
        flop = lambda pairs: 4 * h * pairs * d  # noqa: E731  Q·Kᵀ and P·V per kept pair
        mask = create_block_mask(lambda b, hh, i, j: (i >= j) & (i - j < w), 1, h, t, t, device="cuda")
        flex = torch.compile(flex_attention)
        res = {
            "sdpa causal": timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "triton causal": timed(lambda: attention(q, k, v, causal=True, block_m=64, block_n=64)),
            "flex causal window": timed(lambda: flex(q, k, v, block_mask=mask)),
            "triton causal window": timed(lambda: attention(q, k, v, causal=True, pattern=Pattern("window", True, w, 64),
                                                           block_m=64, block_n=64)),
        }
        bound = kept_dense / kept_window
        row = {"T": t, **{f"{k_} s": s for k_, s in res.items()},
               "triton window TFLOP/s": flop(kept_window) / res["triton causal window"] / 1e12,
               "analytic speedup": bound, "realized speedup": res["triton causal"] / res["triton causal window"]}
        row["realized / analytic"] = row["realized speedup"] / bound
        rows.append(row)
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triton_attention.json").write_text(json.dumps(rows, indent=1))
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / "triton_attention.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
