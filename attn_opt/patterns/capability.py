"""What a backend can lower, declared as data.

Every backend (the NumPy reference, ONNX, torch, the Triton kernel) declares one
`Capabilities`: per table — normaliser kinds, pattern kinds, selection kinds (content-based
patterns), the form's other parts (`FEATURES`) — the implementation of each kind it lowers,
and, for a backend that covers a subset, why it declines the rest. Lowerings look their implementation up here
(`implementation`), so a kind with no entry stops with "<kind>: no <backend> lowering"
rather than being computed as another kind; `supports(site, form)` says, before anything
is emitted, why a backend cannot take a form (a missing kind, or one of the backend's own
limits), and the pipeline reports that as the site's skip reason. tests/test_capabilities.py
checks every kind of every table against every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from attn_opt.core.errors import NotSupported
from attn_opt.patterns.form import NORMALISERS, PATTERN_KINDS, SELECTION_KINDS, Form

FEATURES = ("fused", "gate", "collapse", "stream", "lora", "latent")  # the parts of a Form besides pattern × normaliser
TABLES = {"normaliser": NORMALISERS, "pattern": PATTERN_KINDS, "selection": SELECTION_KINDS, "feature": FEATURES}


def form_kinds(form: Form) -> list[tuple[str, str]]:
    """(table, kind) of every part `form` has."""
    kinds = [("feature", f) for f in FEATURES if _has(form, f)]
    if form.fused or form.gate is not None or form.collapse is not None or form.latent is not None:
        return kinds  # the site's own pattern and normaliser are the fused op's business (its limits)
    if form.pattern is not None:
        kinds.append((form.pattern.table, form.pattern.kind))
    return kinds + [("normaliser", form.normaliser.kind)]


def _has(form: Form, feature: str) -> bool:
    value = getattr(form, feature)
    return bool(value) if feature in ("fused", "lora") else value is not None


@dataclass(frozen=True)
class Capabilities:
    backend: str
    normaliser: Mapping[str, Any]  # kind -> implementation
    pattern: Mapping[str, Any] = field(default_factory=dict)
    feature: Mapping[str, Any] = field(default_factory=dict)
    selection: Mapping[str, Any] = field(default_factory=dict)  # content-based patterns (Pattern.selection)
    declined: Mapping[str, str] = field(default_factory=dict)  # kind -> why this backend does not lower it
    limits: Callable[[Any, Form], str | None] | None = None  # the backend's own limits: a reason, or None

    def implementation(self, table: str, kind: str):
        """The backend's implementation of `kind` in `table`; NotSupported if it has none."""
        impl = getattr(self, table).get(kind)
        if impl is None:
            raise NotSupported(self.missing(kind))
        return impl

    def missing(self, kind: str) -> str:
        why = self.declined.get(kind)
        return f"{kind}: no {self.backend} lowering" + (f" ({why})" if why else "")

    def supports(self, site, form: Form) -> str | None:
        """Why this backend cannot lower `form` for `site`, or None."""
        for table, kind in form_kinds(form):
            if kind not in getattr(self, table):
                return self.missing(kind)
        return self.limits(site, form) if self.limits is not None else None

    def unaccounted(self) -> dict[str, list[str]]:
        """Per table, the kinds this backend neither lowers nor declines (must be empty)."""
        out = {}
        for table, kinds in TABLES.items():
            have = getattr(self, table)
            gap = [k for k in kinds if k not in have and k not in self.declined]
            if gap:
                out[table] = gap
        return out
