"""Decoding with a dense KV cache vs stream:sinks=4,window=1024 vs ONNX Runtime's
GroupQueryAttention with local_window_size=1024, in ONNX Runtime.

A LLaMA-shaped decoder step (4 layers, 8 heads of 64, 2 key/value heads, random
weights), exported by the TorchScript exporter; the same step after
`stream:sinks=4,window=1024`; and the peer, each site as com.microsoft.GroupQueryAttention
with local_window_size (it windows the attention, but its cache keeps growing). For each
total length L the loop starts from a cache of
L - 1 positions (random values: the cost of a step does not depend on them) and decodes
16 tokens, feeding each step's present back as the next past, as a generation loop
does. Per model and length: the median ms per decoded token, the cache bytes after the
last step, and the peak resident memory while decoding above what the process held
before loading the model (each model and length in its own process). Writes
benchmarks/results/decode_stream.{md,json}.

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
LATENT, ROPE = 32, 16  # latent rank (a quarter of 2 kv heads x 64), rotated K dims kept per kv head (partial RoPE)


def build(folder: Path) -> tuple[Path, Path, Path]:
    """The dense step, its streaming rewrite, and the ORT GroupQueryAttention peer."""
    from attn_opt import optimize
    from attn_opt.tools import zoo

    dense, stream, peer = folder / "dense.onnx", folder / "stream.onnx", folder / "ort_gqa_window.onnx"
    latent, full = folder / "latent.onnx", folder / "latent_full.onnx"
    zoo.export_decoder_step("llama", "torchscript", dense, **CONFIG)
    out, report = optimize(str(dense), [f"stream:sinks={SINKS},window={WINDOW}"])
    assert report.passes[0].sites_rewritten, report.passes[0].sites_skipped
    out.save(stream)
    gqa_local_window(dense, peer, WINDOW)
    for path, spec in ((latent, f"latent:rank={LATENT},rope_dims={ROPE}"), (full, "latent:rank=128")):
        out, report = optimize(str(dense), [spec], force=True)  # rank 128, K kept whole: exact (checked below)
        assert len(report.passes[0].sites_rewritten) == CONFIG["num_hidden_layers"], report.passes[0].sites_skipped
        out.save(path)
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    om, _, gv = onnx_adapter.load_view(str(dense))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    for other in (stream, peer, full):  # equal to the dense step while the sequence fits the window / at full rank
        got = compare(om, onnx_adapter.load(str(other)), loop, np.array([[5, 6, 7]]), 8)
        assert got["max_rel_error"] < 1e-3, (other.name, got["max_rel_error"])
    return dense, stream, peer, latent


def gqa_local_window(src: Path, dst: Path, window: int) -> None:
    """The peer: each site of the dense step as com.microsoft.GroupQueryAttention with
    local_window_size, reading and returning the step's cache (past_key/past_value in,
    present out), as ONNX Runtime GenAI runs a windowed decoder."""
    import onnx_ir as ir

    from attn_opt.backends.onnx.edit import MS, SiteEdit, ensure_opset, sweep
    from attn_opt.patterns.cache import new_part
    from attn_opt.patterns.detect import detect
    from attn_opt.core.ir import onnx as onnx_adapter

    om, model, gv = onnx_adapter.load_view(str(src))
    for site in detect(gv).sites:
        e = SiteEdit(model, site, "gqa")
        ensure_opset(model, MS, 1)
        (past_k, k_new), (past_v, v_new) = new_part(site.k.value), new_part(site.v.value)

        def packed(x):  # [B, H, S, D] -> [B, S, H*D]
            return e.op("Reshape", [e.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), e.ints(0, 0, -1)])

        q = packed(e.bhsd(site.q))
        total = e.op("Add", [e.shape_dim(e.value(past_k), 2), e.shape_dim(q, 1)])
        seqlens = e.op("Cast", [e.op("Expand", [e.op("Sub", [total, e.ints(1)]), e.shape_dim(q, 0)])], {"to": 6})
        o, present_k, present_v = e.op(
            "GroupQueryAttention", [q, packed(e.value(k_new)), packed(e.value(v_new)), e.value(past_k),
                                    e.value(past_v), seqlens, e.op("Cast", [e.op("Squeeze", [total, e.ints(0)])],
                                                                   {"to": 6})],
            {"num_heads": site.heads, "kv_num_heads": site.kv_heads, "scale": float(site.scale),
             "local_window_size": window}, domain=MS, outputs=3)
        e.commit(e.op("Transpose", [e.op("Reshape", [o, e.ints(0, 0, site.heads, -1)])], {"perm": [0, 2, 1, 3]}))
        e.replace_output(site.cache.present_key, present_k)
        e.replace_output(site.cache.present_value, present_v)
    sweep(model)
    ir.save(model, str(dst))


def one(model: str, length: int) -> dict:
    """Decode STEPS tokens after a cache of length - 1 (capped as the model caps it)."""
    import psutil

    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import Stepper, loop_of

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
            order = [got[m.stem] for m in models]  # dense, stream, peer, latent
            records.append({"length": length, **{f"{k}_{m}": v for m, g in got.items() for k, v in g.items()}})
            rows.append([str(length)] + [f"{g['ms_per_token']:.2f}" for g in order]
                        + [f"{g['cache_bytes'] / 2**20:.1f}" for g in order] + [f"{g['loop_rss_mb']:.0f}" for g in order])
            print(rows[-1], file=sys.stderr)
    preface = ["# Decoding: dense cache vs stream:sinks=4,window=1024 vs ORT GroupQueryAttention local_window_size=1024 "
               f"vs latent:rank={LATENT},rope_dims={ROPE}",
               "",
               "LLaMA-shaped step (4 layers, 8 heads of 64, 2 kv heads, hidden 512, random weights), TorchScript "
               f"export, ONNX Runtime CPU, 2 cores. {STEPS} greedy steps after a cache of L - 1 positions; median ms "
               "per token; cache bytes after the last step; loop RSS: the peak resident memory while decoding, above the "
               "process before it loaded the model (each model and length in its own process).",
               "",
               f"latent:rank={LATENT},rope_dims={ROPE}: K/V through a rank-{LATENT} latent with {ROPE} rotated K dims "
               f"per kv head kept in their own cache (partial RoPE), so the cache is ({LATENT} + 2 x {ROPE}) / 256 = "
               f"{(LATENT + 2 * ROPE) / 256:.0%} of dense per token (approximate: random weights, no heal); "
               "latent:rank=128 (V in the latent at full rank, K kept whole) is checked equal to dense through 8 loop steps before timing.", ""]
    cols = ["total length L"] + [f"{m} {what}" for what in ("ms/token", "cache MiB", "loop RSS MiB")
                                 for m in ("dense", "stream", "ORT GQA window", f"latent:rank={LATENT},rope_dims={ROPE}")]
    write("decode_stream", "decode: dense vs stream vs ORT GQA window vs latent", cols, rows, records, preface)
    return 0


if __name__ == "__main__":
    sys.exit(main())
