"""`--budget`: choose each site's form (and its dense heads) to meet a cost at the best fidelity.

    parse        --budget attention=0.5 | flops=0.8 | cache=0.25; --candidates "sparse:window=8|16,sinks=auto;softplus"
    choices      per site: dense + each candidate made concrete on the search inputs (sinks=auto
                 resolved to a number), + for a sparse form the variants that keep its 1, 2, 4
                 heads that lose most attention dense (where the form allows dense heads)
    cost         per (site, choice): attention FLOPs of the lowered form, from the FLOP counter
                 (one rewrite of a copy per choice template: every site at once, read by site tag)
    sensitivity  per (site, choice): the model's fidelity loss with that site alone changed,
                 measured without rerunning the model: ONE observation run records the site's
                 Q/K and masks and every value the rest of the model reads, the form's
                 probabilities come from the NumPy reference (patterns/reference.py), and only the
                 nodes downstream of the site's probabilities run again (one ORT session per site)
    solve        a multiple-choice knapsack as a Pareto DP over sites (cost summed, loss summed)
    refine       the best predicted assignments under the budget and the best uniform ones lowered
                 and measured on the whole model; a per-site plan replaces the best uniform form only
                 where it is better on the search rows and on each fold of them, then leftover budget
                 is spent greedily where a whole-model measurement confirms the gain the same way
                 (`budget_solve._refine`)

The search runs on the calibration inputs when given, else on the first half of the fidelity
inputs; the plan's held-out figure is measured on the other inputs. ONNX only for now.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from attn_opt.core.errors import UserError
from attn_opt.patterns import reference
from attn_opt.core.passbase import Pass
from attn_opt.passes.plan import DENSE, parse_site_spec
from attn_opt.pipeline.budget_solve import Point, _bar, _refine, pareto  # noqa: F401 (Point: the API)

KINDS = {"attention": "attention FLOPs / the original's", "flops": "matrix-product FLOPs / the original's",
         "cache": "KV-cache bytes after the search tokens / the original's"}
DEFAULT_CANDIDATES = "sparse:window=8|16|32,sinks=auto"
OBJECTIVES = ("auto", "spearman", "kl", "top1", "cosine")
HEAD_VARIANTS = (1, 2, 4)  # dense heads a sparse choice may keep


@dataclass(frozen=True)
class Budget:
    kind: str
    fraction: float

    def text(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_budget(text: str) -> Budget:
    """`attention=0.5` to Budget("attention", 0.5); a one-line error otherwise."""
    kind, eq, raw = str(text).partition("=")
    kind = kind.strip()
    if kind not in KINDS or not eq:
        raise UserError(f"bad --budget {text!r}: expected KIND=FRACTION, KIND one of {', '.join(KINDS)} "
                        "(e.g. attention=0.5)")
    try:
        frac = float(raw)
    except ValueError:
        frac = float("nan")
    if not 0 < frac <= 1:
        raise UserError(f"bad --budget {text!r}: the fraction must be a number in (0, 1]")
    return Budget(kind, frac)


def expand_candidates(text: str | None) -> list[str]:
    """`sparse:window=8|16,sinks=auto;softplus` to ["sparse:window=8,sinks=auto",
    "sparse:window=16,sinks=auto", "softplus"]: `;` separates candidates, `|` alternatives of
    one option's value. Each is parsed (a bad one is a one-line error) and must be a form."""
    out = []
    for cand in filter(None, (c.strip() for c in (text or DEFAULT_CANDIDATES).split(";"))):
        name, _, rest = cand.partition(":")
        items = [i.strip() for i in rest.split(",") if i.strip()]
        alts = []
        for item in items:
            key, eq, raw = item.partition("=")
            alts.append([f"{key}{eq}{v.strip()}" for v in raw.split("|")] if eq else [item])
        for combo in itertools.product(*alts):
            spec = name.strip() + (":" + ",".join(combo) if combo else "")
            if spec == DENSE:
                continue  # dense is always a choice
            parse_site_spec("", spec, f"--candidates {spec!r}")
            if spec not in out:
                out.append(spec)
    if not out:
        raise UserError(f"--candidates {text!r} names no form")
    return out


def spec_of(p: Pass) -> str:
    """A pass's spec with its non-default options (what parses back to the same pass)."""
    parts = []
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if v == f.default or v is None:
            continue
        if isinstance(v, tuple):
            v = "+".join(map(str, v))
        elif isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{f.name}={v}")
    return p.name + (":" + ",".join(parts) if parts else "")


