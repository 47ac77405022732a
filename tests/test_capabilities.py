"""Every kind of every form table against every backend: each backend lowers the kind
or declines it with a reason, so a kind added to patterns/form.py without its lowerings
fails here, naming the backends that lack it; and a declined kind is refused in words,
never computed as another kind."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attn_opt.core.errors import NotSupported
from attn_opt.patterns.capability import FEATURES, TABLES, Capabilities
from attn_opt.patterns.form import NORMALISERS, PATTERN_KINDS, SELECTION_KINDS, Form, Normaliser, Pattern, Selection


def backends() -> dict[str, Capabilities]:
    from attn_opt.backends.onnx.lower import CAPABILITIES as onnx
    from attn_opt.backends.torch.fx import CAPABILITIES as torch_fx
    from attn_opt.patterns.reference import CAPABILITIES as reference

    out = {"reference": reference, "onnx": onnx, "torch": torch_fx}
    try:
        from attn_opt.backends.triton.launcher import CAPABILITIES as triton

        out["triton"] = triton
    except ImportError:  # triton not installed: its table cannot be read
        pass
    return out


def test_every_kind_has_a_lowering_or_a_reason_in_every_backend():
    missing = {}
    for name, caps in backends().items():
        for table, kinds in caps.unaccounted().items():
            for kind in kinds:
                missing.setdefault(f"{table} {kind!r}", []).append(name)
    assert not missing, "; ".join(f"no lowering for {k} in: {', '.join(v)}" for k, v in missing.items())


def test_full_backends_lower_every_normaliser_and_pattern():
    """ONNX, torch and the reference compute every form; only the kernel is a subset."""
    for name in ("reference", "onnx", "torch"):
        caps = backends()[name]
        assert set(caps.normaliser) == set(NORMALISERS), name
        assert set(caps.pattern) == set(PATTERN_KINDS), name
        assert set(caps.selection) == set(SELECTION_KINDS), name
    for name in ("onnx", "torch"):
        assert set(backends()[name].feature) >= set(FEATURES) - {"stream"}, name


def test_the_tables_know_the_form_module():
    assert TABLES["normaliser"] == NORMALISERS and TABLES["pattern"] == PATTERN_KINDS
    assert TABLES["selection"] == SELECTION_KINDS


def test_a_missing_kind_is_refused_by_name():
    caps = Capabilities("demo", normaliser={"softmax": object()}, declined={"sigmoid": "no sigmoid branch"})
    with pytest.raises(NotSupported, match=r"^relu: no demo lowering$"):
        caps.implementation("normaliser", "relu")
    with pytest.raises(NotSupported, match=r"sigmoid: no demo lowering \(no sigmoid branch\)"):
        caps.implementation("normaliser", "sigmoid")
    assert caps.supports(None, Form(normaliser=Normaliser("relu"))) == "relu: no demo lowering"
    assert caps.supports(None, Form()) is None
    assert caps.unaccounted() == {"normaliser": [k for k in NORMALISERS if k not in ("softmax", "sigmoid")],
                                  "pattern": list(PATTERN_KINDS), "selection": list(SELECTION_KINDS),
                                  "feature": list(FEATURES)}


def test_an_unknown_kind_never_computes_as_another():
    """A kind the tables do not hold stops every lowering with its name (no implicit
    last branch of an if-chain)."""
    from attn_opt.patterns import reference

    n = Normaliser("sigmoid")
    object.__setattr__(n, "kind", "dummy")  # as if NORMALISERS had grown a kind nobody lowered
    s, vis = np.zeros((1, 1, 2, 2)), np.ones((1, 1, 2, 2), bool)
    with pytest.raises(NotSupported, match="dummy: no reference lowering"):
        reference.normalise(n, s, vis)
    torch = pytest.importorskip("torch")
    from attn_opt.backends.torch import forms

    with pytest.raises(NotSupported, match="dummy: no torch lowering"):
        forms.normalise(n, torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool), lambda v: v, 1)


def test_triton_declines_in_words():
    caps = backends().get("triton")
    if caps is None:
        pytest.skip("triton is not installed")
    why = caps.supports(None, Form(normaliser=Normaliser("redistribute", alpha=0.5)))
    assert why.startswith("redistribute: no triton lowering (")
    shifted = Pattern("shift", False, 4, 4)
    assert caps.supports(None, Form(pattern=shifted)).startswith("shift: no triton lowering")
    calibrated = dataclasses.replace(Normaliser(), temperature=(1.0,), offset=(0.0,), gain=(1.0,))
    assert "calibrated" in caps.supports(None, Form(normaliser=calibrated))


@pytest.mark.parametrize("kind", SELECTION_KINDS)
def test_every_selection_kind_in_every_backend(kind):
    """A content pattern is looked up in the selection table: lowered, or refused with the
    backend's reason (never computed as a fixed pattern)."""
    pattern = Pattern(kind, False, 0, 4, selection=Selection(kind, 1))
    for name, caps in backends().items():
        why = caps.supports(None, Form(pattern=pattern))
        if kind in caps.selection:
            assert why is None, name
        else:
            assert why.startswith(f"{kind}: no {name} lowering (") and caps.declined[kind], name
            with pytest.raises(NotSupported, match=f"{kind}: no {name} lowering"):
                caps.implementation("selection", kind)
