"""stream's two position schemes against the dense cache, over a long greedy generation.

A LLaMA-shaped decoder step (random weights: no causal LM ships its weights in a package
usable offline here) is rewritten with `stream:sinks=S,window=W,positions=original|cache`
for several windows; `generate --compare` runs the dense step's greedy path and the
streaming step teacher-forced on it: the share of steps where the streaming step would
pick the dense one's token, and the mean per-step logit error (relative to the step's
largest logit). Writes benchmarks/results/stream_positions.{md,json}.

    python benchmarks/stream_positions.py [--tokens 300] [--windows 32 64 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import write

import attn_opt
from attn_opt.tools import generate, zoo

CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=256, max_position_embeddings=4096)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    src = zoo.export_decoder_step("llama", "torchscript", tmp / "dense.onnx", **CONFIG)
    prompt = np.random.default_rng(0).integers(1, zoo.VOCAB, (1, args.prompt))
    np.save(tmp / "p.npy", prompt)
    rows, records = [], []
    for window in args.windows:
        for positions in ("original", "cache"):
            out = tmp / f"s{window}{positions}.onnx"
            spec = f"stream:sinks={args.sinks},window={window},positions={positions}"
            attn_opt.optimize(str(src), [spec], force=True)[0].save(str(out))
            r = generate.run(str(src), str(tmp / "p.npy"), args.tokens, str(out))["compare"]
            rec = {"window": window, "positions": positions, "token_agreement": r["token_agreement"],
                   "mean_rel_error": float(np.mean(r["per_step_error"])), "cache_bytes": r["cache_bytes"]}
            records.append(rec)
            rows.append([str(window), positions, f"{rec['token_agreement']:.3f}", f"{rec['mean_rel_error']:.4f}",
                         f"{rec['cache_bytes'] / 1024:.0f}"])
            print(rows[-1], file=sys.stderr)
    preface = ["# stream: positions=original vs positions=cache", "",
               f"LLaMA-shaped step ({CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} heads, "
               f"{CONFIG['num_key_value_heads']} kv heads, hidden {CONFIG['hidden_size']}, random weights), prompt "
               f"{args.prompt} tokens, {args.tokens} greedy tokens, {args.sinks} sinks. Agreement: the share of steps "
               "where the streaming step picks the dense step's token on the dense path; error: mean over steps of "
               "max|Δlogit| / max|logit|.", ""]
    write("stream_positions", "stream positions vs dense", ["window", "positions", "token agreement",
                                                              "mean logit error", "cache KiB"], rows, records, preface)
    return 0


if __name__ == "__main__":
    sys.exit(main())