@dataclass
class Choice:
    template: str  # the same for every site: "<candidate>" or "<candidate> +k dense heads"
    spec: str  # concrete: parses to this site's form without diagnostics
    form: object = None
    cost: float = 0.0  # attention (or model) FLOPs of the site in this form
    loss: float = 0.0  # measured fidelity loss with this site alone in this form
    note: str = ""


def _dropped_per_head(concrete, site, probs) -> list[float]:
    """Per head, the attention mass the concrete pattern drops (from the site's probabilities)."""
    kept = concrete.pattern(site).visible(probs.shape[-1])[-probs.shape[2]:]
    rows = probs.sum(-1) > 0.5
    return [float((probs[:, h] * ~kept).sum(-1)[rows[:, h]].mean()) if rows[:, h].any() else 0.0
            for h in range(probs.shape[1])]


def site_choices(sites, candidates: list[str], diag: dict, per_head: bool = True) -> dict[str, list[Choice]]:
    """Per site: dense, then each candidate that applies, made concrete from the site's
    diagnostics, then (per_head) its variants with the heads that lose most kept dense."""
    out = {}
    for site in sites:
        choices = [Choice(DENSE, DENSE)]
        for spec in candidates:
            p = parse_site_spec(site.id, spec)
            if p.skip_reason(site):
                continue
            concrete = p.resolve(site, diag.get(site.id))[0] if p.needs_diagnostics() and hasattr(p, "resolve") else p
            choices.append(Choice(spec, spec_of(concrete)))
            d = diag.get(site.id)
            if not (per_head and hasattr(concrete, "dense_heads") and concrete.dense_heads is None and d
                    and getattr(concrete, "heads", "all") == "all" and getattr(concrete, "grid", None) is None):
                continue
            if site.kv_heads != site.heads or concrete.skip_reason(site):
                continue
            try:  # a form that cannot keep heads dense (a content selection) says so when built
                if dataclasses.replace(concrete, dense_heads=(0,)).skip_reason(site):
                    continue
            except UserError:
                continue
            order = np.argsort(_dropped_per_head(concrete, site, d.probs))[::-1]
            for k in HEAD_VARIANTS:
                if k < site.heads:
                    v = dataclasses.replace(concrete, dense_heads=tuple(sorted(int(h) for h in order[:k])))
                    choices.append(Choice(f"{spec} +{k} dense heads", spec_of(v)))
        for c in choices:
            if c.spec != DENSE:
                c.form = parse_site_spec(site.id, c.spec).form(site, None)
        out[site.id] = choices
    return out


@dataclass
class SearchResult:
    plan: dict[str, str]
    entries: dict[str, dict]
    points: list[dict] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": 1, **self.summary, "sites": self.entries, "chosen": self.chosen, "tried": self.points}


def search(steps, model, feeds: dict, heldout: dict | None, budget: Budget, candidates: list[str],
           objective: str = "auto", progress=None, per_head: bool = True) -> SearchResult:
    """Choose a form per site of the ONNX `model` meeting `budget` with the least measured
    fidelity loss on `feeds`; the chosen plan is measured on `heldout` too. A cache budget
    is searched in the step's generation loop (pipeline/budget_cache.py)."""
    if budget.kind == "cache":
        from attn_opt.pipeline.budget_cache import search_cache

        return search_cache(steps, model, feeds, heldout, budget, candidates, progress)
    return choose(measure(steps, model, feeds, heldout, budget.kind, candidates, objective, progress, per_head),
                  budget)


@dataclass
class Measured:
    """Every site's choices with their costs and losses: what any budget of one kind is
    solved from (the expensive part of a search, done once)."""

    steps: object
    state: object
    sites: list
    choices: dict
    feeds: dict
    heldout: dict | None
    objective: str
    logits: set
    base: float
    kind: str
    candidates: list
    notes: list
    phases: dict
    held_refs: dict | None = None


