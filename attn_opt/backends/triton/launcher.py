"""`attention(...)`: the Triton kernel for CUDA tensors (or any tensors under
TRITON_INTERPRET=1, which is how the tests run it on the CPU), the PyTorch reference
otherwise. Both compute the same forms, handed over as the `Pattern` and `Normaliser`
objects themselves; `CAPABILITIES` declares the subset the kernel covers and why it
declines the rest; see kernels.py."""

from __future__ import annotations

import math
import os

import torch

from attn_opt.core.errors import NotSupported
from attn_opt.patterns.capability import Capabilities
from attn_opt.patterns.form import SOFTMAX, Form, Normaliser, Pattern
from attn_opt.patterns.site import MASKED

NORM = {"softmax": 0, "logit": 0, "softplus": 1, "sigmoid": 2}  # the kernel's NORM switch (a sink logit: softmax + SINK_LOGIT)


def _window_switches(p: Pattern, t: int) -> dict:
    return dict(WINDOW=p.window, DILATION=p.dilation, SINKS=p.sinks)


def _selection_switches(p: Pattern, t: int) -> dict:
    return dict(BLOCK=p.block)


def _kernel_limits(_site, form: Form) -> str | None:
    p = form.pattern
    if p is not None and p.selection is not None:
        if form.normaliser.kind != "softmax":
            return "the block-sparse kernel normalises with softmax only"
    if form.normaliser.calibrated:
        return "calibrated per-head parameters are not kernel switches"
    if form.pattern is not None and form.pattern.dense_heads:
        return "dense heads beside sparse ones"
    return None


CAPABILITIES = Capabilities(
    "triton",
    normaliser={kind: switch for kind, switch in NORM.items()},
    pattern={"window": _window_switches},
    selection={"topk": _selection_switches},
    declined={"redistribute": "the kernel normalises in one pass; redistribute needs the sink mass first",
              "relu": "no ReLU branch in the kernel", "shift": "the kernel's window is a centred band",
              "stride": "the kernel's window is per query, not per query block",
              "grid": "the kernel reads 1-D token order", "fused": "the kernel is the attention itself",
              "gate": "a gate is an epilogue the FX lowering adds outside the kernel",
              "collapse": "collapsed weights are computed in PyTorch", "stream": "a cache is the graph's business",
              "lora": "a LoRA is an epilogue the FX lowering adds outside the kernel",
              "latent": "the latent factorises projections outside the kernel (the FX lowering)",
              "pyramid": "the kernel has no pooled key levels",
              "routing": "the kernel takes key blocks, not per-query clusters of keys"},
    limits=_kernel_limits)


def reason(q, k, v, causal: bool, form: Form, key_bias) -> str | None:
    """Why the kernel cannot compute this call (None: it can): the kinds it lacks, its
    limits, and what its tiles assume (dv = d; queries aligned with keys under a window or
    the causal triangle)."""
    if (why := CAPABILITIES.supports(None, form)) is not None:
        return why
    if v.shape[-1] != q.shape[-1]:
        return "values of another width than the queries"
    p = form.pattern
    if p is not None and p.selection is not None and (p.block < 16 or p.block & (p.block - 1)):
        return f"the block-sparse kernel's tiles are the blocks: block={p.block} is not a power of two >= 16"
    if (causal or form.pattern is not None) and q.shape[2] != k.shape[2]:
        return "fewer queries than keys with a window or the causal triangle"
    return None


def reference(q, k, v, *, pattern: Pattern | None = None, normaliser: Normaliser = SOFTMAX, scale=None,
              causal=False, key_bias=None, sink_logit=None, gate=None):
    """The forms in plain PyTorch: dense scores, the torch lowering's visibility and normalisers."""
    from attn_opt.backends.torch.forms import normalise, pattern_visible

    b, h, tq, d = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    scale = d ** -0.5 if scale is None else scale
    s = q.float() @ k.transpose(-1, -2) * scale
    tk = k.shape[2]
    if pattern is not None and pattern.selection is not None:
        vis = _content_visible(pattern, q, k, scale, key_bias)
    elif pattern is not None:
        vis = pattern_visible(pattern, tq, tk, q.device)
    else:
        vis = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        vis = vis & (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + tk - tq) if causal else vis
    vis = vis.expand(s.shape)
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
        vis = vis & (s > MASKED)
    params = {"bias": sink_logit} if sink_logit is not None else None
    per_head = lambda vals: torch.as_tensor(vals, dtype=s.dtype).reshape(1, h, 1, 1)  # noqa: E731
    p = normalise(normaliser, s, vis, per_head, h, params)
    out = p @ v
    if gate is not None:
        out = out * torch.sigmoid(gate)[..., None]
    return out.to(q.dtype)


