"""The shared table of hand-written attention variants.

Each row is one alternative of the canonical pattern (scale, mask, layout, GQA, fused
call) or a softmax that is *not* attention. Structural, numeric and negative tests all
draw from this table, on every front end (symbolic_trace, torch.export, Dynamo, both
ONNX exporters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

B, S, S_KV, D_MODEL, H, D = 2, 7, 5, 32, 4, 8  # odd lengths on purpose


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    sites: int
    heads: int | None = H
    kv_heads: int | None = H
    causal: bool | None = False
    masks: frozenset = frozenset({"none"})
    kind: str = "self"
    # front ends that cannot express this model (or whose reading is not written: "fx:<front>"), with the reason
    skip: dict[str, str] = field(default_factory=dict)


class _Attn(nn.Module):
    """Q/K/V/O projections around an attention core written in `core`."""

    def __init__(self, kv_heads: int = H, cross: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.kv_heads = kv_heads
        self.q = nn.Linear(D_MODEL, H * D)
        self.k = nn.Linear(D_MODEL, kv_heads * D)
        self.v = nn.Linear(D_MODEL, kv_heads * D)
        self.o = nn.Linear(H * D, D_MODEL)
        self.cross = cross

    def split(self, x, heads):  # [B, S, heads*D] -> [B, heads, S, D]
        return x.view(x.shape[0], x.shape[1], heads, D).transpose(1, 2)

    def attend(self, x, src, *mask):
        q, k, v = self.split(self.q(x), H), self.split(self.k(src), self.kv_heads), self.split(self.v(src), self.kv_heads)
        o = self.core(q, k, v, *mask)
        return self.o(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D))

    def forward(self, x):  # explicit signatures: symbolic_trace cannot take *args
        return self.attend(x, x)


class _Masked(_Attn):
    def forward(self, x, mask):
        return self.attend(x, x, mask)


class _Cross(_Attn):
    def forward(self, x, y):
        return self.attend(x, y)


def _core(fn, base=_Attn):
    class M(base):
        core = staticmethod(fn)

    M.__name__ = fn.__name__
    return M


SCALE = 1 / math.sqrt(D)


def div_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v


def mul_scale(q, k, v):
    return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) * SCALE, dim=-1), v)


def prescaled_q(q, k, v):
    return torch.softmax((q * SCALE) @ k.transpose(-1, -2), -1) @ v


def no_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def additive_mask(q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE + mask, dim=-1) @ v


def bool_mask_where(q, k, v, mask):
    s = q @ k.transpose(-2, -1) * SCALE
    return torch.softmax(torch.where(mask, s, torch.finfo(torch.float32).min), dim=-1) @ v


def causal_tril(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    keep = torch.ones_like(s, dtype=torch.bool).tril()  # shapes only: still a causal mask
    s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(dim=-1) @ v


def einsum_form(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def dropout_cast(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(p, p=0.1, training=False) @ v


def repeat_kv(q, k, v):
    b, hk, s = k.shape[0], k.shape[1], k.shape[2]  # no tuple unpacking: symbolic_trace
    g = H // hk
    k = k[:, :, None, :, :].expand(b, hk, g, s, D).reshape(b, hk * g, s, D)
    v = v[:, :, None, :, :].expand(b, hk, g, s, D).reshape(b, hk * g, s, D)
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def repeat_interleave(q, k, v):
    g = H // k.shape[1]
    k, v = torch.repeat_interleave(k, g, dim=1), torch.repeat_interleave(v, g, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_bool_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PreTransposedK(_Attn):
    """K laid out [B, H, D, S] straight from the projection (permute(0, 2, 3, 1))."""

    def forward(self, x):
        q = self.split(self.q(x), H)
        kt = self.k(x).view(x.shape[0], x.shape[1], H, D).permute(0, 2, 3, 1)
        v = self.split(self.v(x), H)
        o = torch.softmax(q @ kt * SCALE, dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D))


class ProbsTwice(_Attn):
    """The probabilities are also returned (output_attentions): still a site."""

    def forward(self, x):
        q, k, v = self.split(self.q(x), H), self.split(self.k(x), H), self.split(self.v(x), H)
        p = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
        o = self.o((p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D))
        return o, p


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(D_MODEL, 10)

    def forward(self, x):
        return torch.softmax(self.fc(x.mean(1)), dim=-1)


class MoEGate(nn.Module):
    """A mixture-of-experts router: softmax over expert logits, top-2, weighted sum."""

    def __init__(self, experts: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(D_MODEL, experts)
        self.experts = nn.ModuleList(nn.Linear(D_MODEL, D_MODEL) for _ in range(experts))

    def forward(self, x):
        w = torch.softmax(self.router(x), dim=-1)  # [B, S, E]
        outs = torch.stack([e(x) for e in self.experts], dim=-1)  # [B, S, D, E]
        top, idx = w.topk(2, dim=-1)
        keep = torch.zeros_like(w).scatter(-1, idx, top)
        return (outs * keep.unsqueeze(2)).sum(-1)


class SoftmaxWeights(nn.Module):
    """softmax(x W1) W2: a MatMul chain with weights, not attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(D_MODEL, 16))
        self.w2 = nn.Parameter(torch.randn(16, D_MODEL))

    def forward(self, x):
        return torch.softmax(x @ self.w1, dim=-1) @ self.w2


