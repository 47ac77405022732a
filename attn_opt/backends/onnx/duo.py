"""DuoAttention's gate model (stream:...,full_heads=auto with --calibrate): each site's
output becomes, per query head h of KV group g,

    O_h = α_g · O_h(dense) + (1 − α_g) · O_h(sinks + causal window)

with α a graph input per site (`attn_opt.gate.<site>`, [kv_heads]): at α = 1 the model is
the original, at 0 every group streams. The two attentions are the masked-dense
lowering (explicit.py) of the site's own form and of the stream pattern, on the same
Q/K/V, so the mix is what a per-head streaming step computes on a prefill (no key has
been dropped from the cache yet; the pattern hides what it would drop).
pipeline/stream_gates.py fits α on the calibration inputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.explicit import emit_explicit
from attn_opt.backends.onnx.lower import normaliser_fn
from attn_opt.patterns.form import Pattern
from attn_opt.core.graph import param_name


def gate_input(site_id: str) -> str:
    return param_name(site_id, "gate")


def emit_gate_mix(model: ir.Model, site, sinks: int, window: int) -> str:
    """Replace `site`'s output by the α-mix above; the name of its new α input."""
    e = SiteEdit(model, site, "duo")
    e.compute_in_fp32()
    norm = normaliser_fn(site.normaliser, site, 5)
    dense = emit_explicit(e, site, norm)
    stream = emit_explicit(e, site, norm, pattern=Pattern("window", True, window, 1, sinks=sinks))
    alpha = ir.Value(name=gate_input(site.id), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([site.kv_heads]))
    model.graph.inputs.append(alpha)
    group = np.arange(site.heads) * site.kv_heads // site.heads  # each query head's KV group
    a = e.op("Reshape", [e.op("Gather", [alpha, e.ints(*group)], {"axis": 0}), e.ints(1, site.heads, 1, 1)])
    mixed = e.op("Add", [stream, e.op("Mul", [a, e.op("Sub", [dense, stream])])])
    e.commit(e.back(mixed))
    return alpha.name
