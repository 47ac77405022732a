"""stream's two position schemes against the dense cache, on the trained decoder.

The trained byte-level LLaMA (`zoo.TRAINED["llama-bytes"]`, tools/train_decoder.py: 4 layers,
8 heads, 2 kv heads, trained at a 256-byte context) is exported as a decoder step and
rewritten with `stream:sinks=S,window=W,positions=original|cache` for several windows.
Every model reads the same held-out text (standard-library files the training never saw),
teacher-forced one byte per step through its cache as a generation loop runs
(pipeline/onnx_decode.py: teacher_forced): next-byte NLL in nats/byte, top-1 agreement with
the dense step, split at the trained context (positions < 256 and >= 256). Writes
benchmarks/results/stream_positions.{md,json}.

    python benchmarks/stream_positions.py [--segments 4] [--length 640] [--windows 32 64 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import write

import attn_opt
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.pipeline.onnx_decode import forced_quality, loop_of, teacher_forced
from attn_opt.tools import train_decoder, zoo


def held_out_tokens(segments: int, length: int) -> np.ndarray:
    """[segments, length] bytes of held-out text at evenly spaced offsets."""
    text = np.frombuffer(train_decoder.held_out_text(), np.uint8).astype(np.int64)
    step = (len(text) - length) // segments
    return np.stack([text[i * step: i * step + length] for i in range(segments)])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--length", type=int, default=640)
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--sinks", type=int, default=4)
    args = ap.parse_args()
    split = train_decoder.CONTEXT
    tmp = Path(tempfile.mkdtemp())
    src = zoo.export_trained("llama-bytes", "torchscript", tmp / "dense.onnx")
    tokens = held_out_tokens(args.segments, args.length)
    om, _, gv = onnx_adapter.load_view(str(src))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    dense = teacher_forced(om, loop, tokens)
    rows, records = [], []

    def add(window, positions, f, q):
        a, b, c = q["all"], q["before"], q["after"]
        rec = {"window": window, "positions": positions, **{f"{k}_{m}": v for k, d in q.items() for m, v in d.items()},
               "cache_bytes": f.cache_bytes}
        records.append(rec)
        rows.append([str(window), positions, f"{a['nll']:.4f}", f"{b['nll']:.4f}", f"{c['nll']:.4f}",
                     f"{a.get('agreement', 1.0):.3f}", f"{c.get('agreement', 1.0):.3f}", f"{a['top1']:.3f}",
                     f"{f.cache_bytes / 1024:.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)

    add("-", "dense", dense, forced_quality(dense, None, split))
    for window in args.windows:
        for positions in ("original", "cache"):
            out = tmp / f"s{window}{positions}.onnx"
            spec = f"stream:sinks={args.sinks},window={window},positions={positions}"
            attn_opt.optimize(str(src), [spec], force=True)[0].save(str(out))
            f = teacher_forced(onnx_adapter.load(str(out)), loop, tokens)
            add(window, positions, f, forced_quality(f, dense, split))
    by = {(r["window"], r["positions"]): r for r in records}
    verdict = []
    for window in args.windows:
        o, c = by[(window, "original")], by[(window, "cache")]
        for part, what in (("before", f"positions < {split}"), ("after", f"positions >= {split}")):
            d = o[f"{part}_nll"] - c[f"{part}_nll"]
            verdict.append(f"window {window}, {what}: positions=cache {'better' if d > 0 else 'worse'} by "
                           f"{abs(d):.4f} nats/byte")
    preface = ["# stream on the trained decoder: positions=original vs positions=cache", "",
               f"`llama-bytes` (trained at a {split}-byte context), TorchScript export, ONNX Runtime CPU. "
               f"{args.segments} held-out segments of {args.length} bytes, teacher-forced one byte per step through "
               f"the cache ({tokens[:, 1:].size} scored bytes); stream with {args.sinks} sinks. NLL in nats/byte "
               f"(uniform: {np.log(256):.3f}); agreement: top-1 equal to the dense step's; top-1: equal to the text; "
               "cache after the last step.", "", *[f"- {v}" for v in verdict], ""]
    cols = ["window", "positions", "NLL", f"NLL <{split}", f"NLL >={split}", "agreement", f"agreement >={split}",
            "top-1", "cache KiB"]
    write("stream_positions", "stream positions vs dense on the trained decoder", cols, rows, records, preface)
    for v in verdict:
        print(v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
