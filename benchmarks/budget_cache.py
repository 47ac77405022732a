"""--budget cache=F on the trained decoder (zoo.TRAINED "llama-bytes": 4 layers, 8 heads, 2 KV
groups, RoPE, trained on 256-byte contexts): the searched plan (per layer and KV group: stream
with sinks + a window, or keep the full cache) against streaming every group with one window,
on held-out text. The search teacher-forces `--rows` held-out segments of the trained
context; every figure is on `--rows` other segments: the next-byte NLL (nats/byte), its
increase over the original, and the cache the generation loop holds after the last byte
(fraction of the original's). Writes benchmarks/results/budget_cache.{md,json}.

    python benchmarks/budget_cache.py [--rows 4] [--budgets 0.25,0.35,0.5]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import write

import attn_opt
from attn_opt.api import steps_for
from attn_opt.core.inputs import make_inputs
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.pipeline import budget as B
from attn_opt.pipeline.budget_cache import search_cache
from attn_opt.pipeline.onnx_decode import forced_quality, loop_of, teacher_forced
from attn_opt.tools import train_decoder, zoo

CANDIDATES = "stream:sinks=4,window=16|32|64"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--budgets", default="0.25,0.35,0.5")
    ap.add_argument("--candidates", default=CANDIDATES)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    path = zoo.export_trained("llama-bytes", "torchscript", tmp / "step.onnx")
    text = np.frombuffer(train_decoder.held_out_text(), np.uint8).astype(np.int64)
    n, length = 2 * args.rows, train_decoder.CONTEXT
    stride = (len(text) - length) // n
    seg = np.stack([text[i * stride: i * stride + length] for i in range(n)])
    search_ids, held_ids = seg[0::2], seg[1::2]
    om, _, gv = onnx_adapter.load_view(str(path))
    specs = onnx_adapter.input_specs(gv)
    loop = loop_of(gv, specs)
    feeds = make_inputs(specs, seed=0)
    dense = teacher_forced(om, loop, held_ids)
    base = forced_quality(dense)["all"]["nll"]
    rows, records = [], []

    def score(model, form: str, budget, seconds=None, plan=None):
        f = teacher_forced(model, loop, held_ids)
        nll = forced_quality(f)["all"]["nll"]
        rec = {"form": form, "budget": budget, "cache_fraction": f.cache_bytes / dense.cache_bytes, "nll": nll,
               "nll_increase": nll - base, "mean_abs_dlogp": float(np.abs(f.logprob - dense.logprob).mean()),
               "search_seconds": seconds, "plan": plan}
        records.append(rec)
        rows.append([form, "-" if budget is None else f"{budget:g}", f"{rec['cache_fraction']:.3f}", f"{nll:.4f}",
                     f"{nll - base:+.4f}", f"{rec['mean_abs_dlogp']:.4f}", "-" if seconds is None else f"{seconds:.0f}"])
        print(rows[-1], file=sys.stderr)

    def report():  # after every row: a long search cut short keeps what it measured
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        preface = ["# --budget cache=F on the trained decoder (llama-bytes), held-out text", "",
                   f"{args.rows} search and {args.rows} held-out segments of {length} bytes, teacher-forced through "
                   f"the step's generation loop in ONNX Runtime; the original's NLL {base:.4f} nats/byte. Cache: what "
                   f"the loop holds after the last byte, as a fraction of the original's ({dense.cache_bytes} bytes). "
                   f"Candidates `{args.candidates}`; the plan chooses per layer and KV group. Peak RSS {peak:.2f} GiB; "
                   "times on the shared 2-core machine under load.", ""]
        write("budget_cache", "cache budget: searched plan vs one window everywhere (held-out bytes)",
              ["form", "budget", "cache", "NLL", "vs original", "mean |Δ log p|", "search s"], rows,
              {"records": records, "peak_rss_gib": peak}, preface)

    score(om, "original (full cache)", None)
    for spec in B.expand_candidates(args.candidates):
        model, _ = attn_opt.optimize(str(path), [spec], force=True, check="none")
        score(model, f"{spec} (every group)", None)
    steps = steps_for("onnx")
    for b in [float(x) for x in args.budgets.split(",")]:
        t0 = time.perf_counter()
        try:
            r = search_cache(steps, onnx_adapter.load(str(path)), feeds, None, B.Budget("cache", b),
                             B.expand_candidates(args.candidates), tokens=(search_ids, held_ids))
        except Exception as e:  # an unreachable budget: said in the table
            rows.append([f"plan for cache={b:g}", f"{b:g}", str(e).split(";")[0], "-", "-", "-", "-"])
            continue
        seconds = time.perf_counter() - t0
        model, _ = attn_opt.optimize(str(path), plan=r.plan, force=True, check="none")
        score(model, f"searched plan, cache={b:g}", b, seconds, r.plan)
        report()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
