"""The record a rewritten site carries (ONNX node metadata, FX node meta): its form and
the names of the values it reads, so detection can read the site back and the next pass
can rewrite it again. IR-neutral: names and permutations only. Both halves live here:
`FormRecord.of(site, ...)` → `to_json()` when a lowering writes it, `FormRecord.from_json`
when detection (patterns/fused.py: match_attn_opt) reads it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from attn_opt.patterns.form import Normaliser, Pattern
from attn_opt.patterns.site import AttentionSite


def _name(v) -> str:
    """The value's name in the graph now (a lowering may have renamed it since detection)."""
    return getattr(v.native, "name", None) or v.name


@dataclass(frozen=True)
class OperandRecord:
    name: str
    perm: tuple[int, ...] | None = None
    repeated: bool = False
    fold: int | None = None


@dataclass(frozen=True)
class FormRecord:
    site: str
    scope: str | None
    q: OperandRecord
    k: OperandRecord
    v: OperandRecord
    additive: tuple[str, ...]
    bool: str | None
    bool_keep: bool
    scale: float | None
    causal: bool
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    pattern: Pattern | None
    normaliser: Normaliser
    softcap: float | None = None
    fill: float | None = None
    folded_terms: tuple[str, ...] = ()
    filled_terms: tuple[str, ...] = ()
    negated_terms: tuple[str, ...] = ()
    zero_rows: bool = False
    regrouped_terms: tuple[str, ...] = ()
    regroup: int | None = None

    @classmethod
    def of(cls, site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser) -> "FormRecord":
        def op(o):
            return OperandRecord(_name(o.value), tuple(o.perm) if o.perm else None, o.repeated, o.fold)

        return cls(site.id, site.scope, op(site.q), op(site.k), op(site.v), tuple(_name(a) for a in site.additive),
                   _name(site.bool_mask) if site.bool_mask is not None else None, site.bool_keep, site.scale,
                   bool(site.causal), site.heads, site.kv_heads, site.head_dim, pattern, normaliser, site.softcap,
                   site.mask_value, tuple(site.folded_terms), tuple(site.filled_terms), tuple(site.negated_terms),
                   site.zero_hidden_rows, tuple(site.regrouped_terms), site.regroup)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("q", "k", "v"):
            o = d[key]
            d[key] = {"name": o.name, "perm": list(o.perm) if o.perm else None, "repeated": o.repeated, "fold": o.fold}
        d["pattern"] = self.pattern.to_json() if self.pattern else None
        d["normaliser"] = self.normaliser.to_json()
        for key in ("additive", "folded_terms", "filled_terms", "negated_terms", "regrouped_terms"):
            d[key] = list(d[key])
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "FormRecord":
        d = json.loads(text)

        def op(o):
            return OperandRecord(o["name"], tuple(o["perm"]) if o.get("perm") else None, bool(o.get("repeated")),
                                 o.get("fold"))

        return cls(d["site"], d.get("scope"), op(d["q"]), op(d["k"]), op(d["v"]), tuple(d.get("additive", ())),
                   d.get("bool"), bool(d.get("bool_keep", True)), d.get("scale"), bool(d.get("causal")),
                   d.get("heads"), d.get("kv_heads"), d.get("head_dim"), Pattern.from_json(d.get("pattern")),
                   Normaliser.from_json(d.get("normaliser")), d.get("softcap"), d.get("fill"),
                   tuple(d.get("folded_terms", ())), tuple(d.get("filled_terms", ())),
                   tuple(d.get("negated_terms", ())), bool(d.get("zero_rows")),
                   tuple(d.get("regrouped_terms", ())), d.get("regroup"))


def form_record(site: AttentionSite, pattern: Pattern | None, normaliser: Normaliser) -> str:
    """The record of `site` rewritten into `pattern` × `normaliser`, as node metadata text."""
    return FormRecord.of(site, pattern, normaliser).to_json()