def measure(steps, model, feeds: dict, heldout: dict | None, kind: str, candidates: list[str],
            objective: str = "auto", progress=None, per_head: bool = True) -> Measured:
    """One observation run, then each site's choices, their costs and their sensitivities."""
    from attn_opt.patterns.diagnostics import SiteDiagnostics, head_stats
    from attn_opt.pipeline import budget_measure as bm

    if kind == "cache":
        raise UserError("a cache budget is measured in the generation loop: budget.search (pipeline/budget_cache.py)")
    if objective not in OBJECTIVES:
        raise UserError(f"bad --objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    t0 = time.perf_counter()
    state = steps.observe(model, feeds, run=True)
    state = steps.prepare(state, parse_site_spec("", candidates[0], "--candidates"), feeds)  # the forms' opset
    sites = [s for s in state.det.sites if not s.blocked]
    if not sites:
        raise UserError("--budget: the model has no attention site to choose a form for")
    logits = steps.logit_outputs(state)
    refs = state.outputs
    obj = bm.choose_objective(objective, refs, logits)
    cones = bm.Cones(state.model, sites)
    env = dict(state.model.run(feeds, cones.needed(sites)))
    notes, diag = [], {}
    for s in sites:
        if s.id not in cones.cone:
            continue
        why = bm.check_layout(s, env)
        if why:
            cones.why[s.id] = why
            continue
        p = reference.probabilities(s, env)
        diag[s.id] = SiteDiagnostics(head_stats(s, p), p)
    choices = site_choices([s for s in sites if s.id in diag], candidates, diag, per_head)
    for s in sites:
        if s.id not in choices:
            choices[s.id] = [Choice(DENSE, DENSE, note=cones.why.get(s.id, "not measurable"))]
            notes.append(f"{s.id}: kept dense: {cones.why.get(s.id, 'not measurable')}")
    phases = {"observe and record": time.perf_counter() - t0}
    base = _costs(steps, state, sites, choices, feeds, env, kind, notes)
    phases["costs (FLOP counter)"] = time.perf_counter() - t0 - sum(phases.values())
    _sensitivities(steps, state, sites, choices, cones, env, refs, feeds, obj, logits, progress)
    phases["sensitivities"] = time.perf_counter() - t0 - sum(phases.values())
    return Measured(steps, state, sites, choices, feeds, heldout, obj, logits, base, kind, candidates, notes, phases)


def choose(m: Measured, budget: Budget) -> SearchResult:
    """The assignment meeting `budget` with the least loss: the Pareto DP over the measured
    choices, verified and refined on the whole model (`_refine`), measured on held-out inputs."""
    from attn_opt.pipeline import budget_measure as bm

    if budget.kind != m.kind:
        raise UserError(f"--budget {budget.text()}: the choices were measured for a {m.kind} budget")
    t0 = time.perf_counter()
    sites, choices, obj, base = m.sites, m.choices, m.objective, m.base
    order = [s.id for s in sites]
    points = pareto([[c.cost for c in choices[i]] for i in order], [[c.loss for c in choices[i]] for i in order])
    cheapest = base + min(p.cost for p in points)
    if cheapest > budget.fraction + 1e-9:
        raise UserError(f"--budget {budget.text()} cannot be met: the cheapest the candidates reach is "
                        f"{budget.kind}={cheapest:.3f}; nothing written")
    measure_ = _measurer(m.steps, m.state, sites, choices, m.feeds, m.state.outputs, obj, m.logits)
    best, tried = _refine(points, choices, order, base, budget.fraction, measure_)
    held = None
    if m.heldout is not None:
        if m.held_refs is None:
            m.held_refs = m.state.model.run(m.heldout)
        held = _measurer(m.steps, m.state, sites, choices, m.heldout, m.held_refs, obj, m.logits)(best.picks)[0]
    phases = dict(m.phases, **{"solve, verify, refine": time.perf_counter() - t0})
    plan = {sid: choices[sid][j].spec for sid, j in zip(order, best.picks)}
    entries = {}
    for s, j in zip(sites, best.picks):
        c = choices[s.id][j]
        entries[s.id] = {"spec": c.spec, "layer": s.layer, "cost": round(c.cost, 6), "loss_alone": c.loss,
                         "fidelity_alone": bm.score_text(obj, c.loss), "choices": len(choices[s.id]),
                         **({"note": c.note} if c.note else {})}
    summary = {"budget": budget.text(), "objective": obj, "cost_definition": KINDS[budget.kind],
               "cost": base + best.cost, "predicted_loss": best.loss, "measured_loss": best.measured,
               "heldout_loss": held, "heldout_fidelity": None if held is None else bm.score_text(obj, held),
               "search_fidelity": bm.score_text(obj, best.measured), "candidates": m.candidates,
               "seconds": sum(phases.values()), "phases": phases, "notes": list(m.notes),
               "inputs": {"search": {k: list(v.shape) for k, v in m.feeds.items()},
                          "heldout": {k: list(v.shape) for k, v in m.heldout.items()} if m.heldout else None}}
    pts = [{"cost": base + p.cost, "predicted_loss": p.loss, "measured_loss": p.measured,
            **({"fold_losses": list(p.folds)} if p.folds else {})} for p in points]
    pts += [{"cost": base + p.cost, "predicted_loss": p.loss, "measured_loss": p.measured, "refined": True,
             "uniform": p.uniform, **({"fold_losses": list(p.folds)} if p.folds else {})}
            for p in tried if all(p.picks != q.picks for q in points)]
    chosen = {"cost": base + best.cost, "predicted_loss": best.loss, "measured_loss": best.measured,
              "uniform": best.uniform, **({"fold_losses": list(best.folds)} if best.folds else {})}
    return SearchResult(plan, entries, pts, chosen, summary)


def _costs(steps, state, sites, choices, feeds, env, kind: str, notes) -> float:
    """Each choice's cost as a fraction of the original's (attention or model matrix-product
    FLOPs), counted on copies with every site lowered to one choice template at once."""
    from attn_opt.pipeline import budget_measure as bm

    which = 0 if kind == "attention" else 1
    total = state.flops.attention_matmul if which == 0 else state.flops.matmul
    if not total:
        raise UserError(f"--budget {kind}=...: the model has no {kind} FLOPs to budget")
    dense = bm.site_flops(state.model, feeds, {s.id: set(s.nodes) for s in sites}, env)
    base = (total - sum(v[which] for v in dense.values())) / total
    templates = list(dict.fromkeys(c.template for cs in choices.values() for c in cs if c.spec != DENSE))
    for t in templates:
        copy = _fresh(steps, state, feeds)
        by_id = {s.id: s for s in copy.det.sites}
        lowered = []
        for sid, cs in choices.items():
            for c in cs:
                if c.template != t:
                    continue
                reason = steps.supports(by_id[sid], c.form)
                if reason:
                    c.note = f"refused: {reason}"
                    continue
                c.note = steps.lower(copy, by_id[sid], c.form, "plan") or ""
                lowered.append(sid)
        steps.finish(copy)
        got = bm.site_flops(copy.model, feeds, {sid: set() for sid in lowered}, env)
        for sid in lowered:
            for c in choices[sid]:
                if c.template == t:
                    c.cost = got[sid][which] / total
    for sid, cs in choices.items():
        cs[0].cost = dense[sid][which] / total
        refused = [c for c in cs if c.note.startswith("refused")]
        for c in refused:
            notes.append(f"{sid}: {c.spec} {c.note}")
            cs.remove(c)
    return base


def _sensitivities(steps, state, sites, choices, cones, env, refs, feeds, obj, logits, progress) -> None:
    """Each non-dense choice's loss with its site alone changed: the site's downstream cone
    re-run on the observation run's values (one ORT session per site)."""
    from attn_opt.pipeline import budget_measure as bm

    todo = sum(len(choices[s.id]) - 1 for s in sites)
    best = {}
    with _bar(progress, todo, "measuring each site's choices") as advance:
        for s in sites:
            if len(choices[s.id]) < 2:
                continue
            sess = cones.session(s.id, env)
            for c in choices[s.id][1:]:
                outs = bm.run_cone(sess, s, env, bm.form_probabilities(s, env, c.form), refs)
                c.loss = bm.loss(obj, refs, outs, feeds, logits)
                best[s.id] = min(best.get(s.id, 1e9), c.loss)
                advance(f"{s.id} {c.spec}: {bm.score_text(obj, c.loss)}")
            del sess


def _measurer(steps, state, sites, choices, feeds, refs, obj, logits):
    """picks -> (the whole model's loss with every site lowered to its pick, the same per fold
    of the rows: `bm.fold_losses`), from a copy run once."""
    from attn_opt.pipeline import budget_measure as bm

    def measure(picks) -> float:
        copy = _fresh(steps, state, feeds)
        by_id = {s.id: s for s in copy.det.sites}
        for s, j in zip(sites, picks):
            if j:
                steps.lower(copy, by_id[s.id], choices[s.id][j].form, "plan")
        steps.finish(copy)
        outs = copy.model.run(feeds)
        return bm.loss(obj, refs, outs, feeds, logits), bm.fold_losses(obj, refs, outs, feeds, logits)

    return measure


def _fresh(steps, state, feeds):
    """A copy of the observed model to lower forms into (lowering edits the nodes a state's
    sites refer to): observed again without a run, from the values already read."""
    return steps.observe(state.model.clone(), feeds, run=False, known=state)
