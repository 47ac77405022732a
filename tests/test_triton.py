"""Every switch of the Triton attention kernel against the PyTorch reference, run on the
CPU by Triton's interpreter (TRITON_INTERPRET=1): odd lengths, padding tails, GQA."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from attn_opt.backends.triton.launcher import attention, reference, use_kernel  # noqa: E402
from attn_opt.patterns.form import Normaliser, Pattern, Selection  # noqa: E402

CASES = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window": dict(window=8),
    "causal-window": dict(causal=True, window=6),
    "dilated-window": dict(window=5, dilation=2),
    "causal-dilated": dict(causal=True, window=4, dilation=3),
    "sinks+window": dict(window=6, sinks=3),
    "sinks+causal-window": dict(causal=True, window=5, sinks=2),
    "padding": dict(pad=True),
    "padding+window": dict(window=6, pad=True),
    "softplus": dict(normaliser="softplus"),
    "softplus+length+power": dict(normaliser="softplus", n_train=16, power=2.0, window=8, pad=True),
    "sink-logit": dict(sink_logit=True),
    "sink-logit+causal": dict(sink_logit=True, causal=True),
    "gate": dict(gate=True, window=6),
    "sigmoid": dict(normaliser="sigmoid"),
    "sigmoid+causal-window+padding": dict(normaliser="sigmoid", causal=True, window=6, pad=True),
    "sigmoid+bias": dict(normaliser="sigmoid", score_bias=True, window=8),
}


def _form(opts: dict, h: int) -> dict:
    """A CASES row as the launcher's arguments: the form as Pattern × Normaliser objects."""
    window, dilation, sinks = opts.pop("window", 0), opts.pop("dilation", 1), opts.pop("sinks", 0)
    if window:
        opts["pattern"] = Pattern("window", opts.get("causal", False), window, 16, sinks=sinks, dilation=dilation)
    kind = opts.pop("normaliser", "softmax")
    n_train, power = opts.pop("n_train", None), opts.pop("power", 1.0)
    score_bias = opts.pop("score_bias", None)
    if kind == "softplus":
        opts["normaliser"] = Normaliser("softplus", n_train=n_train, p=power)
    elif kind == "sigmoid":
        opts["normaliser"] = Normaliser("sigmoid", bias=None if score_bias is None else tuple(score_bias.tolist()))
    elif opts.get("sink_logit") is not None:
        opts["normaliser"] = Normaliser("logit", bias=tuple(opts["sink_logit"].tolist()))
    return opts


