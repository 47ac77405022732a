"""mlpfree: "Reducing the Transformer Architecture to a Minimum" (Bermeitinger et al. 2024).

collapse=qk (exact)  per head W_qk = W̃_q W̃_kᵀ, scores X̃ W_qk X̃ᵀ (X̃ = [X, 1] carries the biases)
collapse=vo (exact)  per head W_vo = W̃_v W_o, output Σ_h P_h X̃ W_vo,h (+ b_o)
symmetric=true       W_qk ← (W_qk + W_qkᵀ)/2 (approximate)
drop_mlp=true        x + MLP(norm(x)) → x for every feed-forward block (approximate)

Collapsing costs (D+1)² parameters per head instead of 2(D+1)d: it saves only when d >
(D+1)/2, and the report says so when it makes the model bigger. A collapse needs Q/K/V
to be plain projections of the hidden state: rotary embeddings or a fused QKV Split in
between are skipped with that reason. MLP blocks are found by graph regions
(patterns/mlp.py, networkx), not by names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attn_opt.patterns.form import Collapse, Form, reads_own_cache
from attn_opt.patterns.site import AttentionSite
from attn_opt.core.errors import UserError
from attn_opt.core.graph import Value
from attn_opt.core.passbase import Pass, option


@dataclass(frozen=True)
class Linear:
    x: Value
    w: np.ndarray  # [D, out]
    b: np.ndarray  # [out]

    @property
    def augmented(self) -> np.ndarray:  # [D+1, out]
        return np.vstack([self.w, self.b[None, :]]).astype(np.float64)


def _through_copies(v: Value) -> Value:
    """Back through ops that pass a tensor on unchanged in value: Identity, a float Cast
    (GPT-Neo computes attention in float32), a one-input Concat (an empty KV cache's cat)."""
    while (n := v.producer) is not None and (
            n.op == "Identity" or (n.op == "Cast" and v.dtype == (n.input(0).dtype or v.dtype) == "float32")
            or (n.op == "Concat" and len([i for i in n.inputs if i is not None]) == 1)):
        v = next(i for i in n.inputs if i is not None)
    return v


def plain_projection(site: AttentionSite, which: str) -> Linear | str:
    """The projection feeding Q/K/V through only bias Add, Reshape to heads and Transpose."""
    op = getattr(site, which)
    proj = site.projections.get(which)
    if proj is None:  # nothing next to it: rotary or other ops between (said as when one is found further back)
        return f"{which.upper()} is not a projection reshaped to heads (rotary embedding or another op in between)"
    op = dataclasses.replace(op, value=_through_copies(op.value))
    t = op.value.producer
    if op.perm is None and t is not None and t.op == "Transpose" and list(t.attrs.get("perm", [])) == [0, 2, 1, 3]:
        op = dataclasses.replace(op, value=_through_copies(t.input(0)), perm=(0, 2, 1, 3))  # kv heads before repeat_kv
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
    produces: ClassVar[str] = "collapse"
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
        if reads_own_cache(site):
            return "a fused op that reads its own present cache: rewrite the step before fusing it"
        if site.probs_shared:
            return "its attention probabilities are used outside the attention too"
        if site.pattern is not None or not site.normaliser.is_softmax:
            kept = site.pattern.describe() if site.pattern is not None else site.normaliser.describe()
            return f"its form ({kept}) would be lost: the collapsed lowering computes dense softmax attention"
        got = {}
        for which in (("q", "k") if "qk" in self.collapse else ()) + (("v",) if "vo" in self.collapse else ()):
            got[which] = plain_projection(site, which)
            if isinstance(got[which], str):
                return got[which]
        if "k" in got and got["q"].w.shape[0] != got["k"].w.shape[0]:  # BLIP-2's Q-Former reads a narrower stream
            return (f"K is projected from {got['k'].w.shape[0]}-wide hidden states, Q from {got['q'].w.shape[0]}-wide "
                    "ones: the collapsed Q·Kᵀ lowering reads both with one width")
        if "vo" in self.collapse and "o" not in site.projections:
            return "no output projection found after the attention"
        return None

    def graph_edits(self) -> tuple[str, ...]:
        return ("drop_mlp",) if self.drop_mlp else ()

    def form(self, site: AttentionSite, diag=None) -> Form:
        """The collapsed matrices of `site`: w_qk [D+1, H·(D+1)] read with the hidden
        states xq, xk; w_vo [D+1, H·D] with xv and the output projection."""
        h, d, g = site.heads, site.head_dim, site.heads // site.kv_heads
        parts, notes = {}, []
        if "qk" in self.collapse:
            lq, lk = plain_projection(site, "q"), plain_projection(site, "k")
            wq, wk = lq.augmented, lk.augmented
            heads = []
            for i in range(h):
                w = wq[:, i * d:(i + 1) * d] @ wk[:, (i // g) * d:(i // g + 1) * d].T  # [D+1, D+1]
                heads.append((w + w.T) / 2 if self.symmetric else w)
            parts.update(w_qk=np.concatenate(heads, axis=1), xq=lq.x, xk=lk.x)
            notes.append(_size_note("qk", h, wq.shape[0], d, self.symmetric))
        if "vo" in self.collapse:
            lv, o = plain_projection(site, "v"), site.projections["o"]
            wo = (o.weight.const.T if o.transposed else o.weight.const).astype(np.float64)  # [H*dv, D]
            dv = wo.shape[0] // h
            wv = lv.augmented
            parts.update(w_vo=np.concatenate([wv[:, (i // g) * dv:(i // g + 1) * dv] @ wo[i * dv:(i + 1) * dv]
                                              for i in range(h)], axis=1), xv=lv.x, o=o)
            notes.append(_size_note("vo", h, wv.shape[0], dv, False))
        return Form(collapse=Collapse(**parts), notes=tuple(notes))


def _size_note(kind: str, h: int, dm: int, d: int, symmetric: bool) -> str:
    new, old = h * dm * dm, h * 2 * dm * d
    verdict = "smaller" if new < old else "BIGGER: collapsing pays only when d > (D+1)/2"
    sym = f"; symmetric: {h * dm * (dm + 1) // 2} free, stored in full" if symmetric else ""
    return f"collapse-{kind}: {new} weights instead of {old} ({verdict}{sym})"
