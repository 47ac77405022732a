"""Fuzzing figures: detection and the exact rewrite on random attention modules.

Draws cases (seeded) from tools/fuzz.py's space: head layout (MHA/GQA/MQA), scale
spelling, soft-cap, position-bias terms (ALiBi, learned relative bias), mask kind, heads
folded into the batch, exporter. Each case is exported; counted: found as one site,
found right (self-attention, heads, kv heads, causality, scale, soft-cap), and `fuse`
exact on every input set (the fidelity inputs, a padded batch, another length).
Writes benchmarks/results/fuzz.{md,json}.

    python benchmarks/fuzz.py --cases 160
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from _report import write

from attn_opt.tools import fuzz


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    space = fuzz.all_cases()
    cases = random.Random(args.seed).sample(space, min(args.cases, len(space)))
    records, t0 = [], time.perf_counter()
    for i, case in enumerate(cases):
        try:
            got = fuzz.check(case)
        except Exception as e:  # an export the exporter refuses is the exporter's limit: counted apart
            got = {"found": False, "right": False, "exact": False, "problem": f"error: {type(e).__name__}: {e}"[:300]}
        records.append({**case, "heads": list(case["heads"]), **got})
        print(f"{i + 1}/{len(cases)} {case} -> {got}", file=sys.stderr)
    by = Counter()
    rows = []
    for key in ("exporter", "layout", "bias", "mask"):
        for value in fuzz.SPACE[key]:
            sub = [r for r in records if r[key] == value]
            rows.append([f"{key}={value}", str(len(sub)), str(sum(r["found"] for r in sub)),
                         str(sum(r["right"] for r in sub)), str(sum(r["exact"] for r in sub))])
    by.update(found=sum(r["found"] for r in records), right=sum(r["right"] for r in records),
              exact=sum(r["exact"] for r in records))
    rows.insert(0, ["all", str(len(records)), str(by["found"]), str(by["right"]), str(by["exact"])])
    failures = [f"- {r['exporter']} {r['layout']} bias={r['bias']} mask={r['mask']} heads={r['heads']} "
                f"scale={r['scale']} softcap={r['softcap']}: {r['problem']}" for r in records
                if not (r["found"] and r["right"] and r["exact"])]
    preface = [f"# Fuzzing: {len(records)} random attention modules of {len(space)} combinations", "",
               f"Seed {args.seed}, {time.perf_counter() - t0:.0f} s. found: one site; right: self-attention with "
               "the right heads, kv heads, causality, scale and soft-cap; exact: fuse within 1e-4 on every input set.",
               ""]
    write("fuzz", "fuzzing", ["cases", "n", "found", "right", "exact fuse"], rows, records, preface,
          footer="\n".join(["Failures:"] + failures) if failures else "No failures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