@pytest.mark.parametrize("kvh", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, kvh):
    assert os.environ.get("TRITON_INTERPRET") == "1" and use_kernel(torch.zeros(1))
    opts = dict(CASES[name])
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 4, 37, 8  # odd length, head size below the 16-wide tile
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kvh, t, d, generator=g)
    v = torch.randn(b, kvh, t, d, generator=g)
    if opts.pop("pad", False):
        bias = torch.zeros(b, t)
        bias[-1, -9:] = torch.finfo(torch.float32).min  # a padded tail
        opts["key_bias"] = bias
    if opts.pop("sink_logit", False):
        opts["sink_logit"] = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    if opts.pop("score_bias", False):
        opts["score_bias"] = torch.tensor([-3.0, -2.0, -1.0, 0.5])
    if opts.pop("gate", False):
        opts["gate"] = torch.randn(b, h, t, generator=g)
    opts = _form(opts, h)
    got = attention(q, k, v, **opts)
    want = reference(q, k, v, **opts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_padded_window_rows_are_zero():
    """A padded query whose window holds only padding keys gives zeros, not NaN."""
    q = k = v = torch.randn(1, 1, 40, 8)
    bias = torch.zeros(1, 40)
    bias[0, 28:] = torch.finfo(torch.float32).min
    out = attention(q, k, v, pattern=Pattern("window", False, 8, 16), key_bias=bias)
    assert torch.isfinite(out).all() and (out[0, 0, 33:] == 0).all()


@pytest.mark.parametrize("pattern,normaliser,mask", [
    (None, None, "padding"),
    (Pattern("window", False, 6, 8, sinks=2), None, "padding"),
    (Pattern("window", True, 5, 8, dilation=2), Normaliser("softplus", n_train=16, p=2.0), None),
    (Pattern("window", False, 8, 8), Normaliser("logit", bias=(-1.0, 0.0, 0.5, 2.0)), "bool"),
    (Pattern("window", True, 6, 8), Normaliser("sigmoid"), "padding"),
    (Pattern("topk", True, 0, 16, selection=Selection("topk", 1)), None, "padding"),
], ids=["dense", "window+sinks", "softplus", "sink-logit", "sigmoid", "topk"])
def test_fx_lowering_uses_the_kernel(pattern, normaliser, mask):
    """backends.torch.forms.attention hands the forms the kernel covers to it (as it does for CUDA
    tensors); the result equals its PyTorch path."""
    from attn_opt.backends.torch.forms import attention as form_attention, kernel_reason
    from attn_opt.patterns.form import Form

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 29, 8, generator=g) for _ in range(3))
    additive, boolean = [], None
    if mask == "padding":
        m = torch.zeros(2, 1, 1, 29)
        m[-1, ..., -7:] = torch.finfo(torch.float32).min
        additive = [m]
    elif mask == "bool":
        boolean = torch.ones(2, 1, 1, 29, dtype=torch.bool)
        boolean[-1, ..., -7:] = False
    causal = bool(pattern and pattern.causal)
    norm = normaliser or Normaliser()
    kw = dict(scale=8 ** -0.5, causal=causal, pattern=pattern, normaliser=norm)
    assert kernel_reason(q, k, v, additive, boolean, True, causal, Form(pattern=pattern, normaliser=norm)) is None
    got = form_attention(q, k, v, additive, boolean, use_triton=True, **kw)
    want = form_attention(q, k, v, additive, boolean, use_triton=False, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


CONTENT = {  # sparse:topk through the block-sparse kernel: (pattern options, case options)
    "bidirectional": (dict(topk=1), dict()),
    "causal": (dict(topk=1, causal=True), dict()),
    "padded-rows": (dict(topk=1, sinks=1), dict(pad=True)),
    "causal+band+padding": (dict(topk=1, causal=True, window=16), dict(pad=True)),
    "bidirectional+band+sinks": (dict(topk=1, window=16, sinks=2), dict(t=120)),
}


@pytest.mark.parametrize("kvh", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", list(CONTENT))
def test_block_sparse_kernel_matches_the_numpy_reference(name, kvh):
    """The kernel visits only the chosen key blocks; its output equals the NumPy
    reference's selection (patterns/reference.py: selected_visible) and softmax within 1e-5."""
    import numpy as np

    from attn_opt.patterns import reference as R
    from attn_opt.patterns.form import Selection

    popts, copts = CONTENT[name]
    p = Pattern("topk", popts.get("causal", False), popts.get("window", 0), 16, sinks=popts.get("sinks", 0),
                selection=Selection("topk", popts["topk"]))
    g = torch.Generator().manual_seed(2)
    b, h, t, d = 2, 4, copts.get("t", 61), 8
    q, k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, kvh, t, d, generator=g), torch.randn(b, kvh, t, d, generator=g)
    bias = None
    if copts.get("pad"):
        bias = torch.zeros(b, t)
        bias[-1, -25:] = torch.finfo(torch.float32).min  # the last row: its last block and more hidden
    got = attention(q, k, v, pattern=p, scale=d ** -0.5, causal=p.causal, key_bias=bias).numpy()
    seen = None if bias is None else (bias.numpy() > -1e30)[:, None, None, :]
    vis = R.selected_visible(p, q.numpy(), k.numpy(), d ** -0.5, seen)
    assert not vis.all()  # blocks were dropped
    q64, k64, v64 = (np.repeat(x.numpy().astype(np.float64), h // x.shape[1], 1) for x in (q, k, v))
    s = q64 @ k64.transpose(0, 1, 3, 2) * d ** -0.5
    if bias is not None:
        s = s + bias.numpy()[:, None, None, :]
        vis = vis & seen
    if p.causal:
        vis = vis & np.tril(np.ones((t, t), bool))
    want = R.softmax(s, vis) @ v64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,normaliser,why", [
    (8, Normaliser(), "not a power of two >= 16"),
    (16, Normaliser("softplus"), "softmax only"),
])
def test_block_sparse_kernel_refuses_in_words(block, normaliser, why):
    from attn_opt.core.errors import NotSupported
    from attn_opt.patterns.form import Selection

    p = Pattern("topk", False, 0, block, selection=Selection("topk", 1))
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(NotSupported, match=why):
        attention(q, q, q, pattern=p, normaliser=normaliser)
