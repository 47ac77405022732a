"""Decoding with a dense KV cache vs stream:sinks=4,window=1024, in ONNX Runtime.

A LLaMA-shaped decoder step (4 layers, 8 heads of 64, 2 key/value heads, random
weights), exported by the TorchScript exporter, and the same step after
`stream:sinks=4,window=1024`. For each total length L the loop starts from a cache of
L - 1 positions (random values: the cost of a step does not depend on them) and decodes
16 tokens, feeding each step's present back as the next past, as a generation loop
does. Per model and length: the median ms per decoded token, the cache bytes after the
last step, and the peak resident memory while decoding above what the process held
before loading the model (each model and length in its own process). Writes benchmarks/results/decode_stream.{md,json}.

ONNX Runtime's GroupQueryAttention with `local_window_size` is not measured: attn-opt's
fuse does not emit GroupQueryAttention with a past cache yet, and that op still computes
the full Q·Kᵀ over its cache on the CPU.

    python benchmarks/decode_stream.py --lengths 1024 4096 16384 32768
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import write

CONFIG = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1408, vocab_size=1024, max_position_embeddings=65536)
SINKS, WINDOW, STEPS = 4, 1024, 16


def build(folder: Path) -> tuple[Path, Path]:
    """The dense step and its streaming rewrite."""
    from attn_opt import optimize
    from attn_opt.tools import zoo

    dense, stream = folder / "dense.onnx", folder / "stream.onnx"
    zoo.export_decoder_step("llama", "torchscript", dense, **CONFIG)
    out, report = optimize(str(dense), [f"stream:sinks={SINKS},window={WINDOW}"])
    assert report.passes[0].sites_rewritten, report.passes[0].sites_skipped
    out.save(stream)
    return dense, stream


def one(model: str, length: int) -> dict:
    """Decode STEPS tokens after a cache of length - 1 (capped as the model caps it)."""
    import psutil

    from attn_opt.rewriter.ir import onnx as onnx_adapter
    from attn_opt.rewriter.ir.onnx_decode import Stepper, loop_of

    proc = psutil.Process()
    base = proc.memory_info().rss
    om, _, gv = onnx_adapter.load_view(model)
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    s = Stepper(om, loop)
    kept = min(length - 1, SINKS + WINDOW) if "stream" in Path(model).name else length - 1
    rng = np.random.default_rng(0)
    cache = {past: rng.standard_normal((1, shape[1], kept, shape[3])).astype(np.float32)
             for past, (shape, _) in loop.pasts.items()}
    done, token, times, peak = length - 1, np.array([[7]]), [], 0
    for _ in range(STEPS):
        t0 = time.perf_counter()
        logits, cache = s.step(token, cache, done)
        times.append(time.perf_counter() - t0)
        peak = max(peak, proc.memory_info().rss)
        token, done = logits[:, -1].argmax(-1)[:, None], done + 1
    return {"ms_per_token": statistics.median(times) * 1e3, "cache_bytes": sum(int(v.nbytes) for v in cache.values()),
            "loop_rss_mb": (peak - base) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
        for length in args.lengths:
            got = {}
            for m in models:
                r = subprocess.run([sys.executable, __file__, "--one", str(m), str(length)], capture_output=True,
                                   text=True, check=True)
                got[m.stem] = json.loads(r.stdout.strip().splitlines()[-1])
            d, s = got["dense"], got["stream"]
            records.append({"length": length, **{f"{k}_{m}": v for m, g in got.items() for k, v in g.items()}})
            rows.append([str(length), f"{d['ms_per_token']:.2f}", f"{s['ms_per_token']:.2f}",
                         f"{d['cache_bytes'] / 2**20:.1f}", f"{s['cache_bytes'] / 2**20:.1f}",
                         f"{d['loop_rss_mb']:.0f}", f"{s['loop_rss_mb']:.0f}"])
            print(rows[-1], file=sys.stderr)
    preface = ["# Decoding: dense cache vs stream:sinks=4,window=1024", "",
               "LLaMA-shaped step (4 layers, 8 heads of 64, 2 kv heads, hidden 512, random weights), TorchScript "
               f"export, ONNX Runtime CPU, 2 cores. {STEPS} greedy steps after a cache of L - 1 positions; median ms "
               "per token; cache bytes after the last step; loop RSS: the peak resident memory while decoding, above the "
               "process before it loaded the model (each model and length in its own process).", ""]
    write("decode_stream", "decode: dense vs stream", ["total length L", "dense ms/token", "stream ms/token",
                                                       "dense cache MiB", "stream cache MiB", "dense loop RSS MiB",
                                                       "stream loop RSS MiB"], rows, records, preface)
    return 0


if __name__ == "__main__":
    sys.exit(main())
