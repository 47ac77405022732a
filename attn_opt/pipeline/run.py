"""The pass pipeline, one for both IRs: a flat list of named steps, each an adapter method
(`pipeline/onnx_steps.py`, `pipeline/fx_steps.py`).

    observe   view the model, match the rules, run it once on the fidelity inputs (outputs,
              the values detection probes, the shapes FLOP counting needs), detect, count
    select    the sites --layers / --sites choose
    rewrite   each chosen site the pass does not skip (every skip has a reason)
    validate  the rewritten graph is valid (onnx.checker / graph.lint)
    observe   the rewritten model, the same way: its one run gives its outputs for
              fidelity and the next pass's sites
    fidelity  against the untouched model (outputs computed once) and the previous step
    count     FLOPs (matrix products) and attention FLOPs, parameters

An exact pass past its dtype's bound, or any pass past --max-error, stops the pipeline
unless forced. With check="sites" the model is never run whole: each rewritten site is
checked on the activations of the model before the pass, one segment at a time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attn_opt.core import fidelity
from attn_opt.core.errors import DoesNotRun, NotSupported, UserError
from attn_opt.core.passbase import Layers, Pass, spans_text
from attn_opt.core.progress import Progress
from attn_opt.pipeline.calibrate import Calibration
from attn_opt.pipeline.steps import Steps

EXACT_TOL = 1e-4


class FidelityError(UserError):
    """A pass moved the model further than allowed; nothing was written."""


@dataclass(frozen=True)
class Skipped:
    """A site a pass did not rewrite, and why."""

    id: str
    reason: str

    def to_json(self) -> dict:
        return {"id": self.id, "reason": self.reason}


@dataclass
class PassReport:
    name: str
    options: dict
    exact: bool
    sites_rewritten: list[str] = field(default_factory=list)
    sites_skipped: list[Skipped] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0
    attention_flops_before: int = 0
    attention_flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    fidelity: dict = field(default_factory=dict)  # against the original model (cumulative)
    step_fidelity: dict = field(default_factory=dict)  # against the model before this pass
    per_output: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sink_ratio: dict = field(default_factory=dict)  # site -> {"before": [per head], "after": [...]}
    seconds: float = 0.0
    check: str = "model"
    per_site: dict = field(default_factory=dict)  # check="sites": site -> fidelity of its output
    fidelity_all: dict = field(default_factory=dict)  # worst over every input set (fidelity + variants)
    step_fidelity_all: dict = field(default_factory=dict)
    calibration: Calibration | None = None  # --calibrate: per site fits, the model before/after

    def to_json(self) -> dict:
        return dict(self.__dict__, sites_skipped=[s.to_json() for s in self.sites_skipped],
                    calibration=self.calibration.to_json() if self.calibration is not None else {})


@dataclass
class Report:
    inputs: dict
    passes: list[PassReport] = field(default_factory=list)
    models: list = field(default_factory=list, repr=False)  # the model after each pass (not in JSON)
    check: str = "model"
    flops_definition: str = ("matrix products (MatMul/Gemm/Einsum/Conv and the products inside attention "
                             "ops), 2 FLOPs per multiply-add, at the fidelity inputs' shapes")

    steps: list = field(default_factory=list)  # (step, seconds) of the whole invocation
    feeds: dict | None = field(default=None, repr=False)  # the fidelity inputs the run used (not in JSON)
    ir: str = ""  # "onnx" | "fx" (not in JSON)
    sites_found: int = 0  # attention sites in the model as given
    near_misses: list = field(default_factory=list, repr=False)  # the softmaxes that are not sites, and why
    plan: dict | None = field(default=None, repr=False)  # --budget: the plan chosen (written as OUT.plan.json)

    def to_json(self) -> dict:
        out = {"inputs": self.inputs, "check": self.check, "flops": self.flops_definition,
               "sites_found": self.sites_found, "softmaxes_not_sites": [m.to_json() for m in self.near_misses],
               "passes": [p.to_json() for p in self.passes], "steps": self.steps}
        if self.plan:
            out["plan"] = {k: v for k, v in self.plan.items() if k != "tried"}
        return out


@dataclass
class State:
    """One model as the pipeline sees it: what its one run and its detection gave."""

    model: Any  # OnnxModel or GraphModule
    view: Any  # GraphView
    det: Any  # Detection
    outputs: dict[str, np.ndarray] | None  # None when the model was not run (check != "model")
    flops: Any  # Flops
    params: int


@dataclass
class Applied:
    rewritten: list[str]
    skipped: list[dict]
    notes: list[str]
    sink_ratio: dict = field(default_factory=dict)
    exact: bool = True  # the pass is exact on every site it rewrote (Pass.exact_on)
    fitted: str | None = None  # what --calibrate fitted to choose the forms (DuoAttention gates), where it did


def parse_chain(passes) -> list[Pass]:
    """Pass specs ("sparse:window=8") or Pass objects to a checked chain of passes."""
    from attn_opt import passes as registry

    chain = [registry.parse(p) if isinstance(p, str) else p for p in passes]
    registry.check_chain(chain)
    return chain


def check_selection(sites, layers: set[int] | None, ids: set[str] | None) -> None:
    """--sites / --layers naming what the model does not have is a typo: refuse it."""
    have = [s.id for s in sites]
    if ids is not None and (missing := sorted(x for x in ids if not any(_picks(h, {x}) for h in have))):
        raise UserError(f"no site {', '.join(map(repr, missing))}; sites: {', '.join(have) or 'none'}")
    known = sorted({s.layer for s in sites if s.layer is not None})
    missing = Layers.of(layers).missing(known) if layers is not None else []  # intervals: never expanded
    if missing:
        raise UserError(f"no attention in layer {spans_text(missing)}; "
                        f"layers with sites: {_ranges(known) or 'none (no layer numbers found)'}")


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}-{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ",".join(out)


def _picks(site_id: str, ids: set[str]) -> bool:
    """An id names the site, or the region it is in (`--sites pad_if/then` or `function:Attn`)."""
    return site_id in ids or any(site_id.startswith(x.rstrip("/") + "/") for x in ids)


def select(sites, layers: set[int] | None, ids: set[str] | None):
    chosen, skipped = [], []
    for s in sites:
        if ids is not None and not _picks(s.id, ids):
            skipped.append(Skipped(s.id, "not in --sites"))
        elif layers is not None and s.layer not in layers:
            skipped.append(Skipped(s.id, f"layer {s.layer} not in --layers"))
        else:
            chosen.append(s)
    return chosen, skipped


def rewrite(steps, state: State, p: Pass, layers=None, ids=None, feeds=None, want_sinks: bool = False,
            calibrating: bool = False, lora: int = 0, choose_on: dict | None = None) -> Applied:
    """Rewrite the chosen sites of `state.model` in place (the sites refer to its nodes);
    `calibrating`: the forms carry their per-head parameters, at the identity, to be fitted,
    and a rank-`lora` correction of each site's output projection (zero) if `lora`.
    `choose_on`: the inputs the diagnostics behind choices like sinks=auto run on (default
    `feeds`; with calibration, the calibration inputs, so the held-out set stays unseen)."""
    from attn_opt.patterns.regions import rewrite_reason

    chosen, skipped = select(state.det.sites, layers, ids) if p.touches_sites() else ([], [])
    diag = {}
    if p.needs_diagnostics() and chosen:
        from attn_opt.patterns.diagnostics import for_pass

        on = next((f for f in (choose_on, feeds) if f is not None), None) or state.view.sample_inputs()
        diag = for_pass(state.view, chosen, on, getattr(p, "window", None))
    if chosen and choose_on is not None and hasattr(p, "activations"):  # latent: an SVD of what the projections read
        wanted = p.activations(chosen)
        got = state.view.probe(list(wanted.values()), choose_on)
        diag = {sid: {"x": got[v.name]} for sid, v in wanted.items() if v.name in got}
    rewritten, notes, fitted = [], [], None
    if calibrating and chosen and getattr(p, "fits_gates", lambda: False)():  # DuoAttention: the choice is the fit
        from attn_opt.patterns.diagnostics import SiteDiagnostics

        fitted = steps.stream_gates(state, [s.id for s in chosen], choose_on if choose_on is not None else feeds, p)
        diag = {sid: dataclasses.replace(diag[sid], gates=g) if sid in diag else SiteDiagnostics([], None, g)
                for sid, g in fitted.gates.items()}
    for site in chosen:
        reason = rewrite_reason(site, p, calibrating and p.produces == "form") or p.skip_reason(site) \
            or p.diag_skip_reason(site, diag.get(site.id))
        if reason is None and p.is_exact() and p.computes_attention and getattr(site, "quantized", False):
            reason = ("its scores/probabilities are rounded by QuantizeLinear/DequantizeLinear inside; "
                      f"{p.name} would compute them in float, so it is not exact here")
        if reason:
            skipped.append(Skipped(site.id, reason))
            continue
        form = p.form(site, diag.get(site.id))
        if calibrating and p.produces == "form" and fitted is None:
            if form.pattern is not None and form.pattern.selection is not None:
                raise NotSupported(f"{p.name}: --calibrate with a content selection ({form.pattern.kind}) "
                                   "is not implemented yet")
            form = dataclasses.replace(form, normaliser=form.normaliser.calibrate(heads=site.heads), lora=lora)
        if (reason := steps.supports(site, form)) is not None:  # the backend's own word, before anything is emitted
            skipped.append(Skipped(site.id, reason))
            continue
        said = [form.describe(), *form.notes, steps.lower(state, site, form, p.name)]
        rewritten.append(site.id)
        if any(said):
            notes.append(f"{site.id}: " + "; ".join(n for n in said if n))
    for edit in p.graph_edits():
        notes += steps.graph_edit(state, edit)
    sinks = {}
    if want_sinks and feeds is not None and p.replaces_normaliser and rewritten:
        sinks = sink_ratios(state.view, [s for s in chosen if s.id in rewritten], p, feeds)
    steps.finish(state)
    exact = p.is_exact() and all(p.exact_on(s) for s in chosen if s.id in rewritten)
    return Applied(rewritten, skipped, notes, sinks, exact, fitted.describe(p.gate_above) if fitted else None)


def sink_ratios(gv, sites, p: Pass, feeds) -> dict:
    """Per site and head, the share of attention on the first token before and after `p`,
    on the fidelity inputs (the form's NumPy normaliser on probed Q/K/V)."""
    from attn_opt.patterns import reference

    probed = gv.probe([v for s in sites for v in reference.needed(s)], feeds)
    out = {}
    for s in sites:
        try:
            before = reference.sink_ratio(reference.probabilities(s, probed))
            after = reference.sink_ratio(reference.probabilities(s, probed, p.form(s).normaliser))
        except (ValueError, KeyError):
            continue
        out[s.id] = {"before": np.round(before, 4).tolist(), "after": np.round(after, 4).tolist()}
    return out


def outputs_epsilon(outputs: dict | None) -> float | None:
    """Machine epsilon of the coarsest floating output array."""
    eps = [float(np.finfo(v.dtype).eps) for v in (outputs or {}).values()
           if np.issubdtype(np.asarray(v).dtype, np.floating)]
    return max(eps) if eps else None


def exact_bound(steps, state: State) -> float:
    """How far an exact pass may move outputs: 1e-4 in fp32, scaled to coarser dtypes'
    rounding (the outputs' own epsilon times 8)."""
    return max(EXACT_TOL, 8 * (steps.output_epsilon(state) or 0.0))


@dataclass
class RunOptions:
    """What a pipeline run is asked for besides the model, passes and inputs."""

    check: Any = None  # a strategy of pipeline/checks.py (default: ModelCheck without variants)
    layers: set[int] | None = None
    ids: set[str] | None = None
    max_error: float | None = None
    force: bool = False
    reference: dict | None = None  # the untouched model's outputs, where the caller has them (an nn.Module)
    keep_models: bool = False  # (before, after) of every pass in the report, for pages
    progress: Progress | None = None
    calibrate: dict | None = None  # inputs the forms' parameters are fitted on (the fidelity inputs: held out)
    lora: int = 0
    input_note: dict | None = None


def run(steps: Steps, model, passes: list[Pass], feeds: dict[str, np.ndarray], opts: RunOptions | None = None):
    """Passes in order on `model` (edited in place) through the IR's step adapter; returns
    (the rewritten model, Report)."""
    from attn_opt.passes import check_chain
    from attn_opt.pipeline.checks import ModelCheck

    opts = opts or RunOptions()
    check = opts.check or ModelCheck()
    _check_options(opts, check)
    check_chain(passes)
    progress = opts.progress = opts.progress or Progress(None)
    report = Report(inputs=opts.input_note or {k: list(v.shape) for k, v in feeds.items()}, check=check.name)
    steps.run_along([f for _, f in getattr(check, "variants", []) if not callable(f)])  # one session per model
    with progress.step("observe the model (one run: outputs, probes, shapes)" if check.runs
                       else "observe the model (structure only)"):
        cur = steps.observe(model, feeds, run=check.runs)
    check_selection(cur.det.sites, opts.layers, opts.ids)
    report.sites_found, report.near_misses = len(cur.det.sites), list(cur.det.near_misses)
    if opts.lora:
        from attn_opt.pipeline.calibrate import check_lora

        check_lora(select(cur.det.sites, opts.layers, opts.ids)[0], opts.lora)
    ref = opts.reference if opts.reference is not None else cur.outputs
    ref_cal = steps.outputs_on(cur.model, opts.calibrate) if opts.calibrate is not None else None
    check.start(steps, cur)
    report.inputs = dict(report.inputs, variants=[label for label, _ in getattr(check, "variants", [])])
    for p in passes:
        cur = _one_pass(steps, p, cur, feeds, opts, check, report, ref, ref_cal)
    report.steps = progress.seconds
    return cur.model, report


def _check_options(opts: RunOptions, check) -> None:
    if opts.max_error is not None and not opts.max_error >= 0:
        raise UserError(f"--max-error must be a number >= 0 (got {opts.max_error:g})")
    if opts.calibrate is not None and not check.runs:
        raise UserError("--calibrate runs the model on its inputs: it needs --check=model")
    if not (isinstance(opts.lora, int) and opts.lora >= 0):
        raise UserError(f"--lora must be a whole number >= 0 (got {opts.lora!r})")
    if opts.lora and opts.calibrate is None:
        raise UserError("--lora R is fitted by calibration: give --calibrate FILE.npz too")


def _one_pass(steps: Steps, p: Pass, cur: State, feeds, opts: RunOptions, check, report, ref, ref_cal) -> State:
    """One pass: prepare, rewrite, validate, calibrate, observe, check, enforce."""
    t0, progress = time.perf_counter(), opts.progress
    with progress.step(f"{p.name}: prepare"):
        cur = steps.prepare(cur, p, feeds, run=check.runs)
    keep = opts.keep_models or check.snapshots
    before = dataclasses.replace(cur, model=steps.snapshot(cur)) if keep else cur
    calibrating = opts.calibrate is not None and p.produces == "form"
    with progress.step(f"{p.name}: rewrite sites"):
        old_sites = {s.id: s for s in cur.det.sites}
        targets = None
        if calibrating and opts.lora:  # what each output projection reads in this model: the LoRA's targets
            wanted = [s.out_projection.x for s in cur.det.sites if s.out_projection is not None]
            targets = (cur.view.probe(wanted, opts.calibrate), cur.view.probe(wanted, feeds))
        applied = rewrite(steps, cur, p, opts.layers, opts.ids, feeds, want_sinks=check.runs,
                          calibrating=calibrating, lora=opts.lora, choose_on=opts.calibrate)
    with progress.step(f"{p.name}: validate"):
        steps.validate(cur.model)
    calibration = None
    if calibrating and applied.fitted:
        calibration = Calibration(note=f"{p.name}: {applied.fitted} (the choice is the fit: no parameters after)")
    elif calibrating and applied.rewritten:
        calibration = _calibrate(steps, cur.model, old_sites, applied.rewritten, opts.calibrate, feeds, ref_cal, ref,
                                 progress, opts.lora, targets, steps.logit_outputs(cur))
    elif opts.calibrate is not None and hasattr(p, "activations"):
        calibration = {"note": f"{p.name}: fitted on the calibration inputs' activations (no parameters to fit after)"}
    elif opts.calibrate is not None and p.touches_sites():
        calibration = Calibration(note=f"{p.name} has no parameters --calibrate fits (it is exact at insertion"
                                       + ("; its gates train with attn_opt.heal on torch, or load weights=FILE)"
                                          if p.produces == "gate" else ")"))
    with progress.step(f"{p.name}: run, fidelity, FLOPs" if check.runs else f"{p.name}: FLOPs"):
        try:
            # without a run, the values detection read before the pass serve where it needs no other
            new = steps.observe(cur.model, feeds, run=check.runs, known=None if check.runs else cur)
        except DoesNotRun as e:
            raise UserError(f"{p.name}: the rewritten model does not run "
                            f"({str(e).split('; give --inputs')[0]}); nothing written") from None
    rep = PassReport(p.name, p.options(), applied.exact, applied.rewritten, applied.skipped,
                     before.flops.matmul, new.flops.matmul, before.flops.attention_matmul,
                     new.flops.attention_matmul, before.params, new.params, notes=applied.notes,
                     sink_ratio=applied.sink_ratio, check=check.name, calibration=calibration)
    rep.notes += [f"FLOPs: {n}" for n in getattr(new.flops, "notes", ())]  # branches, loops, functions
    if getattr(new.flops, "selection_matmul", 0):  # a content pattern's selection, within the attention FLOPs
        rep.notes.append(f"FLOPs: {new.flops.selection_matmul:.3g} of the {new.flops.attention_matmul:.3g} attention "
                         "FLOPs choose the key blocks (block scores of mean-pooled Q and K)")
    fid, step = check.measure(steps, rep, ref, before, new, applied.rewritten, feeds, progress)
    rep.seconds = time.perf_counter() - t0
    report.passes.append(rep)
    _enforce(p, rep, fid, step, exact_bound(steps, new), opts.max_error, opts.force, report)
    if opts.keep_models:
        report.models.append((before.model, steps.snapshot(new)))
    return new


def _calibrate(steps, model, old_sites, rewritten, calib, heldout, ref_cal, ref_heldout, progress, lora=0,
               targets=None, logits: set = frozenset()) -> Calibration:
    """Fit the rewritten sites' parameters (steps.calibrate) and say what it did: per site, and
    the model's error against the original before and after, on the calibration inputs
    and on the held-out ones."""
    from attn_opt.pipeline.calibrate import relative_error

    def measure(refs, f):
        """(worst relative error over the outputs, the order of each output): ||out −
        original|| / ||original|| (the sites' figure, model-wide; over the positions an input
        named like a mask keeps, where an output has them); an output's order is the
        arg-max agreement of logits, else the pair ranking of the batch's rows, pooled over
        the positions an input named like a mask keeps (core/fidelity.py)."""
        if refs is None:
            return None, {}
        outs = steps.outputs_on(model, f)
        same = [k for k in refs if np.shape(outs[k]) == np.shape(refs[k])]
        mask = next((v for n, v in f.items() if "mask" in n.lower() and np.ndim(v) == 2), None)  # a padding mask

        def kept(x):  # the positions the padding mask keeps, where an output is [B, T, ...]
            x = np.asarray(x, np.float64)
            return x[np.asarray(mask, bool)] if mask is not None and x.shape[:2] == np.shape(mask) else x

        errs = [relative_error(kept(outs[k]), kept(refs[k])) for k in same]
        order = {k: fidelity.compare(refs[k], outs[k], logits=True).top1_agreement if k in logits
                 else fidelity.pair_ranking(refs[k], outs[k], mask) for k in same}
        return (max(errs) if errs else None), {k: o for k, o in order.items() if o is not None}

    (cal_b, _), (held_b, rank_b) = measure(ref_cal, calib), measure(ref_heldout, heldout)
    before = {"calibration": cal_b, "heldout": held_b, "heldout_order": rank_b}
    t0 = time.perf_counter()
    fits = steps.calibrate(model, old_sites, rewritten, calib, heldout, progress, lora, targets)
    seconds = time.perf_counter() - t0
    (cal_a, _), (held_a, rank_a) = measure(ref_cal, calib), measure(ref_heldout, heldout)
    after = {"calibration": cal_a, "heldout": held_a, "heldout_order": rank_a}
    worse = [k for k in rank_a if k in rank_b and rank_a[k] < rank_b[k]]
    why = None
    if held_a is not None and held_b is not None and held_a > held_b:
        why = f"the model's held-out error rose with calibration ({held_b:.3g} -> {held_a:.3g})"
    elif worse:
        why = ("the order of the model's held-out outputs got worse with calibration ("
               + ", ".join(f"{k} {rank_b[k]:.4f} -> {rank_a[k]:.4f}" for k in worse) + ")")
    note = None
    if why:
        from attn_opt.pipeline.calibrate import reset

        reset(model, fits)  # calibration undone
        for f in fits:
            f.reverted = True
        note = why + ": every site went back to the identity"
        after = dict(before)
    return Calibration(fits, before, after, seconds, note)


def _enforce(p, rep, fid, step, bound, max_error, force, report) -> None:
    problem = None
    if rep.exact and step is not None and not step.max_rel_error <= bound:
        problem = (f"{p.name} is exact, but moved outputs by {step.max_rel_error:.3g} (bound {bound:g}"
                   f"{'; on every input set' if rep.step_fidelity_all else ''})")
    elif max_error is not None and (fid or step) is not None and not (fid or step).max_rel_error <= max_error:
        problem = (f"{p.name}: relative error {(fid or step).max_rel_error:.3g} from the original exceeds "
                   f"--max-error {max_error:g}")
    if problem and not force:
        err = FidelityError(f"{problem}; nothing written (use --force to write anyway)")
        err.report = report
        raise err


