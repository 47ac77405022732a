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
    python benchmarks/decode_stream.py --quality-only    # on the trained decoder (zoo.TRAINED)
    python benchmarks/decode_stream.py --topk --lengths 4096 32768   # sparse:topk on the step (results/decode_stream_topk)
"""

from __future__ import annotations

import argparse
import json
import os
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


NOT_RUN: dict[str, str] = {}  # windowed op -> why the installed runtime cannot run it
CAPS = {"stream": SINKS + WINDOW, "op_onnx": WINDOW, "op_ort_window_cache": WINDOW}  # every group capped
NAMES = {"dense": "dense", "stream": "stream", "ort_gqa_window": "ORT GQA window",
         "latent": f"latent:rank={LATENT},rope_dims={ROPE}", "stream_heads": "per-head 1/4 full",
         "op_onnx": "Attention-25 window", "op_ort_window_cache": "ORT GQA sliding_window_cache"}
CHECKS: dict[str, float] = {}  # model -> max relative logit error vs dense, 8 loop steps that fit
FULL = "0:0+1:1"  # per-head streaming: 2 of the 8 KV groups (4 layers x 2) keep the full cache


def build(folder: Path) -> tuple[Path, ...]:
    """The dense step, its streaming rewrite, the ORT GroupQueryAttention peer, and the
    per-head streaming rewrite (a quarter of the KV groups full)."""
    from attn_opt import optimize
    from attn_opt.tools import zoo

    dense, stream, peer = folder / "dense.onnx", folder / "stream.onnx", folder / "ort_gqa_window.onnx"
    latent, full = folder / "latent.onnx", folder / "latent_full.onnx"
    heads = folder / "stream_heads.onnx"
    zoo.export_decoder_step("llama", "torchscript", dense, **CONFIG)
    out, report = optimize(str(dense), [f"stream:sinks={SINKS},window={WINDOW}"])
    assert report.passes[0].sites_rewritten, report.passes[0].sites_skipped
    out.save(stream)
    out, report = optimize(str(dense), [f"stream:sinks={SINKS},window={WINDOW},full_heads={FULL}"])
    assert len(report.passes[0].sites_rewritten) == CONFIG["num_hidden_layers"], report.passes[0].sites_skipped
    out.save(heads)
    gqa_local_window(dense, peer, WINDOW)
    ops = {target: folder / f"op_{target}.onnx" for target in ("onnx", "ort_window_cache")}
    for target, path in ops.items():  # the runtimes' windowed ops computing stream (no sinks: they keep none)
        out, report = optimize(str(dense), [f"stream:sinks=0,window={WINDOW},target={target}"])
        if not report.passes[0].sites_rewritten:  # an onnxruntime without the op or attribute: said, not timed
            NOT_RUN[target] = report.passes[0].sites_skipped[0].reason
            continue
        out.save(path)
    for path, spec in ((latent, f"latent:rank={LATENT},rope_dims={ROPE}"), (full, "latent:rank=128")):
        out, report = optimize(str(dense), [spec], force=True)  # rank 128, K kept whole: exact (checked below)
        assert len(report.passes[0].sites_rewritten) == CONFIG["num_hidden_layers"], report.passes[0].sites_skipped
        out.save(path)
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.pipeline.onnx_decode import compare, loop_of

    om, _, gv = onnx_adapter.load_view(str(dense))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    for other in (stream, peer, full, heads, *[p for t, p in ops.items() if t not in NOT_RUN]):  # equal to dense
        # while the sequence fits the window / at full rank
        got = compare(om, onnx_adapter.load(str(other)), loop, np.array([[5, 6, 7]]), 8)
        assert got["max_rel_error"] < 1e-3, (other.name, got["max_rel_error"])
        CHECKS[other.stem] = got["max_rel_error"]
    return dense, stream, peer, latent, heads, *[p for t, p in ops.items() if t not in NOT_RUN]


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
    cap = CAPS.get(Path(model).stem)  # every group capped; per-head: only the `_stream` caches

    def kept(past):
        if cap is not None:
            return min(length - 1, cap)
        return min(length - 1, SINKS + WINDOW) if past.endswith("_stream") else length - 1
    rng = np.random.default_rng(0)
    cache = {past: rng.standard_normal((1, shape[1], kept(past), shape[3])).astype(np.float32)
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


def quality(args) -> int:
    """--quality-only: on the trained decoder (zoo.TRAINED), teacher-forced held-out NLL,
    top-1 agreement with dense and the cache, for dense, stream and per-head streaming with
    the KV groups chosen two ways: by the attention the window drops (diagnostics:
    full_heads=auto, and the quarter of the groups it drops most from) and by DuoAttention's
    gates fitted on calibration text (full_heads=auto with --calibrate, and the quarter of
    the groups with the largest gates)."""
    import attn_opt
    from attn_opt.core.ir import onnx as onnx_adapter
    from attn_opt.patterns.detect import detect
    from attn_opt.patterns.diagnostics import for_pass, outside_stream
    from attn_opt.pipeline.onnx_decode import Stepper, forced_quality, loop_of, teacher_forced
    from attn_opt.pipeline.onnx_steps import OnnxSteps
    from attn_opt.pipeline.stream_gates import fit_gates
    from attn_opt.tools import train_decoder, zoo

    sinks, window, length, segments = args.sinks, args.window, args.length, args.segments
    tmp = Path(tempfile.mkdtemp())
    dense = zoo.export_trained("llama-bytes", "torchscript", tmp / "dense.onnx")
    om, _, gv = onnx_adapter.load_view(str(dense))
    loop = loop_of(gv, onnx_adapter.input_specs(gv))
    text = np.frombuffer(train_decoder.held_out_text(), np.uint8).astype(np.int64)
    stride = (len(text) - length) // segments
    evaluate = np.stack([text[i * stride: i * stride + length] for i in range(segments)])
    # calibration: other held-out bytes (half a stride on), never the evaluated ones
    cal = np.stack([text[i * stride + stride // 2: i * stride + stride // 2 + 257] for i in range(segments)])
    s = Stepper(om, loop)
    _, cache = s.step(cal[:, :256], s.start(segments), 0)
    feeds = {loop.ids: cal[:, 256:], loop.mask: np.ones((segments, 257), np.int64),
             loop.positions: np.full((segments, 1), 256, np.int64), **cache}  # one step after a 256-byte cache
    prefill = {loop.ids: cal, loop.mask: np.ones(cal.shape, np.int64),  # the gates' calibration: 257 bytes at once
               loop.positions: np.broadcast_to(np.arange(cal.shape[1]), cal.shape).copy(), **s.start(segments)}
    sites = detect(gv).sites
    diag = for_pass(gv, sites, feeds, window)
    ranked = sorted(((float(m), s.layer, g) for s in sites
                     for g, m in enumerate(outside_stream(diag[s.id].probs, sinks, window)
                                           .reshape(s.kv_heads, -1).max(1))), reverse=True)
    quarter = ranked[: max(1, len(ranked) // 4)]
    upgraded = OnnxSteps().upgrade(onnx_adapter.load(str(dense)), 18, "the gate model")
    fit = fit_gates(upgraded, [s.id for s in sites], prefill, sinks, window, args.gate_l1)
    by_gate = sorted(((float(a), next(x.layer for x in sites if x.id == sid), g)
                      for sid, gates in fit.gates.items() for g, a in enumerate(gates)), reverse=True)
    top = by_gate[: len(quarter)]
    base_spec = f"stream:sinks={sinks},window={window}"
    specs = {"stream": (base_spec, None),
             "per-head auto, diagnostics": (f"{base_spec},full_heads=auto,full_above={args.full_above}", None),
             "per-head auto, DuoAttention gates": (f"{base_spec},full_heads=auto,gate_l1={args.gate_l1}", prefill),
             "per-head 1/4 full, diagnostics": (f"{base_spec},full_heads=" + "+".join(f"{l}:{g}" for _, l, g in quarter),
                                                None),
             "per-head 1/4 full, DuoAttention gates": (f"{base_spec},full_heads=" + "+".join(f"{l}:{g}" for _, l, g in top),
                                                       None)}
    base = teacher_forced(om, loop, evaluate)
    rows, records = [], []

    def add(name, spec, f, note=""):
        q = forced_quality(f, base, train_decoder.CONTEXT)
        records.append({"model": name, "spec": spec, "note": note, "cache_bytes": f.cache_bytes,
                        **{f"{k}_{m}": v for k, d in q.items() for m, v in d.items()}})
        rows.append([name, f"{q['all']['nll']:.4f}", f"{q['before']['nll']:.4f}", f"{q['after']['nll']:.4f}",
                     f"{q['before'].get('agreement', 1):.3f}", f"{q['all'].get('agreement', 1):.3f}",
                     f"{f.cache_bytes / 2**10:.0f}", f"{f.cache_bytes / base.cache_bytes:.2f}"])
        print(rows[-1], note, file=sys.stderr, flush=True)

    add("dense", "", base)
    for name, (spec, calibrate) in specs.items():
        out, rep = attn_opt.optimize(str(dense), [spec], feeds=feeds, calibrate=calibrate, force=True)
        p = rep.passes[0]
        if not p.sites_rewritten:
            add(name, spec, base, "nothing streams: " + "; ".join(k.reason for k in p.sites_skipped[:1]))
            continue
        out.save(str(tmp / "m.onnx"))
        chosen = [n.split(":")[0] + ": " + next(x.strip() for x in n.split(";") if "keep the full cache" in x)
                  for n in p.notes if "keep the full cache" in n]
        chosen += [f"{k.id}: every group full" for k in p.sites_skipped]
        add(name, spec, teacher_forced(onnx_adapter.load(str(tmp / "m.onnx")), loop, evaluate), " | ".join(chosen))
    ctx = train_decoder.CONTEXT
    preface = ["# Decoding quality on the trained decoder: dense vs stream vs per-head streaming, the groups chosen by "
               "diagnostics or by DuoAttention's gates", "",
               f"`llama-bytes` (trained at {ctx} bytes), TorchScript export, ONNX Runtime CPU. "
               f"{segments} held-out segments of {length} bytes teacher-forced one byte per step through the cache "
               f"({evaluate[:, 1:].size} scored); stream with {sinks} sinks + a window of {window}. NLL < {ctx}: the "
               f"positions inside the context the model was trained at (where dense is the reference and a closer "
               f"match is better); NLL >= {ctx}: past it (where dense itself degrades).", "",
               f"Choices made on other held-out bytes ({segments} x 257). Diagnostics (no --calibrate): the attention "
               f"mass the window drops, one step after a 256-byte cache; auto keeps a group full above "
               f"{args.full_above}; 1/4 full: the {len(quarter)} of {len(ranked)} groups it drops most from "
               f"({', '.join(f'layer {l} group {g}: {m:.3f}' for m, l, g in quarter)}). DuoAttention (--calibrate): "
               f"per-group gates mixing dense and streaming outputs, fitted on the 257-byte prefill so the logits "
               f"match, L1 weight {args.gate_l1} ({fit.runs} model runs, {fit.seconds:.1f} s; relative logit error "
               f"with every group streaming {fit.error_all_stream:.4f}); auto keeps a group full where its gate ends "
               f"above 0.5; 1/4 full: the {len(top)} largest gates "
               f"({', '.join(f'layer {l} group {g}: {a:.3f}' for a, l, g in top)}). All gates: "
               + "; ".join(f"{sid} {np.round(g, 3).tolist()}" for sid, g in fit.gates.items()) + ".",
               "", *[f"- {r['model']}: {r['note']}" for r in records if r["note"]], ""]
    write("decode_stream_quality", "decode quality on the trained decoder",
          ["model", "NLL nats/byte", f"NLL < {ctx}", f"NLL >= {ctx}", f"agreement with dense < {ctx}",
           "agreement with dense", "cache KiB", "cache / dense"], rows, records, preface)
    return 0


TOPK = "sparse:topk=8,block=64,sinks=4,window=1"


def topk_rows(lengths: list[int]) -> int:
    """Dense vs sparse:topk on the same step: each step ranks the 64-token blocks of its
    whole cache and attends the kept ones (8 + the sink block + its own); dense and topk
    alternate per length, each in its own process."""
    from attn_opt import optimize
    from attn_opt.tools import zoo

    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense, topk = Path(tmp) / "dense.onnx", Path(tmp) / "topk.onnx"
        zoo.export_decoder_step("llama", "torchscript", dense, **CONFIG)
        out, report = optimize(str(dense), [TOPK], force=True)
        assert len(report.passes[0].sites_rewritten) == CONFIG["num_hidden_layers"], report.passes[0].sites_skipped
        out.save(topk)
        for length in lengths:
            got = {}
            for m in (dense, topk):
                r = subprocess.run([sys.executable, __file__, "--one", str(m), str(length)], capture_output=True,
                                   text=True, check=True)
                got[m.stem] = json.loads(r.stdout.strip().splitlines()[-1])
            nbk = -(-length // 64)
            kept = min(nbk, 10) * 64 / length  # K and V blocks attended, of the cache
            records.append({"length": length, "kept_fraction": kept, **{f"{k}_{m}": v for m, g in got.items()
                                                                         for k, v in g.items()}})
            rows.append([str(length), f"{got['dense']['ms_per_token']:.2f}", f"{got['topk']['ms_per_token']:.2f}",
                         f"{got['dense']['ms_per_token'] / got['topk']['ms_per_token']:.2f}x", f"{kept:.3f}",
                         f"{got['dense']['cache_bytes'] / 2**20:.1f}", f"{got['topk']['cache_bytes'] / 2**20:.1f}"])
            print(rows[-1], file=sys.stderr)
    preface = [f"# Decoding: dense vs {TOPK} on the step", "",
               "LLaMA-shaped step (4 layers, 8 heads of 64, 2 kv heads, hidden 512, random weights), TorchScript "
               f"export, ONNX Runtime CPU, the shared 2-core machine under other load. {STEPS} greedy steps after a "
               "cache of L - 1 positions; median ms per token; dense and topk alternate per length.", "",
               "Each step ranks every 64-token block of its cache by the block's mean-pooled keys and attends 10 "
               "blocks (8 + the sink block + its own). The block means are recomputed from the whole K cache each "
               "step (not cached yet), so a step still reads all of K once, and V only at the kept blocks; the "
               "cache itself is untouched (same bytes).", ""]
    cols = ["total length L", "dense ms/token", "topk ms/token", "speed-up", "kept blocks / cache",
            "dense cache MiB", "topk cache MiB"]
    write("decode_stream_topk", "decode: dense vs sparse:topk on the step", cols, rows, records, preface)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    ap.add_argument("--quality-only", action="store_true", help="quality on the trained decoder, no timing")
    ap.add_argument("--topk", action="store_true", help="dense vs sparse:topk on the step (results/decode_stream_topk)")
    ap.add_argument("--sinks", type=int, default=4, help="--quality-only: stream sinks")
    ap.add_argument("--window", type=int, default=64, help="--quality-only: stream window")
    ap.add_argument("--length", type=int, default=640, help="--quality-only: bytes per held-out segment")
    ap.add_argument("--segments", type=int, default=4, help="--quality-only: held-out segments")
    ap.add_argument("--full-above", type=float, default=0.15, help="--quality-only: full_heads=auto's threshold")
    ap.add_argument("--gate-l1", type=float, default=1.0, help="--quality-only: the DuoAttention gates' L1 weight")
    args = ap.parse_args()
    if args.quality_only:
        return quality(args)
    if args.topk:
        return topk_rows(args.lengths)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    rows, records = [], []
    load = [os.getloadavg()[0]]  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
        for length in args.lengths:
            got = {}
            for m in models:
                r = subprocess.run([sys.executable, __file__, "--one", str(m), str(length)], capture_output=True,
                                   text=True, check=True)
                got[m.stem] = json.loads(r.stdout.strip().splitlines()[-1])
            records.append({"length": length, **{f"{k}_{m}": v for m, g in got.items() for k, v in g.items()}})
            d = got["dense"]
            for m in models:
                g = got[m.stem]
                rows.append([str(length), NAMES[m.stem], f"{g['ms_per_token']:.2f}",
                             f"{g['ms_per_token'] / d['ms_per_token']:.2f}", f"{g['cache_bytes'] / 2**20:.1f}",
                             f"{g['cache_bytes'] / d['cache_bytes']:.2f}", f"{g['loop_rss_mb']:.0f}"])
                print(rows[-1], file=sys.stderr)
            load.append(os.getloadavg()[0])
    preface = ["# Decoding: dense cache vs stream:sinks=4,window=1024, per-head streaming, the runtimes' windowed ops, "
               f"ORT GroupQueryAttention local_window_size=1024 (full cache), latent:rank={LATENT},rope_dims={ROPE}",
               "",
               "LLaMA-shaped step (4 layers, 8 heads of 64, 2 kv heads, hidden 512, random weights), TorchScript "
               f"export, ONNX Runtime CPU, 2 cores. {STEPS} greedy steps after a cache of L - 1 positions; median ms "
               "per token; cache bytes after the last step; loop RSS: the peak resident memory while decoding, above the "
               "process before it loaded the model (each model and length in its own process).",
               "",
               f"latent:rank={LATENT},rope_dims={ROPE}: K/V through a rank-{LATENT} latent with {ROPE} rotated K dims "
               f"per kv head kept in their own cache (partial RoPE), so the cache is ({LATENT} + 2 x {ROPE}) / 256 = "
               f"{(LATENT + 2 * ROPE) / 256:.0%} of dense per token (approximate: random weights, no heal); "
               "latent:rank=128 (V in the latent at full rank, K kept whole) is checked equal to dense through 8 loop steps before timing.",
               "",
               f"Per-head 1/4 full: stream:...,full_heads={FULL} (2 of the 8 KV groups keep the full cache and attend "
               "over every position; the other 6 attend over their own sinks + window cache only). Goals at 32k: cache "
               "<= 1/3 of dense, ms/token <= 1/2 of dense. Quality on the trained decoder: decode_stream_quality.md "
               "(--quality-only).", ""]
    preface += [f"1-minute load average of the shared 2-core machine at the start and after each length: "
                f"{', '.join(f'{x:.1f}' for x in load)}.", ""]
    preface += ["Checked before timing, max relative logit error vs dense through 8 loop steps after a 3-token prompt "
                "(the sequence fits the window; latent_full: rank 128): "
                + ", ".join(f"{k} {v:.1e}" for k, v in CHECKS.items()), ""]
    preface += [f"Attention-25 window / ORT GQA sliding_window_cache: stream:sinks=0,window={WINDOW},target=onnx / "
                "target=ort_window_cache (the runtimes' windowed ops keep no sinks; the cache is the window)."
                + "".join(f" {t}: not run, {why}." for t, why in NOT_RUN.items()), ""]
    cols = ["total length L", "model", "ms/token", "ms/token / dense", "cache MiB", "cache / dense", "loop RSS MiB"]
    write("decode_stream", "decode: dense vs stream, per-head, the runtimes' windowed ops, latent", cols, rows, records,
          preface)
    return 0


if __name__ == "__main__":
    sys.exit(main())
