"""Every rewrite form on two zoo models: the pipeline report's figures in one table.

For each form: whether it is exact, sites rewritten, max relative error and cosine
against the original, attention FLOPs and parameters before/after, and for sinkfree the
mean sink ratio (attention on the first token) before and after. Inputs: generated,
seed 0, 64 tokens. Writes benchmarks/results/forms.{md,json}.

    python benchmarks/forms.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from _report import write

from attn_opt import passes
from attn_opt.core.inputs import make_inputs
from attn_opt.core.ir import onnx as onnx_adapter
import attn_opt
from attn_opt.tools import zoo

MODELS = [("bert-eager", "dynamo", {"input_ids": (2, 32), "attention_mask": (2, 32)}),
          ("gpt2-sdpa", "torchscript", {"input_ids": (2, 32), "attention_mask": (2, 32)})]
FORMS = ["fuse", "sparse:window=8", "sparse:window=8,sinks=2", "sparse:window=8,stride=8",
         "gated", "gated:mode=elementwise", "softplus", "softplus:n_train=16,p=2",
         "sinkfree:mode=logit,bias=-inf", "sinkfree:mode=logit,bias=0", "sinkfree:mode=redistribute,alpha=0.5",
         "sinkfree:mode=relu", "mlpfree:collapse=qk+vo", "mlpfree:collapse=qk,symmetric=true",
         "mlpfree:drop_mlp=true"]


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, exporter, shapes in MODELS:
            path = zoo.export_onnx(name, exporter, Path(tmp) / f"{name}.onnx")
            proto = onnx.load(str(path))
            specs = onnx_adapter.input_specs(onnx_adapter.load_view(proto)[2])
            feeds = make_inputs(specs, shapes, seed=0)
            for spec in FORMS:
                _, report = attn_opt.optimize(proto, [passes.parse(spec)], feeds=feeds, force=True)
                p = report.passes[0]
                sink = [np.mean(r["before"]) for r in p.sink_ratio.values()], [np.mean(r["after"]) for r in p.sink_ratio.values()]
                rows.append({"model": f"{name} ({exporter})", "form": spec, "exact": p.exact,
                             "rewritten": len(p.sites_rewritten), "skipped": [s.reason for s in p.sites_skipped],
                             "max_rel_error": p.fidelity["max_rel_error"], "cosine": p.fidelity["cosine"],
                             "attention_flops": [p.attention_flops_before, p.attention_flops_after],
                             "params": [p.params_before, p.params_after],
                             "sink_ratio": [float(np.mean(sink[0])), float(np.mean(sink[1]))] if sink[0] else None})
                print(json.dumps(rows[-1]), file=sys.stderr)
    write_results(rows)
    return 0


def write_results(rows) -> None:
    cols = ["model", "form", "exact", "sites", "max rel err", "cosine", "attn FLOPs", "params", "sink ratio"]
    table = []
    for r in rows:
        sink = "-" if r["sink_ratio"] is None else f"{r['sink_ratio'][0]:.3f} → {r['sink_ratio'][1]:.3f}"
        table.append([r["model"], r["form"], "yes" if r["exact"] else "no",
                      f"{r['rewritten']}" + (f" ({len(r['skipped'])} skipped)" if r["skipped"] else ""),
                      f"{r['max_rel_error']:.2e}", f"{r['cosine']:.6f}",
                      f"{r['attention_flops'][0]:.3g} → {r['attention_flops'][1]:.3g}",
                      f"{r['params'][0]} → {r['params'][1]}", sink])
    write("forms", "rewrite forms: fidelity, FLOPs, parameters", cols, table, rows,
          ["# Rewrite forms on zoo models (random weights, 2 x 32 tokens)", ""])


if __name__ == "__main__":
    sys.exit(main())
