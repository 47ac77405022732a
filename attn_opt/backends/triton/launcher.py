"""`attention(...)`: the Triton kernel for CUDA tensors (or any tensors under
TRITON_INTERPRET=1, which is how the tests run it on the CPU), the PyTorch reference
otherwise. Both compute the same forms; see kernels.py."""

from __future__ import annotations

import math
import os

import torch

from attn_opt.patterns.form import Normaliser, Pattern
from attn_opt.patterns.site import MASKED

NORMS = ("softmax", "softplus", "sigmoid")  # the kernel's NORM switch


def _normaliser(normaliser: str, n_train, power, sink_logit, score_bias) -> Normaliser:
    if normaliser == "softplus":
        return Normaliser("softplus", n_train=n_train, p=power)
    if normaliser == "sigmoid":
        return Normaliser("sigmoid", bias=None if score_bias is None else tuple(score_bias.tolist()))
    return Normaliser("logit", bias=tuple(sink_logit.tolist())) if sink_logit is not None else Normaliser()


def reference(q, k, v, *, scale=None, causal=False, window=0, dilation=1, sinks=0, key_bias=None,
              normaliser="softmax", n_train=None, power=1.0, sink_logit=None, score_bias=None, gate=None):
    """The forms in plain PyTorch: dense scores, the torch lowering's visibility and normalisers."""
    from attn_opt.backends.torch.forms import normalise, pattern_visible

    b, h, tq, d = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    scale = d ** -0.5 if scale is None else scale
    s = q.float() @ k.transpose(-1, -2) * scale
    tk = k.shape[2]
    if window:
        vis = pattern_visible(Pattern("window", causal, window, 1, sinks=sinks, dilation=dilation), tq, tk, q.device)
    else:
        vis = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        vis = vis & (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + tk - tq) if causal else vis
    vis = vis.expand(s.shape)
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
        vis = vis & (s > MASKED)
    n = _normaliser(normaliser, n_train, power, sink_logit, score_bias)
    p = normalise(n, s, vis, lambda vals: torch.as_tensor(vals, dtype=s.dtype).reshape(1, h, 1, 1), h)
    out = p @ v
    if gate is not None:
        out = out * torch.sigmoid(gate)[..., None]
    return out.to(q.dtype)


def use_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def attention(q, k, v, *, scale=None, causal=False, window=0, dilation=1, sinks=0, key_bias=None,
              normaliser="softmax", n_train=None, power=1.0, sink_logit=None, score_bias=None, gate=None,
              block_m: int = 16, block_n: int = 16):
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D]; key_bias [B, Tk]; sink_logit [H] (softmax);
    score_bias [H] (sigmoid's b; None: −log n_i); gate [B, H, Tq]."""
    opts = dict(scale=scale, causal=causal, window=window, dilation=dilation, sinks=sinks, key_bias=key_bias,
                normaliser=normaliser, n_train=n_train, power=power, sink_logit=sink_logit, score_bias=score_bias,
                gate=gate)
    if normaliser not in NORMS:
        raise ValueError(f"normaliser must be one of {', '.join(NORMS)}")
    if normaliser != "softmax" and sink_logit is not None:
        raise ValueError("the sink logit belongs to the softmax normaliser")
    if normaliser != "sigmoid" and score_bias is not None:
        raise ValueError("score_bias belongs to the sigmoid normaliser")
    if not use_kernel(q):
        return reference(q, k, v, **opts)
    import triton

    from attn_opt.backends.triton.kernels import attention_fwd

    b, h, tq, d = q.shape
    tk = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    kb = key_bias.contiguous().float() if key_bias is not None else dummy
    sl = sink_logit.contiguous().float() if sink_logit is not None else dummy
    sb = score_bias.contiguous().float() if score_bias is not None else dummy
    gt = gate.contiguous().float() if gate is not None else dummy
    grid = (triton.cdiv(tq, block_m), b * h)
    attention_fwd[grid](
        q, k, v, o, kb, sl, gt, sb, tq, tk, d, h, h // k.shape[1], d ** -0.5 if scale is None else scale,
        math.log(n_train) if n_train else 1.0, float(power),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        kb.stride(0) if key_bias is not None else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        WINDOW=int(window or 0), CAUSAL=bool(causal), DILATION=int(dilation), SINKS=int(sinks),
        NORM=NORMS.index(normaliser), LENGTH_SCALE=bool(normaliser == "softplus" and n_train),
        SINK_LOGIT=sink_logit is not None, GATE=gate is not None, KEY_BIAS=key_bias is not None,
        SCORE_BIAS=score_bias is not None)
    return o
