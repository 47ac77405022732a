"""Which heads of the trained decoder are sinks, local, long-range: the attention
diagnostics (`attn-opt inspect --attention`, patterns/diagnostics.py) on held-out text.

The full-sequence export of `llama-bytes` (`attn-opt zoo llama-bytes-full`) reads
`--segments` held-out segments of its trained context (256 bytes). Per head: the mean
attention the first token receives (sink ratio), the row entropy, and the mass a stream
pattern (S sinks + a causal window W) would drop; per KV group the largest of its query
heads' dropped mass, which per-head streaming (`stream:full_heads=auto`) ranks groups by.
A head is "sink" when the first token takes >= 0.2 of its attention, "local" when the
window drops < `--local` of its mass, else "long-range". Writes
benchmarks/results/decoder_heads.{md,json}.

    python benchmarks/decoder_heads.py [--segments 8] [--sinks 4] [--window 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import write

from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.patterns.detect import detect
from attn_opt.patterns.diagnostics import head_stats, outside_stream, probabilities
from attn_opt.tools import train_decoder, zoo


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--local", type=float, default=0.1)
    args = ap.parse_args()
    length = train_decoder.CONTEXT
    tmp = Path(tempfile.mkdtemp())
    src = zoo.export_trained("llama-bytes", "torchscript", tmp / "full.onnx", step=False)
    text = np.frombuffer(train_decoder.held_out_text(), np.uint8).astype(np.int64)
    stride = (len(text) - length) // args.segments
    ids = np.stack([text[i * stride: i * stride + length] for i in range(args.segments)])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    _, _, gv = onnx_adapter.load_view(str(src))
    sites = detect(gv).sites
    probs = probabilities(gv, sites, feeds)
    rows, records, groups = [], [], []
    for s in sites:
        p = probs[s.id]
        stats = head_stats(s, p, args.window)
        dropped = outside_stream(p, args.sinks, args.window)
        per_group = dropped.reshape(s.kv_heads, -1).max(1)
        groups.append([str(s.layer), *[f"{g:.3f}" for g in per_group]])
        for h, st in enumerate(stats):
            kind = ("sink " if st.first_tokens[0] >= 0.2 else "") + \
                   ("local" if dropped[h] < args.local else "long-range")
            records.append({"site": s.id, "layer": s.layer, "head": h, "kv_group": h // (s.heads // s.kv_heads),
                            "sink_ratio": st.first_tokens[0], "entropy": st.entropy,
                            "stream_dropped": float(dropped[h]), "kind": kind})
            rows.append([str(s.layer), str(h), str(h // (s.heads // s.kv_heads)), f"{st.first_tokens[0]:.3f}",
                         f"{st.entropy:.2f}", f"{dropped[h]:.3f}", kind])
    kinds = [r["kind"] for r in records]
    summary = {k: kinds.count(k) for k in sorted(set(kinds))}
    preface = ["# Heads of the trained decoder (llama-bytes)", "",
               f"{args.segments} held-out segments of {length} bytes; sink ratio: mean attention on the first "
               f"token; dropped: attention mass outside {args.sinks} sinks + a causal window of {args.window}; "
               f"local: dropped < {args.local}. Heads by kind: "
               + ", ".join(f"{k}: {n}" for k, n in summary.items()) + ".", "",
               "Per KV group, the largest dropped mass among its query heads (what full_heads=auto ranks):", "",
               "| layer | " + " | ".join(f"group {g}" for g in range(len(groups[0]) - 1)) + " |",
               "|" + "---|" * len(groups[0]), *["| " + " | ".join(g) + " |" for g in groups], ""]
    write("decoder_heads", "heads of the trained decoder", ["layer", "head", "kv group", "sink ratio", "entropy",
                                                             "dropped", "kind"], rows, records, preface)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
