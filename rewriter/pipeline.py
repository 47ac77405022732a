"""The ONNX pipeline: detect → rewrite → check, once per pass, each step saying what it
changed. Checks after every pass: onnx.checker (full), an ONNX Runtime session builds,
fidelity against the untouched model on the same seeded inputs, FLOPs (all and
attention) and parameters before and after. An exact pass past 1e-4 relative error, or
any pass past --max-error, stops the pipeline unless forced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from attn_opt.backends.onnxruntime.edit import SiteEdit, sweep
from attn_opt.patterns.detect import detect
from attn_opt.rewriter import fidelity
from attn_opt.rewriter.errors import UserError
from attn_opt.rewriter.ir import onnx as onnx_adapter
from attn_opt.rewriter.ir import onnx_flops
from attn_opt.rewriter.passbase import Pass

EXACT_TOL = 1e-4


class FidelityError(UserError):
    """A pass moved the model further than allowed; nothing was written."""


@dataclass
class PassReport:
    name: str
    options: dict
    exact: bool
    sites_rewritten: list[str] = field(default_factory=list)
    sites_skipped: list[dict] = field(default_factory=list)
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

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Report:
    inputs: dict
    passes: list[PassReport] = field(default_factory=list)
    models: list = field(default_factory=list, repr=False)  # the model after each pass (not in JSON)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "passes": [p.to_json() for p in self.passes]}


def _logit_outputs(proto: onnx.ModelProto, outputs: dict[str, np.ndarray]) -> set[str]:
    """Outputs that are logits: named so, or sized like a vocabulary (an embedding table)."""
    vocab = {int(t.dims[0]) for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] >= 100}
    return {k for k, v in outputs.items()
            if "logit" in k.lower() or (np.ndim(v) >= 2 and np.shape(v)[-1] in vocab)}


def _attention_nodes(det) -> set[str]:
    return {n for s in det.sites for n in s.nodes}


def _select(sites, layers: set[int] | None, ids: set[str] | None):
    chosen, skipped = [], []
    for s in sites:
        if ids is not None and s.id not in ids:
            skipped.append({"id": s.id, "reason": "not in --sites"})
        elif layers is not None and s.layer not in layers:
            skipped.append({"id": s.id, "reason": f"layer {s.layer} not in --layers"})
        else:
            chosen.append(s)
    return chosen, skipped


def _upgrade(proto: onnx.ModelProto, version: int) -> onnx.ModelProto:
    cur = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur >= version:
        return proto
    try:
        new = onnx.version_converter.convert_version(proto, version)
    except Exception as e:
        raise UserError(f"cannot convert the model from opset {cur} to {version} for this pass ({e})") from None
    meta = {n.name: n.metadata_props for n in proto.graph.node if n.name and n.metadata_props}
    for n in new.graph.node:  # the converter drops node metadata (module scopes: layers)
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])
    return new


def sink_ratios(gv, sites, p: Pass, feeds) -> dict:
    """Per site and head, the share of attention on the first token before and after `p`,
    on the fidelity inputs (the form's NumPy normaliser on probed Q/K/V)."""
    from attn_opt.patterns import evaluate
    from attn_opt.rewriter import forms

    probed = gv.probe([v for s in sites for v in evaluate.needed(s)], feeds)
    out = {}
    for s in sites:
        try:
            before = forms.sink_ratio(evaluate.probabilities(s, probed))
            after = forms.sink_ratio(evaluate.probabilities(s, probed, p.reference(s)))
        except (ValueError, KeyError):
            continue
        out[s.id] = {"before": np.round(before, 4).tolist(), "after": np.round(after, 4).tolist()}
    return out


def load_detect(proto: onnx.ModelProto, feeds=None):
    """(onnx_ir model, view, detection) of a proto; detection on the fidelity inputs."""
    _, model, gv = onnx_adapter.load_view(proto)
    return model, gv, detect(gv, feeds=feeds)  # shapes as the fidelity inputs have them


def apply_pass(proto: onnx.ModelProto, p: Pass, layers=None, ids=None, feeds=None, report: dict | None = None,
               loaded=None):
    """One pass on a ModelProto: (new proto, rewritten ids, skipped [{id, reason}], notes).
    `loaded` is load_detect(proto, feeds) when the caller has it already (it is consumed)."""
    need = getattr(p, "needs_opset", lambda: None)()
    upgraded = _upgrade(proto, need) if need else proto
    if loaded is None or upgraded is not proto:
        loaded = load_detect(upgraded, feeds)
    model, gv, det = loaded
    chosen, skipped = _select(det.sites, layers, ids) if getattr(p, "touches_sites", lambda: True)() else ([], [])
    rewritten, notes = [], []
    diag = {}
    if getattr(p, "needs_diagnostics", lambda: False)():
        from attn_opt.patterns.diagnostics import for_pass

        diag = for_pass(gv, chosen, feeds if feeds is not None else gv.sample_inputs(), getattr(p, "window", None))
    for site in chosen:
        reason = p.skip_reason(site)
        if reason:
            skipped.append({"id": site.id, "reason": reason})
            continue
        edit = SiteEdit(model, site, p.name)
        edit.diagnostics = diag.get(site.id)
        note = p.rewrite_onnx(edit, _choice(p, site))
        rewritten.append(site.id)
        if note:
            notes.append(f"{site.id}: {note}")
    if hasattr(p, "rewrite_graph"):
        notes += p.rewrite_graph(model, gv)
    if report is not None and feeds is not None and hasattr(p, "reference") and rewritten:
        report["sink_ratio"] = sink_ratios(gv, [s for s in chosen if s.id in rewritten], p, feeds)
    sweep(model)
    return onnx_adapter.ir.serde.serialize_model(model), rewritten, skipped, notes


def _choice(p: Pass, site):
    choose = getattr(p, "choose", None)
    return choose(site) if choose else None


def check_valid(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise UserError(f"the rewritten model is not valid ONNX ({str(e).strip().splitlines()[0]})") from None


def run_pipeline(proto: onnx.ModelProto, passes: list[Pass], feeds: dict[str, np.ndarray],
                 layers=None, ids=None, max_error: float | None = None, force: bool = False,
                 input_note: dict | None = None) -> tuple[onnx.ModelProto, Report]:
    from attn_opt.passes import check_chain

    check_chain(passes)
    report = Report(inputs=input_note or {k: list(v.shape) for k, v in feeds.items()})
    ref = onnx_adapter.run(proto, feeds)
    logits = _logit_outputs(proto, ref)
    cur, prev = proto, ref
    loaded = load_detect(cur, feeds)
    flops_cur = onnx_flops.count(cur, feeds, _attention_nodes(loaded[2]))
    for p in passes:
        t0 = time.perf_counter()
        extra: dict = {}
        new, rewritten, skipped, notes = apply_pass(cur, p, layers, ids, feeds, extra, loaded)
        check_valid(new)
        out = onnx_adapter.run(new, feeds)
        per = {k: fidelity.compare(ref[k], out[k], logits=k in logits) for k in ref}
        fid = fidelity.worst(per)
        step = fidelity.worst({k: fidelity.compare(prev[k], out[k], logits=k in logits) for k in ref})
        loaded = load_detect(new, feeds)  # for the FLOP count, and the next pass's sites
        flops_new = onnx_flops.count(new, feeds, _attention_nodes(loaded[2]))
        rep = PassReport(p.name, p.options(), p.is_exact(), rewritten, skipped,
                         flops_cur.total, flops_new.total, flops_cur.attention, flops_new.attention,
                         onnx_flops.params(cur), onnx_flops.params(new), fid.to_json(), step.to_json(),
                         {k: f.to_json() for k, f in per.items()}, notes, extra.get("sink_ratio", {}),
                         time.perf_counter() - t0)
        report.passes.append(rep)
        problem = None
        if p.is_exact() and not step.max_rel_error <= EXACT_TOL:
            problem = f"{p.name} is exact, but moved outputs by {step.max_rel_error:.3g} (bound {EXACT_TOL:g})"
        elif max_error is not None and not fid.max_rel_error <= max_error:
            problem = f"{p.name}: relative error {fid.max_rel_error:.3g} from the original exceeds --max-error {max_error:g}"
        if problem and not force:
            err = FidelityError(f"{problem}; nothing written (use --force to write anyway)")
            err.report = report
            raise err
        report.models.append(new)
        cur, prev, flops_cur = new, out, flops_new
    return cur, report
