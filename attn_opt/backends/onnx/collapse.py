"""mlpfree's forms in ONNX: collapsed Q·Kᵀ / V·O weight products per head (a `Collapse`),
and feed-forward blocks dropped from the graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from attn_opt.backends.onnx.edit import SiteEdit, find_node
from attn_opt.backends.onnx.explicit import emit_scores_probs
from attn_opt.patterns.form import Collapse
from attn_opt.patterns.mlp import mlp_blocks
from attn_opt.core.errors import UserError


def emit_collapse(e: SiteEdit, c: Collapse) -> None:
    site = e.site
    h, g = site.heads, site.heads // site.kv_heads
    e.compute_in_fp32()
    q_in = k_in = None
    work = site
    if c.w_qk is not None:
        dm = c.w_qk.shape[0]
        q_in = _heads(e, e.op("MatMul", [_augment(e, e.value(c.xq)), e.initializer("w_qk", c.w_qk)]), h, dm)
        k_in = e.op("Unsqueeze", [_augment(e, e.value(c.xk)), e.ints(1)])  # one shared "head": [B, 1, T, D+1]
        work = dataclasses.replace(work, kv_heads=1, head_dim=dm)
    probs = emit_scores_probs(e, work, q_in, k_in)  # [B, H, Tq, Tk]
    if c.w_vo is not None:
        d_model = c.w_vo.shape[1] // h
        v_all = _heads(e, e.op("MatMul", [_augment(e, e.value(c.xv)), e.initializer("w_vo", c.w_vo)]), h, d_model)
        out = e.op("ReduceSum", [e.op("MatMul", [probs, v_all]), e.ints(1)], {"keepdims": 0})  # Σ_h P_h V'_h
        if c.o.bias is not None:  # a Gemm/Linear output projection adds its bias itself
            out = e.op("Add", [out, e.value(c.o.bias)])
        e.commit_value(_output_of(e, c.o.node), e.back(out))
        return
    v = e.bhsd(site.v)
    shape = e.op("Concat", [e.shape_dim(v, 0), e.ints(site.kv_heads, g), e.op("Shape", [probs], {"start": 2})],
                 {"axis": 0})
    o5 = e.op("MatMul", [e.op("Reshape", [probs, shape]), e.op("Unsqueeze", [v, e.ints(2)])])
    full = e.op("Concat", [e.shape_dim(v, 0), e.ints(h), e.op("Shape", [probs], {"start": 2, "end": 3}),
                           e.shape_dim(v, 3)], {"axis": 0})
    e.commit(e.back(e.op("Reshape", [o5, full])))


def _augment(e: SiteEdit, x):
    """[.., D] → [.., D+1] with a ones column (carries the biases through the product)."""
    ones = e.op("ConstantOfShape", [e.op("Concat", [e.op("Shape", [x], {"end": -1}), e.ints(1)], {"axis": 0})],
                {"value": ir.tensor(np.ones(1, np.float32))})
    return e.op("Concat", [x, ones], {"axis": -1})


def _heads(e: SiteEdit, x, h: int, width: int):
    """[B, T, H*width] → [B, H, T, width]."""
    return e.op("Transpose", [e.op("Reshape", [x, e.ints(0, 0, h, width)])], {"perm": [0, 2, 1, 3]})


def _output_of(e: SiteEdit, node_name: str):
    n = find_node(e.model, node_name)
    if n is not None:
        return n.outputs[0]
    raise UserError(f"mlpfree: projection node {node_name} vanished")


def drop_mlp(model: ir.Model, gv) -> list[str]:
    """x + MLP(norm(x)) becomes x, for every feed-forward block found."""
    notes = []
    for add, x, nodes in mlp_blocks(gv):
        out = add.outputs[0].native
        if out.is_graph_output():
            raise UserError("mlpfree: a feed-forward block ends at a graph output; dropping it would rename the output")
        out.replace_all_uses_with(x.native, replace_graph_outputs=True)
        notes.append(f"dropped the feed-forward block ending at {add.name} ({len(nodes)} nodes)")
    return notes or ["drop_mlp: no feed-forward block found"]