class SinkLogits(_Attn):
    """gpt-oss: a learned logit per head as one more score column, sliced off before ·V."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.linspace(-1.0, 2.0, H))

    def core(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        s = torch.cat([s, sinks], dim=-1)
        s = s - s.max(dim=-1, keepdim=True).values
        return torch.softmax(s, dim=-1)[..., :-1] @ v


def subtracted_mask(q, k, v, mask):  # XLNet: s − 1e30·mask, mask 1 where hidden
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE - 1e30 * mask, dim=-1) @ v


def subtracted_inverse_mask(q, k, v, mask):  # Funnel: s − INF·(1 − mask), mask 1 where seen
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE - 1e6 * (1.0 - mask), dim=-1) @ v


def masked_after_softmax(q, k, v, mask):  # DeBERTa's XSoftmax (SEW-D): hidden keys zeroed again after
    hidden = ~mask
    p = torch.softmax((q @ k.transpose(-2, -1) * SCALE).masked_fill(hidden, torch.finfo(torch.float32).min), -1)
    return p.masked_fill(hidden, 0.0) @ v


def masked_after_only(q, k, v, mask):  # zeroed after the softmax, never renormalised: not attention's weights
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, -1).masked_fill(~mask, 0.0) @ v


class FoldedWindows(nn.Module):
    """SAM's windowed attention: windows and heads folded into one batch axis, the scores
    3-D [B·windows·H, q, k] with a decomposed relative-position bias (computed from the
    queries) added in that layout, the output unfolded by a reshape to [B·windows, H, h, w, D]."""

    def __init__(self, win: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.win = win
        self.qkv = nn.Linear(D_MODEL, 3 * H * D)
        self.proj = nn.Linear(H * D, D_MODEL)
        self.rel_h = nn.Parameter(torch.randn(2 * win - 1, D) * 0.5)
        self.rel_w = nn.Parameter(torch.randn(2 * win - 1, D) * 0.5)
        c = torch.arange(win)
        self.register_buffer("idx", (c[:, None] - c[None, :] + win - 1), persistent=False)

    def forward(self, x):  # x: [B, Gh, Gw, C], the grid a multiple of the window
        b, gh, gw, c = x.shape
        w = self.win
        x = x.view(b, gh // w, w, gw // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, w * w, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, n * H, w * w, D).unbind(0)
        s = (q * SCALE) @ k.transpose(-2, -1)
        rq = q.reshape(n * H, w, w, D)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, self.rel_h[self.idx])
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, self.rel_w[self.idx])
        s = s + (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape_as(s)
        o = (torch.softmax(s, dim=-1) @ v).reshape(n, H, w, w, D).permute(0, 2, 3, 1, 4).reshape(n, w, w, H * D)
        o = self.proj(o).view(b, gh // w, gw // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
        return o.reshape(b, gh, gw, c)


def _x_grid():
    torch.manual_seed(1)
    return (torch.randn(B, 6, 6, D_MODEL),)


class CosineWindows(nn.Module):
    """Swin v2: cosine scores normalize(q)·normalize(k)ᵀ times a learned per-head
    temperature exp(clamp(logit_scale)), plus 16·σ(a small MLP over relative coordinates)
    as the position bias, and the shifted-window mask added through view → add → view
    ([B·windows, H, T, T] scores seen as [B, windows, H, T, T])."""

    def __init__(self, windows: int = 2, t: int = S):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(D_MODEL, H * D), nn.Linear(D_MODEL, H * D, bias=False), nn.Linear(D_MODEL, H * D)
        self.o = nn.Linear(H * D, D_MODEL)
        self.logit_scale = nn.Parameter(torch.log(torch.linspace(5.0, 20.0, H)).reshape(H, 1, 1))
        self.cpb = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, H, bias=False))
        c = torch.arange(t, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1) / t  # [T, T, 2] relative coordinates
        self.register_buffer("coords", coords[:, :, :1] - coords[:, :, 1:].transpose(0, 1), persistent=False)
        self.register_buffer("coords2", torch.cat([self.coords, self.coords.transpose(0, 1)], -1), persistent=False)
        self.windows = windows

    def forward(self, x, mask):  # x: [B·windows, T, C]; mask: [windows, T, T], 0 or -100 (shifted windows)
        n, t, _ = x.shape
        q, k, v = (f(x).view(n, t, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        s = s * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        bias = 16 * torch.sigmoid(self.cpb(self.coords2).permute(2, 0, 1))
        s = s + bias.unsqueeze(0)
        s = s.view(n // self.windows, self.windows, H, t, t) + mask.unsqueeze(1).unsqueeze(0)
        s = s.view(-1, H, t, t)
        o = torch.softmax(s, dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(n, t, H * D))


def _x_shifted():
    torch.manual_seed(1)
    m = torch.zeros(2, S, S)
    m[1, :3, 3:] = -100.0  # the second window's two regions do not see each other
    m[1, 3:, :3] = -100.0
    return torch.randn(2 * B, S, D_MODEL), m


class StreamEinsum(_Attn):
    """ProphetNet's n-gram predict streams: two query streams attend in one einsum
    `bnhtc,bnhsc->bnhts` (scores [B, N, H, T, S]), a 5-D bias per stream, the mask
    broadcast over the streams, and `bnhts,bnhsc->bnhtc` with V."""

    def __init__(self):
        super().__init__()
        self.stream = nn.Parameter(torch.randn(2, 1, 1, D_MODEL) * 0.5)
        self.bias = nn.Parameter(torch.randn(1, 2, H, S, S) * 0.5)

    def forward(self, x, mask):  # mask: [B, 1, 1, 1, S], additive
        b, t, _ = x.shape
        xs = x.unsqueeze(1) + self.stream.transpose(0, 1)  # [B, N, T, C]: one query stream each
        q = self.q(xs).view(b, 2, t, H, D).transpose(2, 3)
        k, v = (f(xs).view(b, 2, t, H, D).transpose(2, 3) for f in (self.k, self.v))
        s = torch.einsum("bnhtc,bnhsc->bnhts", q * SCALE, k) + self.bias + mask
        o = torch.einsum("bnhts,bnhsc->bnhtc", torch.softmax(s, -1), v)
        return self.o(o.transpose(2, 3).reshape(b, 2, t, H * D))


def _x_stream_mask():
    x, m = _x_additive()
    return x, m.unsqueeze(1)


def _x_bool_dead_row():
    x, m = _x_bool()
    m[0, ..., :] = False  # a row that sees no key: zeros here, uniform weights without the second mask
    return x, m


def _x():
    torch.manual_seed(1)
    return (torch.randn(B, S, D_MODEL),)


def _x_additive():
    torch.manual_seed(1)
    m = torch.zeros(B, 1, 1, S)
    m[-1, ..., -2:] = torch.finfo(torch.float32).min
    return torch.randn(B, S, D_MODEL), m


def _x_bool():
    torch.manual_seed(1)
    m = torch.ones(B, 1, 1, S, dtype=torch.bool)
    m[-1, ..., -2:] = False
    return torch.randn(B, S, D_MODEL), m


def _x_hidden():
    torch.manual_seed(1)
    m = torch.zeros(B, 1, 1, S)
    m[-1, ..., -2:] = 1.0  # 1 where a key is hidden
    return torch.randn(B, S, D_MODEL), m


def _x_seen():
    x, m = _x_hidden()
    return x, 1.0 - m


def _x_cross():
    torch.manual_seed(1)
    return torch.randn(B, S, D_MODEL), torch.randn(B, S_KV, D_MODEL)


PAD = frozenset({"additive", "boolean"})
_NO_TS_GQA = {"torchscript": "the TorchScript exporter has no enable_gqa"}

VARIANTS = [
    Variant("div-scale", _core(div_scale), _x, 1),
    Variant("mul-scale", _core(mul_scale), _x, 1),
    Variant("prescaled-q", _core(prescaled_q), _x, 1),
    Variant("no-scale", _core(no_scale), _x, 1),
    Variant("additive-mask", _core(additive_mask, _Masked), _x_additive, 1, masks=PAD),
    Variant("bool-mask-where", _core(bool_mask_where, _Masked), _x_bool, 1, masks=PAD),
    Variant("causal-tril", _core(causal_tril), _x, 1, causal=True, masks=frozenset({"causal"})),
    Variant("einsum", _core(einsum_form), _x, 1),
    Variant("dropout-cast", _core(dropout_cast), _x, 1),
    Variant("pre-transposed-k", PreTransposedK, _x, 1),
    Variant("gqa-repeat-kv", lambda: _core(repeat_kv)(kv_heads=2), _x, 1, kv_heads=2),
    Variant("gqa-repeat-interleave", lambda: _core(repeat_interleave)(kv_heads=2), _x, 1, kv_heads=2),
    Variant("mqa-repeat-kv", lambda: _core(repeat_kv)(kv_heads=1), _x, 1, kv_heads=1),
    Variant("sdpa-causal", _core(sdpa_causal), _x, 1, causal=True, masks=frozenset({"causal"})),
    Variant("sdpa-gqa", lambda: _core(sdpa_gqa)(kv_heads=2), _x, 1, kv_heads=2, skip=_NO_TS_GQA),
    Variant("sdpa-bool-mask", _core(sdpa_bool_mask, _Masked), _x_bool, 1, masks=PAD),
    Variant("cross-attention", lambda: _core(div_scale, _Cross)(cross=True), _x_cross, 1, kind="cross"),
    Variant("probs-twice", ProbsTwice, _x, 1),
    Variant("sink-logits", SinkLogits, _x, 1),
    Variant("subtracted-mask", _core(subtracted_mask, _Masked), _x_hidden, 1, masks=PAD),
    Variant("masked-after-softmax", _core(masked_after_softmax, _Masked), _x_bool_dead_row, 1, masks=PAD,
            skip={"fx:export": "rows zeroed after the softmax are not lowered on torch.fx yet"}),
    Variant("subtracted-inverse-mask", _core(subtracted_inverse_mask, _Masked), _x_seen, 1, masks=PAD),
    Variant("folded-windows", FoldedWindows, _x_grid, 1, masks=frozenset({"additive"})),
    Variant("cosine-windows", CosineWindows, _x_shifted, 1, masks=frozenset({"additive"})),
    Variant("stream-einsum", StreamEinsum, _x_stream_mask, 1, masks=PAD),
    # negatives: softmaxes that are not attention
    Variant("classifier-head", ClassifierHead, _x, 0),
    Variant("masked-after-only", _core(masked_after_only, _Masked), _x_bool, 0),
    Variant("moe-gate", MoEGate, _x, 0),
    Variant("softmax-weights", SoftmaxWeights, _x, 0),
]
BY_NAME = {v.name: v for v in VARIANTS}
