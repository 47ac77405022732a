"""plan: a form per site, as `--budget` chose it or a user wrote it.

    plan:file=PLAN.json        {"sites": {"a0": {"spec": "sparse:window=16,sinks=1"}, "a1": {"spec": "dense"}, ...}}

Each site's spec is a form pass (`sparse:...`, `softplus`, `sinkfree:...`, `sigmoid`,
`stream:...`) or `dense` (left as it is); the plan pass gives each site the form its own
pass would give it, so a plan re-applied to the same model writes the same bytes. A site
the plan does not name is left as it is; a spec that does not parse, or a pass that does
not produce a form (fuse, gated, mlpfree), is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from attn_opt.core.errors import UserError
from attn_opt.core.passbase import Pass, option

DENSE = "dense"


def parse_site_spec(site_id: str, spec, where: str | None = None) -> Pass | None:
    """One site's spec to its pass (None for dense); a one-line error otherwise (said as
    `where`, default "plan: site ID")."""
    from attn_opt import passes as registry

    where = where or f"plan: site {site_id}"
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{where}: the spec must be a form pass spec or 'dense' (got {spec!r})")
    if spec.strip() == DENSE:
        return None
    try:
        p = registry.parse(spec)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if p.produces != "form" or not p.touches_sites():
        raise UserError(f"{where}: {p.name} produces a {p.produces}, not a form; a plan holds "
                        "form passes (sparse, softplus, sinkfree, sigmoid, stream) or 'dense'")
    p.check_options()
    return p


def read_plan(path: str) -> dict[str, str]:
    """site id -> spec from a plan file (as --budget writes it, or edited by hand)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no such file: {path} (--plan)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--plan {path}: not a readable JSON plan ({str(e).splitlines()[0]})") from None
    sites = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise UserError(f"--plan {path}: expected {{\"sites\": {{SITE: {{\"spec\": FORM}}, ...}}}}")
    out = {}
    for sid, entry in sites.items():
        spec = entry.get("spec") if isinstance(entry, dict) else entry
        parse_site_spec(sid, spec)
        out[str(sid)] = spec.strip()
    return out


@dataclass(frozen=True)
class PlanPass(Pass):
    name: ClassVar[str] = "plan"
    why: ClassVar[str] = "a form per site from a plan file (what --budget writes)"
    once: ClassVar[bool] = True
    replaces_normaliser: ClassVar[bool] = True  # the plan decides each site's whole form
    sets_pattern: ClassVar[bool] = True
    file: str | None = option(None, "the plan (JSON: per site the form spec)", accepts="a path")
    specs: tuple[tuple[str, str], ...] = option((), "site id and spec pairs (the Python API)", accepts="pairs")

    def __post_init__(self):
        if self.file is None and not self.specs:
            raise UserError("plan: give file=PLAN.json")
        if self.file is not None:
            object.__setattr__(self, "specs", tuple(sorted(read_plan(self.file).items())))
        object.__setattr__(self, "_passes", {sid: parse_site_spec(sid, spec) for sid, spec in self.specs})

    @classmethod
    def of(cls, plan: dict[str, str]) -> "PlanPass":
        return cls(specs=tuple(sorted((str(k), str(v)) for k, v in plan.items())))

    def site_ids(self) -> set[str]:
        return set(self._passes)

    def pass_for(self, site_id: str) -> Pass | None:
        return self._passes.get(site_id)

    def skip_reason(self, site) -> str | None:
        if site.id not in self._passes:
            return "not in the plan (left as it is)"
        p = self._passes[site.id]
        return "dense in the plan" if p is None else p.skip_reason(site)

    def needs_diagnostics(self) -> bool:
        return any(p is not None and p.needs_diagnostics() for p in self._passes.values())

    def is_exact(self) -> bool:
        return all(p is None or p.is_exact() for p in self._passes.values())

    def form(self, site, diag=None):
        return self._passes[site.id].form(site, diag)

    def check_options(self) -> None:
        for p in self._passes.values():
            if p is not None:
                p.check_options()