def _kept_blocks(pattern: Pattern, q, k, scale: float, key_bias):
    """[B, Hkv, nbq, C] int64: the key blocks each query block keeps (the torch lowering's
    choice, patterns/reference.py: selected_blocks; padding keys ranked last)."""
    from attn_opt.backends.torch.gathered import choose_blocks

    sees = None if key_bias is None else (key_bias > MASKED)[:, None, None, :]
    nbk = -(-k.shape[2] // pattern.block)
    return choose_blocks(pattern, q, k, scale, sees)[..., :pattern.kept_blocks(nbk)]


def _content_visible(pattern: Pattern, q, k, scale: float, key_bias):
    """[B, H, Tq, Tk] bool: the pairs the selection keeps (causality on top where causal)."""
    tq, tk, blk = q.shape[2], k.shape[2], pattern.block
    idx = _kept_blocks(pattern, q, k, scale, key_bias)
    kept = torch.zeros(idx.shape[:3] + (-(-tk // blk),), dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    i, j = torch.arange(tq, device=q.device), torch.arange(tk, device=q.device)
    vis = kept[:, :, i // blk][..., j // blk]
    if pattern.causal:
        vis = vis & (j[None, :] <= i[:, None] + tk - tq)
    return vis.repeat_interleave(q.shape[1] // k.shape[1], 1)


def _block_sparse(q, k, v, pattern: Pattern, scale: float, key_bias):
    import triton

    from attn_opt.backends.triton.kernels import block_sparse_fwd

    b, h, tq, d = q.shape
    tk, blk = k.shape[2], pattern.block
    idx = _kept_blocks(pattern, q, k, scale, key_bias).to(torch.int32).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    kb = key_bias.contiguous().float() if key_bias is not None else torch.zeros(1, device=q.device)
    block_sparse_fwd[(triton.cdiv(tq, blk), b * h)](
        q, k, v, o, kb, idx, tq, tk, d, h, h // k.shape[1], idx.shape[-1], scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        kb.stride(0) if key_bias is not None else 0, idx.stride(0), idx.stride(1), idx.stride(2),
        BLOCK=blk, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=bool(pattern.causal),
        KEY_BIAS=key_bias is not None)
    return o


def use_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def attention(q, k, v, *, pattern: Pattern | None = None, normaliser: Normaliser = SOFTMAX, scale=None,
              causal=False, key_bias=None, sink_logit=None, gate=None, block_m: int = 16, block_n: int = 16):
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] in the form `pattern` × `normaliser`; key_bias
    [B, Tk] (padding); sink_logit [H], a trained sink logit in place of the normaliser's
    `bias`; gate [B, H, Tq]. A form the kernel does not cover is refused (`reason`)."""
    form = Form(pattern=pattern, normaliser=normaliser)
    if (why := reason(q, k, v, causal, form, key_bias)) is not None:
        raise NotSupported(f"the Triton kernel cannot compute this: {why}")
    opts = dict(pattern=pattern, normaliser=normaliser, scale=scale, causal=causal, key_bias=key_bias,
                sink_logit=sink_logit, gate=gate)
    if not use_kernel(q):
        return reference(q, k, v, **opts)
    if pattern is not None and pattern.selection is not None:
        return _block_sparse(q, k, v, pattern, q.shape[-1] ** -0.5 if scale is None else scale, key_bias)
    import triton

    from attn_opt.backends.triton.kernels import attention_fwd

    b, h, tq, d = q.shape
    tk = k.shape[2]
    n = normaliser
    norm = CAPABILITIES.implementation("normaliser", n.kind)
    window = CAPABILITIES.implementation("pattern", pattern.kind)(pattern, tk) if pattern is not None else {}
    if n.kind == "logit" and sink_logit is None:
        sink_logit = torch.tensor(n.per_head_bias(h), device=q.device)
    score_bias = torch.tensor(n.per_head_bias(h), device=q.device) if n.kind == "sigmoid" and n.bias is not None else None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    kb = key_bias.contiguous().float() if key_bias is not None else dummy
    sl = sink_logit.reshape(-1).contiguous().float() if sink_logit is not None else dummy
    sb = score_bias.contiguous().float() if score_bias is not None else dummy
    gt = gate.contiguous().float() if gate is not None else dummy
    grid = (triton.cdiv(tq, block_m), b * h)
    length_scale = n.kind == "softplus" and bool(n.n_train)
    attention_fwd[grid](
        q, k, v, o, kb, sl, gt, sb, tq, tk, d, h, h // k.shape[1], d ** -0.5 if scale is None else scale,
        math.log(n.n_train) if length_scale else 1.0, float(n.p) if n.kind == "softplus" else 1.0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        kb.stride(0) if key_bias is not None else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        WINDOW=int(window.get("WINDOW", 0)), CAUSAL=bool(causal), DILATION=int(window.get("DILATION", 1)),
        SINKS=int(window.get("SINKS", 0)), NORM=norm, LENGTH_SCALE=length_scale,
        SINK_LOGIT=sink_logit is not None, GATE=gate is not None, KEY_BIAS=key_bias is not None,
        SCORE_BIAS=score_bias is not None)
    return o
