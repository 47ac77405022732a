"""mlpfree: "Reducing the Transformer Architecture to a Minimum" (Bermeitinger et al. 2024).

collapse=qk (exact)  per head W_qk = W̃_q W̃_kᵀ, scores X̃ W_qk X̃ᵀ (X̃ = [X, 1] carries the biases)
collapse=vo (exact)  per head W_vo = W̃_v W_o, output Σ_h P_h X̃ W_vo,h (+ b_o)
symmetric=true       W_qk ← (W_qk + W_qkᵀ)/2 (approximate)
drop_mlp=true        x + MLP(norm(x)) → x for every feed-forward block (approximate)

Collapsing costs (D+1)² parameters per head instead of 2(D+1)d: it saves only when d >
(D+1)/2, and the report says so when it makes the model bigger. A collapse needs Q/K/V
to be plain projections of the hidden state: rotary embeddings or a fused QKV Split in
between are skipped with that reason. MLP blocks are found by graph regions (networkx),
not by names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.backends.onnxruntime.explicit import emit_scores_probs
from attn_opt.patterns.site import AttentionSite
from attn_opt.rewriter.errors import UserError
from attn_opt.rewriter.graph import Value
from attn_opt.rewriter.passbase import Pass, option


@dataclass(frozen=True)
class Linear:
    x: Value
    w: np.ndarray  # [D, out]
    b: np.ndarray  # [out]

    @property
    def augmented(self) -> np.ndarray:  # [D+1, out]
        return np.vstack([self.w, self.b[None, :]]).astype(np.float64)


def plain_projection(site: AttentionSite, which: str) -> Linear | str:
    """The projection feeding Q/K/V through only bias Add, Reshape to heads and Transpose."""
    op = getattr(site, which)
    proj = site.projections.get(which)
    if proj is None:
        return f"no {which.upper()} projection found"
    t = op.value.producer
    if op.perm is None and t is not None and t.op == "Transpose" and list(t.attrs.get("perm", [])) == [0, 2, 1, 3]:
        op = dataclasses.replace(op, value=t.input(0), perm=(0, 2, 1, 3))  # kv heads before repeat_kv
    if op.packed or op.perm not in ((0, 2, 1, 3),) or op.value.producer is None or op.value.producer.op != "Reshape":
        return f"{which.upper()} is not a projection reshaped to heads (rotary embedding or another op in between)"
    v = op.value.producer.input(0)
    bias = None
    n = v.producer
    factor = 1.0
    if n is not None and n.op in ("Mul", "Div"):  # Q pre-scaled by a constant (OPT, Whisper: q_proj(x) * scaling)
        consts = [i for i in n.inputs if i is not None and i.const is not None and i.const.size == 1]
        if len(consts) != 1 or (n.op == "Div" and n.input(1) is not consts[0]):
            return f"{which.upper()} is scaled by a value that is not a constant"
        c = float(consts[0].const.reshape(-1)[0])
        factor = 1.0 / c if n.op == "Div" else c
        v = next(i for i in n.inputs if i is not None and i is not consts[0])
        n = v.producer
    if n is not None and n.op == "Add":
        consts = [i for i in n.inputs if i is not None and i.const is not None]
        if len(consts) != 1:
            return f"{which.upper()}'s projection bias is not a constant"
        bias = consts[0].const.reshape(-1)
        v = next(i for i in n.inputs if i is not None and i.const is None)
        n = v.producer
    if n is None or n.name != proj.node:
        return f"{which.upper()} reaches its projection through other ops (rotary embedding or a fused QKV Split)"
    w = proj.weight.const.T if proj.transposed else proj.weight.const
    if proj.bias is not None and proj.bias.const is not None:
        bias = proj.bias.const.reshape(-1) + (bias if bias is not None else 0)
    b = np.zeros(w.shape[1]) if bias is None else bias
    return Linear(proj.x, np.asarray(w, np.float64) * factor, np.asarray(b, np.float64) * factor)


@dataclass(frozen=True)
class Mlpfree(Pass):
    name: ClassVar[str] = "mlpfree"
    exact: ClassVar[bool] = True
    why: ClassVar[str] = "collapse Q/K and V/O weights per head; optionally symmetric, drop the MLPs"
    collapse: tuple[str, ...] = option((), "which products to collapse: qk, vo (qk+vo)", choices=("qk", "vo"))
    symmetric: bool = option(False, "symmetrise W_qk (approximate)")
    drop_mlp: bool = option(False, "remove feed-forward sub-blocks (approximate)")

    def __post_init__(self):
        if not self.collapse and not self.drop_mlp:
            raise UserError("mlpfree: nothing to do; give collapse=qk, collapse=vo, collapse=qk+vo or drop_mlp=true")
        if self.symmetric and "qk" not in self.collapse:
            raise UserError("mlpfree: symmetric=true needs collapse=qk")

    def is_exact(self) -> bool:
        return not self.symmetric and not self.drop_mlp

    def touches_sites(self) -> bool:
        return bool(self.collapse)  # drop_mlp alone rewrites feed-forward blocks, not attention

    def skip_reason(self, site: AttentionSite) -> str | None:
        if site.rule not in ("eager", "onnx-attention"):
            return f"a {site.rule} op: collapse needs Q/K/V in [B, H, S, D] from their projections"
        if site.heads is None or site.head_dim is None or site.scale is None:
            return "heads or head size unknown (the model did not run on sample inputs)"
        if site.probs_shared:
            return "its attention probabilities are used outside the attention too"
        for which in (("q", "k") if "qk" in self.collapse else ()) + (("v",) if "vo" in self.collapse else ()):
            got = plain_projection(site, which)
            if isinstance(got, str):
                return got
        if "vo" in self.collapse and "o" not in site.projections:
            return "no output projection found after the attention"
        return None

    def needs_opset(self) -> int:
        return 18

    def rewrite_graph_fx(self, gm, gv) -> list[str]:
        """drop_mlp on torch.fx."""
        if not self.drop_mlp:
            return []
        notes = []
        for add, x, nodes in mlp_blocks(gv):
            from attn_opt.backends.torch_fx import erase_dead

            add.outputs[0].native.replace_all_uses_with(x.native)
            erase_dead(gm.graph, {n.name for n in nodes} | {add.name})
            notes.append(f"dropped the feed-forward block ending at {add.name} ({len(nodes)} nodes)")
        return notes or ["drop_mlp: no feed-forward block found"]

    def rewrite_graph(self, model, gv) -> list[str]:
        """drop_mlp: x + MLP(norm(x)) becomes x, for every feed-forward block found."""
        if not self.drop_mlp:
            return []
        notes = []
        for add, x, nodes in mlp_blocks(gv):
            out = add.outputs[0].native
            keep_name = out.name if out.is_graph_output() else None
            out.replace_all_uses_with(x.native, replace_graph_outputs=True)
            if keep_name:
                raise UserError("mlpfree: a feed-forward block ends at a graph output; dropping it would rename the output")
            notes.append(f"dropped the feed-forward block ending at {add.name} ({len(nodes)} nodes)")
        if not notes:
            notes.append("drop_mlp: no feed-forward block found")
        return notes

    def weights(self, site: AttentionSite) -> dict:
        """The collapsed matrices of `site` (shared by both IRs): w_qk [D+1, H·(D+1)] with the
        hidden states xq, xk; w_vo [D+1, H·D] with xv and the output projection; notes."""
        h, d, g = site.heads, site.head_dim, site.heads // site.kv_heads
        out: dict = {"notes": []}
        if "qk" in self.collapse:
            lq, lk = plain_projection(site, "q"), plain_projection(site, "k")
            wq, wk = lq.augmented, lk.augmented
            heads = []
            for i in range(h):
                w = wq[:, i * d:(i + 1) * d] @ wk[:, (i // g) * d:(i // g + 1) * d].T  # [D+1, D+1]
                heads.append((w + w.T) / 2 if self.symmetric else w)
            out.update(w_qk=np.concatenate(heads, axis=1), xq=lq.x, xk=lk.x, dm=wq.shape[0])
            out["notes"].append(_size_note("qk", h, wq.shape[0], d, self.symmetric))
        if "vo" in self.collapse:
            lv, o = plain_projection(site, "v"), site.projections["o"]
            wo = (o.weight.const.T if o.transposed else o.weight.const).astype(np.float64)  # [H*dv, D]
            dv = wo.shape[0] // h
            wv = lv.augmented
            out.update(w_vo=np.concatenate([wv[:, (i // g) * dv:(i // g + 1) * dv] @ wo[i * dv:(i + 1) * dv]
                                            for i in range(h)], axis=1), xv=lv.x, o=o)
            out["notes"].append(_size_note("vo", h, wv.shape[0], dv, False))
        return out

    def rewrite_fx(self, gm, site, diag=None) -> str:
        from attn_opt.backends.torch_fx import emit_collapse

        w = self.weights(site)
        emit_collapse(gm, site, w)
        return "; ".join(w["notes"])

    def rewrite_onnx(self, e, choice) -> str:
        site = e.site
        h, g = site.heads, site.heads // site.kv_heads
        w = self.weights(site)
        e.compute_in_fp32()
        q_in = k_in = None
        work = site
        if "w_qk" in w:
            dm = w["dm"]
            q_in = _heads(e, e.op("MatMul", [_augment(e, e.value(w["xq"])), e.initializer("w_qk", w["w_qk"])]), h, dm)
            k_in = e.op("Unsqueeze", [_augment(e, e.value(w["xk"])), e.ints(1)])  # one shared "head": [B, 1, T, D+1]
            work = dataclasses.replace(work, kv_heads=1, head_dim=dm)
        probs = emit_scores_probs(e, work, q_in, k_in)  # [B, H, Tq, Tk]
        if "w_vo" in w:
            o = w["o"]
            d_model = w["w_vo"].shape[1] // h
            v_all = _heads(e, e.op("MatMul", [_augment(e, e.value(w["xv"])), e.initializer("w_vo", w["w_vo"])]), h, d_model)
            out = e.op("ReduceSum", [e.op("MatMul", [probs, v_all]), e.ints(1)], {"keepdims": 0})  # Σ_h P_h V'_h
            if o.bias is not None:  # a Gemm/Linear output projection adds its bias itself
                out = e.op("Add", [out, e.value(o.bias)])
            e.commit_value(_output_of(e, o.node), e.back(out))
        else:
            v = e.bhsd(site.v)
            shape = e.op("Concat", [e.shape_dim(v, 0), e.ints(site.kv_heads, g), e.op("Shape", [probs], {"start": 2})],
                         {"axis": 0})
            o5 = e.op("MatMul", [e.op("Reshape", [probs, shape]), e.op("Unsqueeze", [v, e.ints(2)])])
            full = e.op("Concat", [e.shape_dim(v, 0), e.ints(h), e.op("Shape", [probs], {"start": 2, "end": 3}),
                                   e.shape_dim(v, 3)], {"axis": 0})
            e.commit(e.back(e.op("Reshape", [o5, full])))
        return "; ".join(w["notes"])


def _augment(e, x):
    """[.., D] → [.., D+1] with a ones column (carries the biases through the product)."""
    ones = e.op("ConstantOfShape", [e.op("Concat", [e.op("Shape", [x], {"end": -1}), e.ints(1)], {"axis": 0})],
                {"value": __import__("onnx_ir").tensor(np.ones(1, np.float32))})
    return e.op("Concat", [x, ones], {"axis": -1})


def _heads(e, x, h: int, width: int):
    """[B, T, H*width] → [B, H, T, width]."""
    return e.op("Transpose", [e.op("Reshape", [x, e.ints(0, 0, h, width)])], {"perm": [0, 2, 1, 3]})


def _output_of(e, node_name: str):
    for n in e.model.graph:
        if n.name == node_name:
            return n.outputs[0]
    raise UserError(f"mlpfree: projection node {node_name} vanished")


def _size_note(kind: str, h: int, dm: int, d: int, symmetric: bool) -> str:
    new, old = h * dm * dm, h * 2 * dm * d
    verdict = "smaller" if new < old else "BIGGER: collapsing pays only when d > (D+1)/2"
    sym = f"; symmetric: {h * dm * (dm + 1) // 2} free, stored in full" if symmetric else ""
    return f"collapse-{kind}: {new} weights instead of {old} ({verdict}{sym})"


ACTIVATIONS = {"Gelu", "Relu", "Erf", "Sigmoid", "Tanh", "Softplus", "FastGelu", "BiasGelu", "QuickGelu", "HardSigmoid",
               "Elu", "LeakyRelu", "Mish", "Silu", "Swish"}


def mlp_blocks(gv) -> list[tuple]:
    """Feed-forward sub-blocks as (residual Add, its skip input x, region of nodes):
    the region between x and the Add's other input holds two or more weight products
    and an activation, no softmax, and is left only through that input (single exit)."""
    import networkx as nx

    from attn_opt.patterns.layout import weight_like

    g = nx.DiGraph()
    for n in gv.nodes:
        g.add_node(id(n))
        for v in n.inputs:
            if v is not None and v.producer is not None:
                g.add_edge(id(v.producer), id(n))
    by_id = {id(n): n for n in gv.nodes}
    blocks = []
    for add in gv.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(i is None or i.const is not None for i in add.inputs):
            continue
        for x, y in (add.inputs, add.inputs[::-1]):
            yp = y.producer
            if yp is None:
                continue
            starts = {id(u) for u in x.users if u is not add}
            reach = set(starts)
            for s_ in starts:
                reach |= nx.descendants(g, s_)
            region = (nx.ancestors(g, id(yp)) | {id(yp)}) & reach
            nodes = [by_id[i] for i in region]
            if not nodes or any(n.op == "Softmax" for n in nodes):
                continue
            inside = {id(v) for n in nodes for v in n.outputs}
            closed_in = all(v is None or v is x or v.const is not None or id(v) in inside or weight_like(v)
                            or v.dtype in ("int64", "int32")  # shape data computed elsewhere (dynamo exports)
                            for n in nodes for v in n.inputs)
            def users(v):  # torch.export's metadata assertions are not uses
                return [u for u in v.users if u.op != "Assert"]

            single_exit = all(all(id(u) in region for u in users(v)) or v is y
                              for n in nodes for v in n.outputs) and all(u is add for u in users(y))
            products = sum(n.op in ("MatMul", "Gemm", "Linear") and any(weight_like(i) for i in n.inputs[1:]) for n in nodes)
            if closed_in and single_exit and products >= 2 and any(n.op in ACTIVATIONS for n in nodes):
                blocks.append((add, x, nodes))
                break
    return blocks
