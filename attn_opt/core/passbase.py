"""Passes are frozen dataclasses with a name and typed options, registered by name, so
`sparse:window=128,sinks=4` parses into `Sparse(window=128, sinks=4)`, and an unknown
name, option or bad value is a one-line error that lists what is accepted."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from attn_opt.core.errors import UserError


def option(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, accepts: str | None = None, infinite: tuple[str, ...] = ()):
    """A pass option: its default, a one-line help, for strings the accepted values, for
    numbers (and each number of a list) the inclusive range [low, high]; `accepts` words
    what a string option that the pass parses itself takes. A float is finite unless
    `infinite` names the infinity it may be ("-inf", "inf") and what that means is defined."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                                        "accepts": accepts, "infinite": infinite})


def accepted(f: dataclasses.Field) -> str:
    """What an option accepts, in words: choices, or a range."""
    m = f.metadata
    if m.get("infinite"):  # a float whose infinity means something: said beside the rest
        base = accepted_finite(f)
        return f"{'a finite number' if base == 'any' else base} or {' or '.join(m['infinite'])}"
    return accepted_finite(f)


def accepted_finite(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("accepts"):
        return m["accepts"]
    if m.get("choices"):
        return "|".join(map(str, m["choices"]))
    low, high = m.get("low"), m.get("high")
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return "any"


def type_name(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return type_name(inner) + " (optional)"
    if origin is tuple:
        return f"list of {type_name(args[0]) if args else 'str'} (a+b+c)"
    return getattr(typ, "__name__", str(typ))


def _check_range(cls, fname: str, value, f: dataclasses.Field) -> None:
    low, high = f.metadata.get("low"), f.metadata.get("high")
    for v in value if isinstance(value, tuple) else (value,):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and v != v:
            raise UserError(f"{cls.name}: {fname} cannot be nan")
        if isinstance(v, float) and math.isinf(v) and ("-inf" if v < 0 else "inf") not in f.metadata.get("infinite", ()):
            allowed = " or ".join(f.metadata.get("infinite", ()))
            raise UserError(f"{cls.name}: {fname} must be a finite number{f' or {allowed}' if allowed else ''} "
                            f"(got {v:g})")
        if (low is not None and v < low) or (high is not None and v > high):
            raise UserError(f"{cls.name}: {fname} must be {accepted(f)} (got {v:g})")


PRODUCES = ("fused", "form", "gate", "collapse", "latent")


@dataclass(frozen=True)
class Pass:
    """A pass is a declaration: typed options, which sites it skips and why, and the
    `Form` it makes of a site (patterns/form.py). Backends lower the form; no pass builds
    graph nodes. Class attributes say how passes may follow each other."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    why: ClassVar[str] = ""  # one line: what the pass does (`attn-opt passes`)
    produces: ClassVar[str] = "form"  # PRODUCES: one fused op, a pattern × normaliser form, a gate, collapsed weights
    computes_attention: ClassVar[bool] = True  # rewrites how a site computes (not only what reads its output)
    replaces_normaliser: ClassVar[bool] = False  # at most one such pass per site
    sets_pattern: ClassVar[bool] = False  # chooses the kept pairs: at most one such pass per site
    once: ClassVar[bool] = False  # give it once, with all its options

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.produces not in PRODUCES:
            raise TypeError(f"pass {cls.name or cls.__name__}: produces={cls.produces!r}, not one of {PRODUCES}")

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def is_exact(self) -> bool:
        """Exact for these options (a pass may be exact only in some settings)."""
        return self.exact

    def exact_on(self, site) -> bool:
        """Exact on this site (an exact pass may not be on a site it changes in kind, such as
        a sink-free form on a site that has its own sink logits)."""
        return self.is_exact()

    def skip_reason(self, site) -> str | None:
        """Why this pass cannot rewrite `site`, or None."""
        return None

    def form(self, site, diag=None):
        """The `Form` this pass makes of `site` (`diag`: its attention diagnostics, a
        patterns.diagnostics.SiteDiagnostics, for passes that choose from them)."""
        raise NotImplementedError

    def needs_diagnostics(self) -> bool:
        return False

    def diag_skip_reason(self, site, diag: dict | None = None) -> str | None:
        """Why this pass leaves `site` as it is once its diagnostics are known, or None."""
        return None

    def touches_sites(self) -> bool:
        return True

    def graph_edits(self) -> tuple[str, ...]:
        """Whole-graph edits besides the sites' forms, by name (a backend applies them)."""
        return ()

    def check_options(self) -> None:
        """Every option inside its declared range (a pass built in Python, not parsed, too)."""
        for f in dataclasses.fields(self):
            _check_range(type(self), f.name, getattr(self, f.name), f)


def _convert(cls, fname: str, raw: str, typ, choices):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if raw.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if origin is tuple:
            parts = tuple(p for p in raw.split("+") if p)
            conv = args[0] if args else str
            vals = tuple(conv(p) for p in parts)
            if choices and any(v not in choices for v in vals):
                raise ValueError
            return vals
        if typ is str:
            if choices and raw not in choices:
                raise ValueError
            return raw
    except ValueError:
        pass
    else:
        raise UserError(f"{cls.name}: option {fname} has an unsupported type")
    want = f"one of {'|'.join(map(str, choices))}" if choices else getattr(typ, "__name__", str(typ))
    raise UserError(f"{cls.name}: bad value {raw!r} for {fname} (expected {want})")


def parse_spec(spec: str, registry: dict[str, type[Pass]]) -> Pass:
    """`NAME[:key=value,...]` to a pass instance."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in registry:
        raise UserError(f"unknown pass {name!r}; passes: {', '.join(sorted(registry))}")
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key not in fields:
            accepted = ", ".join(fields) or "none"
            raise UserError(f"{name}: unknown option {key!r}; options: {accepted}")
        if not eq:
            raise UserError(f"{name}: option {key} needs a value ({key}=...)")
        if key in kwargs:  # `window=4,window=8`: which one was meant is not ours to guess
            raise UserError(f"{name}: option {key} is given twice")
        kwargs[key] = _convert(cls, key, raw.strip(), hints[key], fields[key].metadata.get("choices"))
        _check_range(cls, key, kwargs[key], fields[key])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{name}: {e}") from None


@dataclass(frozen=True)
class Layers:
    """A layer selection as closed intervals, never expanded into numbers, so
    `0-99999999999999999999` costs two integers and is checked against the model's
    layers as intervals."""

    spans: tuple[tuple[int, int], ...]

    def __contains__(self, layer) -> bool:
        return isinstance(layer, int) and any(a <= layer <= b for a, b in self.spans)

    def missing(self, known) -> list[tuple[int, int]]:
        """The parts of the selection no known layer covers, as intervals."""
        have = sorted(set(known))
        out = []
        for a, b in sorted(self.spans):
            lo = a
            for k in have:
                if k < lo or k > b:
                    continue
                if k > lo:
                    out.append((lo, k - 1))
                lo = k + 1
            if lo <= b:
                out.append((lo, b))
        return out

    @classmethod
    def of(cls, layers) -> "Layers":
        """From a Layers, a `range` (step 1: its ends only) or layer numbers."""
        if isinstance(layers, Layers):
            return layers
        if isinstance(layers, str):
            return parse_ranges(layers)
        if isinstance(layers, range) and layers.step == 1:
            return cls(((layers.start, layers.stop - 1),) if len(layers) else ())
        nums = set(layers)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in nums):
            raise UserError(f"layers must be whole numbers >= 0 (got {sorted(nums, key=str)[:5]})")
        return cls(tuple((x, x) for x in sorted(nums)))


def spans_text(spans) -> str:
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def parse_ranges(text: str | None) -> Layers | None:
    """`0-3,7` to the intervals (0, 3), (7, 7)."""
    if text is None:
        return None
    spans = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            a, b = (int(lo), int(hi)) if sep else (int(lo), int(lo))
            if a < 0 or b < a:
                raise ValueError
            spans.append((a, b))
    except ValueError:
        raise UserError(f"bad --layers {text!r}: expected layer numbers >= 0 and ranges lo-hi, e.g. 0-3,7") from None
    return Layers(tuple(spans))


def parse_sites(text: str | None) -> set[str] | None:
    """`a0,a3` to {"a0", "a3"}."""
    if text is None:
        return None
    ids = {p.strip() for p in text.split(",") if p.strip()}
    if not ids:
        raise UserError(f"bad --sites {text!r}: expected site ids, e.g. a0,a3 (attn-opt inspect lists them)")
    return ids
