"""`attention(...)`: the Triton kernel for CUDA tensors (or any tensors under
TRITON_INTERPRET=1, which is how the tests run it on the CPU), the PyTorch reference
otherwise. Both compute the same forms; see kernels.py."""

from __future__ import annotations

import math
import os

import torch


def _visible(tq: int, tk: int, causal: bool, window: int, dilation: int, sinks: int, device) -> torch.Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    d = i - j
    if window:
        vis = ((d >= 0) & (d < window * dilation)) if causal else (d.abs() <= (window // 2) * dilation)
        if dilation > 1:
            vis &= d % dilation == 0
    else:
        vis = (d >= 0) if causal else torch.ones_like(d, dtype=torch.bool)
    if sinks:
        vis |= (j < sinks) & ((d >= 0) if causal else True)
    return vis


def reference(q, k, v, *, scale=None, causal=False, window=0, dilation=1, sinks=0, key_bias=None,
              normaliser="softmax", n_train=None, power=1.0, sink_logit=None, gate=None):
    """The forms in plain PyTorch: dense scores, the normalisers of the torch.fx lowering."""
    from attn_opt.backends.torch_forms import normalise

    b, h, tq, d = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    scale = d ** -0.5 if scale is None else scale
    s = q.float() @ k.transpose(-1, -2) * scale
    vis = _visible(tq, k.shape[2], causal, window, dilation, sinks, q.device).expand(s.shape)
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
        vis = vis & (s > -1e4)
    if normaliser == "softplus":
        spec = {"kind": "softplus", "n_train": n_train, "p": power}
    else:
        spec = {"kind": "logit", "bias": sink_logit} if sink_logit is not None else {"kind": "softmax"}
    p = normalise(spec, s, vis, lambda vals: torch.as_tensor(vals, dtype=s.dtype).reshape(1, h, 1, 1), h)
    out = p @ v
    if gate is not None:
        out = out * torch.sigmoid(gate)[..., None]
    return out.to(q.dtype)


def use_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def attention(q, k, v, *, scale=None, causal=False, window=0, dilation=1, sinks=0, key_bias=None,
              normaliser="softmax", n_train=None, power=1.0, sink_logit=None, gate=None,
              block_m: int = 16, block_n: int = 16):
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D]; key_bias [B, Tk]; sink_logit [H]; gate [B, H, Tq]."""
    opts = dict(scale=scale, causal=causal, window=window, dilation=dilation, sinks=sinks, key_bias=key_bias,
                normaliser=normaliser, n_train=n_train, power=power, sink_logit=sink_logit, gate=gate)
    if normaliser not in ("softmax", "softplus"):
        raise ValueError("normaliser must be softmax or softplus")
    if normaliser == "softplus" and sink_logit is not None:
        raise ValueError("the sink logit belongs to the softmax normaliser")
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
    gt = gate.contiguous().float() if gate is not None else dummy
    grid = (triton.cdiv(tq, block_m), b * h)
    attention_fwd[grid](
        q, k, v, o, kb, sl, gt, tq, tk, d, h, h // k.shape[1], d ** -0.5 if scale is None else scale,
        math.log(n_train) if n_train else 1.0, float(power),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        kb.stride(0) if key_bias is not None else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        WINDOW=int(window or 0), CAUSAL=bool(causal), DILATION=int(dilation), SINKS=int(sinks),
        NORM=0 if normaliser == "softmax" else 1, LENGTH_SCALE=bool(normaliser == "softplus" and n_train),
        SINK_LOGIT=sink_logit is not None, GATE=gate is not None, KEY_BIAS=key_bias is not None)
    return o
