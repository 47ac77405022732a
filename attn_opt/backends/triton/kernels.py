"""A forward attention kernel, tiled the FlashAttention way, whose compile-time switches
cover the attention forms:

- WINDOW / CAUSAL / DILATION / SINKS: key blocks outside every query's window are never
  loaded (the loop bounds come from the query block), the first SINKS keys are visited
  once more as their own blocks;
- NORM: 0 softmax (online, running max), 1 softplus (single pass, no running max: with
  power p, Aᵖ/ΣAᵖ = aᵖ/Σaᵖ, so one sum suffices), with length scale
  λ_i = log(n_i) / log(n_train) from a counting pre-pass; 2 sigmoid σ(s + b), no
  normalisation, b per head (SCORE_BIAS) or −log n_i from the same counting pre-pass;
- SINK_LOGIT: exp(b_h) joins the softmax denominator (start the running max at b_h, the
  running sum at 1);
- GATE: the output multiplied by σ(g) per (batch, head, query) as an epilogue;
- GQA through the kv-head index; KEY_BIAS: an additive per-key bias ([B, Tk], padding).
A row that sees no key gives zeros.

`block_sparse_fwd`: a content pattern's attention (sparse:topk), block-sparse
FlashAttention over per-query-block key-block indices the launcher computes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attn_opt.patterns.site import MASKED as _MASKED

MASKED = tl.constexpr(_MASKED)  # a key whose bias is at or below this is hidden


@triton.jit
def _visible(offs_m, offs_n, tk, WINDOW: tl.constexpr, CAUSAL: tl.constexpr, DILATION: tl.constexpr,
             SINKS: tl.constexpr, SINK_PART: tl.constexpr):
    d = offs_m[:, None] - offs_n[None, :]
    vis = offs_n[None, :] < tk
    if SINK_PART:
        vis = vis & (offs_n[None, :] < SINKS)
        if CAUSAL:
            vis = vis & (d >= 0)
    else:
        if WINDOW > 0:
            if CAUSAL:
                vis = vis & (d >= 0) & (d < WINDOW * DILATION)
            else:
                vis = vis & (d <= (WINDOW // 2) * DILATION) & (d >= -(WINDOW // 2) * DILATION)
            if DILATION > 1:
                vis = vis & ((d % DILATION) == 0)
        elif CAUSAL:
            vis = vis & (d >= 0)
        if SINKS > 0:  # sink keys come through their own blocks
            vis = vis & (offs_n[None, :] >= SINKS)
    return vis


@triton.jit
def _bounds(start_m, tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
            CAUSAL: tl.constexpr, DILATION: tl.constexpr):
    """[lo, hi): the key range any query of this block can see (block-aligned lo)."""
    lo = 0
    hi = tk
    if WINDOW > 0:
        if CAUSAL:
            lo = start_m - (WINDOW - 1) * DILATION
            hi = start_m + BLOCK_M
        else:
            lo = start_m - (WINDOW // 2) * DILATION
            hi = start_m + BLOCK_M + (WINDOW // 2) * DILATION
    elif CAUSAL:
        hi = start_m + BLOCK_M
    lo = tl.maximum(lo, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(hi, tk)
    return lo, hi


@triton.jit
def _scores(q, k_ptrs, kb_ptr, offs_m, offs_n, offs_d, tk, stride_kn, d_model, scale, lam,
            WINDOW: tl.constexpr, CAUSAL: tl.constexpr, DILATION: tl.constexpr, SINKS: tl.constexpr,
            SINK_PART: tl.constexpr, KEY_BIAS: tl.constexpr):
    kmask = (offs_n[:, None] < tk) & (offs_d[None, :] < d_model)
    k = tl.load(k_ptrs + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale
    if KEY_BIAS:
        s += tl.load(kb_ptr + offs_n, mask=offs_n < tk, other=0.0)[None, :]
    vis = _visible(offs_m, offs_n, tk, WINDOW, CAUSAL, DILATION, SINKS, SINK_PART)
    if KEY_BIAS:
        vis = vis & (s > MASKED)  # a key the padding mask hides (finfo.min bias) is not visible
    return s * lam, vis


@triton.jit
def _softmax_step(m_i, l_i, acc, s, vis, v):
    """One key block of the online softmax: running max, sum and weighted values updated
    with the visible scores `s` and their values `v` (a row with nothing visible stays 0)."""
    m_new = tl.maximum(m_i, tl.max(tl.where(vis, s, -float("inf")), 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    pexp = tl.where(vis, tl.exp(s - m_safe[:, None]), 0.0)
    return m_new, l_i * alpha + tl.sum(pexp, 1), acc * alpha[:, None] + tl.dot(pexp.to(v.dtype), v)


@triton.jit
def attention_fwd(Q, K, V, O, KB, SL, G, SB, Tq, Tk, D, H, G_KV, scale, log_n_train, power,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skbb,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  WINDOW: tl.constexpr, CAUSAL: tl.constexpr, DILATION: tl.constexpr, SINKS: tl.constexpr,
                  NORM: tl.constexpr, LENGTH_SCALE: tl.constexpr, SINK_LOGIT: tl.constexpr,
                  GATE: tl.constexpr, KEY_BIAS: tl.constexpr, SCORE_BIAS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G_KV
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    k_ptrs = K + b * skb + kvh * skh
    v_ptrs = V + b * svb + kvh * svh
    kb_ptr = KB + b * skbb
    lo, hi = _bounds(start_m, Tk, BLOCK_M, BLOCK_N, WINDOW, CAUSAL, DILATION)
    n_sink_blocks = tl.cdiv(SINKS, BLOCK_N)

    lam = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    shift = tl.zeros([BLOCK_M, 1], tl.float32)  # sigmoid: b
    if SCORE_BIAS:
        shift += tl.load(SB + h)
    if LENGTH_SCALE or (NORM == 2 and not SCORE_BIAS):  # n_i: count the keys each row sees first
        cnt = tl.zeros([BLOCK_M], tl.float32)
        for part in tl.static_range(2):
            for start_n in range(0 if part == 1 else lo, n_sink_blocks * BLOCK_N if part == 1 else hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                _, vis = _scores(q, k_ptrs, kb_ptr, offs_m, offs_n, offs_d, Tk, skn, D, scale, 1.0,
                                 WINDOW, CAUSAL, DILATION, SINKS, part == 1, KEY_BIAS)
                cnt += tl.sum(vis.to(tl.float32), 1)
        if LENGTH_SCALE:  # λ_i = log(n_i) / log(n_train)
            lam = (tl.log(tl.maximum(cnt, 1.0)) / log_n_train)[:, None]
        else:  # b_i = −log n_i
            shift = -tl.log(tl.maximum(cnt, 1.0))[:, None]

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if SINK_LOGIT:  # the null slot: exp(b_h) in the denominator from the start
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SL + h)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(2):  # 0: the window's key blocks; 1: the sink blocks
        for start_n in range(0 if part == 1 else lo, n_sink_blocks * BLOCK_N if part == 1 else hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, vis = _scores(q, k_ptrs, kb_ptr, offs_m, offs_n, offs_d, Tk, skn, D, scale, lam,
                             WINDOW, CAUSAL, DILATION, SINKS, part == 1, KEY_BIAS)
            v = tl.load(v_ptrs + offs_n[:, None] * svn + offs_d[None, :],
                        mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
            if NORM == 0:
                m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, vis, v)
            elif NORM == 2:  # sigmoid: no normalisation, every visible key's weight stands alone
                a = tl.where(vis, 1.0 / (1.0 + tl.exp(-tl.maximum(s + shift, -80.0))), 0.0)  # σ(-80) rounds to 0
                acc += tl.dot(a.to(v.dtype), v)
            else:  # softplus, no running max; the power applies to each term
                a = tl.where(s > 20.0, s, tl.log(1.0 + tl.exp(tl.minimum(s, 20.0))))
                if power != 1.0:
                    a = tl.exp(power * tl.log(tl.maximum(a, 1e-30)))
                a = tl.where(vis, a, 0.0)
                l_i += tl.sum(a, 1)
                acc += tl.dot(a.to(v.dtype), v)
    if NORM == 2:
        out = acc  # a row that sees no key has summed nothing: zeros
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = tl.where((l_i > 0)[:, None], out, 0.0)  # a row that sees no key: zeros
    if GATE:
        g = tl.load(G + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
        out = out * (1.0 / (1.0 + tl.exp(-g)))[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out,
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))


@triton.jit
def block_sparse_fwd(Q, K, V, O, KB, IDX, Tq, Tk, D, H, G_KV, C, scale,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skbb, sib, sih, siq,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, KEY_BIAS: tl.constexpr):
    """Block-sparse FlashAttention for a content pattern (patterns/form.py: Selection):
    query block pid_m of (b, h) visits only the C key blocks IDX[b, h // G_KV, pid_m, :]
    (one selection per KV group), online softmax over them; a key is visible inside the
    sequence, causally (queries are the last Tq of Tk positions) and where KB keeps it.
    A row that sees no key gives zeros."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G_KV
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    k_ptrs = K + b * skb + kvh * skh
    v_ptrs = V + b * svb + kvh * svh
    idx_ptr = IDX + b * sib + kvh * sih + pid_m * siq
    m_i = tl.full([BLOCK], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for c in range(0, C):
        offs_n = tl.load(idx_ptr + c) * BLOCK + tl.arange(0, BLOCK)
        kmask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_ptrs + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_ptrs + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        vis = (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
        if KEY_BIAS:
            s += tl.load(KB + b * skbb + offs_n, mask=offs_n < Tk, other=0.0)[None, :]
            vis = vis & (s > MASKED)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, vis, v)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out,
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
