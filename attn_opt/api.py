"""The front door: `inspect`, `optimize`, `heal` and `backend`, what `import attn_opt`
gives and what the command line calls. `optimize` owns everything between a user's
request and the pipeline: loading any kind of model, the fidelity inputs (given, read
from an .npz, or generated from the signature, with a retry at batch 1 for models traced
at it), the calibration inputs, the variant input sets, and the `check` choice.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import numpy as np

from attn_opt.core.errors import DoesNotRun, NotSupported, UserError
from attn_opt.patterns.detect import Detection, detect
from attn_opt.pipeline.checks import check as check_strategy


def steps_for(ir: str):
    """The pipeline's step adapter for an IR."""
    if ir == "onnx":
        from attn_opt.pipeline.onnx_steps import OnnxSteps

        return OnnxSteps()
    from attn_opt.pipeline.fx_steps import FxSteps

    return FxSteps()


def inspect(model: Any, example_inputs=None, feeds=None, max_memory: str | int | None = None) -> Detection:
    """Find every attention site in `model`; `near_misses` says why each other softmax is not one.
    `max_memory` (bytes, or "8G"): the limit a run on `feeds` is refused past (default: the
    memory available)."""
    from attn_opt.core import limits
    from attn_opt.core.ir import load

    with limits.use(max_memory):
        loaded = load(model, example_inputs)
        return detect(loaded.view, feeds=feeds)


def optimize(model: Any, passes=("fuse",), example_inputs=None, feeds=None, *, inputs: str | None = None,
             input_shape=(), force: bool = False, layers=None, sites=None, max_error: float | None = None,
             check: str | None = None, calibrate=None, lora: int = 0, progress=None, keep_models: bool = False,
             max_memory: str | int | None = None, budget: str | None = None, candidates: str | None = None,
             plan: str | dict | None = None, objective: str = "auto"):
    """Run passes through the one pipeline; returns (rewritten model, report).

    `model`: an ONNX path, ModelProto or OnnxModel (a ModelProto comes back for a
    ModelProto, else an OnnxModel: `.save(path)` writes it, with external data where the
    input had it), a `.pt2` path, nn.Module, ExportedProgram or GraphModule (a
    GraphModule comes back; fidelity against the original module). The fidelity inputs:
    `feeds` (name -> array), else `inputs` (an .npz), else `example_inputs`, else
    generated from the signature (`input_shape`: NAME=1x4096 strings or name -> dims for
    its dynamic dims). `layers` / `sites` restrict the passes, `max_error` bounds the
    relative error, `check` is "model", "sites" or "none" (None: "model" where the weights
    fit in memory twice, else "sites"). `calibrate` (an .npz path or name -> array):
    inputs to fit each rewritten site's per-head parameters on; `lora` the rank of an
    output-projection correction fitted with them. `max_memory` (bytes, or "8G"), as
    `--max-memory`: inputs, runs and fits estimated (from their shapes) to need more are
    refused before anything is allocated; default: the memory available.
    `budget` ("attention=0.5", "flops=0.8"): search a form per site (pipeline/budget.py) over
    `candidates` ("sparse:window=8|16,sinks=auto;softplus") for the least `objective` loss
    within the budget, then apply that plan (`report.plan`, the plan file's contents);
    `plan` (a plan file's path, or site id -> spec) applies a plan without searching.
    """
    from attn_opt.core import limits

    with limits.use(max_memory):
        return _optimize(model, passes, example_inputs, feeds, inputs, input_shape, force, layers, sites, max_error,
                         check, calibrate, lora, progress, keep_models, budget, candidates, plan, objective)


def _plan_chain(passes, layers, sites, budget, candidates, plan):
    """--budget / --plan: the plan pass replaces the chain; what cannot go with them is refused."""
    from attn_opt.pipeline.budget import expand_candidates, parse_budget

    if budget is not None and plan is not None:
        raise UserError("give --budget (search a plan) or --plan (apply one), not both")
    if tuple(p if isinstance(p, str) else p.name for p in (passes or ())) not in ((), ("fuse",)):
        raise UserError(f"--{'budget' if budget is not None else 'plan'} chooses every site's form: give no --pass")
    if layers is not None or sites is not None:
        raise UserError("--budget and --plan choose the sites themselves: give no --layers or --sites")
    if candidates is not None and budget is None:
        raise UserError("--candidates narrows a --budget search; give --budget too")
    if budget is not None:
        b = parse_budget(budget)
        if b.kind == "cache" and candidates is None:
            from attn_opt.pipeline.budget_cache import DEFAULT_CANDIDATES

            candidates = DEFAULT_CANDIDATES
        return b, expand_candidates(candidates)
    return None, None


def _planned(loaded, native, steps, f0, calib, check, progress, plan, want, cands, objective):
    """(the chain: one plan pass, the sites it names, the search's result or None)."""
    from attn_opt.passes.plan import PlanPass
    from attn_opt.pipeline.run import parse_chain

    result = None
    name = choose_check(check, steps.weight_bytes(native))[0]
    if want is not None and name != "model":
        raise NotSupported(f"--budget runs the whole model on the search inputs; with --check={name} "
                           "(a model larger than memory, or no run) the search is not implemented yet")
    if want is not None:
        result = _search(loaded, native, steps, f0, calib, want, cands, objective, progress)
        specs = result.plan
    else:
        specs = dict(PlanPass(file=str(plan)).specs) if isinstance(plan, (str, os.PathLike)) else dict(plan)
    return parse_chain([PlanPass.of(specs)]), set(specs), result  # a site the plan names and the model lacks: refused


def _search(loaded, native, steps, f0, calib, budget, candidates, objective, progress):
    """The plan --budget chooses: searched on the calibration inputs where given, else on the
    first half of the fidelity inputs (the other half held out for its figure)."""
    from attn_opt.pipeline.budget import search

    if loaded.ir != "onnx":
        raise NotSupported("--budget searches ONNX models only (torch.fx / .pt2: not implemented yet; "
                           "--plan applies a plan on both)")
    if calib is not None:
        on, held, where = calib, f0, "the calibration inputs (figures on the fidelity inputs)"
    else:
        rows = min(len(v) for v in f0.values() if np.ndim(v))
        if rows >= 6:
            on = {k: v[:rows // 2] if np.ndim(v) else v for k, v in f0.items()}
            held = {k: v[rows // 2:] if np.ndim(v) else v for k, v in f0.items()}
            where = "the first half of the fidelity inputs' rows (figures on the other half)"
        else:
            on, held, where = f0, None, "the fidelity inputs (too few rows to hold some out: give --calibrate)"
    t0 = time.perf_counter()  # not a progress step: the search shows its own progress bar (one live display)
    result = search(steps, native, on, held, budget, candidates, objective, progress)
    if progress is not None:
        progress.seconds.append(("budget: search", time.perf_counter() - t0))
    result.summary["searched_on"] = where
    return result


def _optimize(model, passes, example_inputs, feeds, inputs, input_shape, force, layers, sites, max_error, check,
              calibrate, lora, progress, keep_models, budget=None, candidates=None, plan=None, objective="auto"):
    from attn_opt.core.inputs import parse_shape_overrides
    from attn_opt.core.ir import load
    from attn_opt.pipeline.run import RunOptions, parse_chain, run

    planned = budget is not None or plan is not None
    if planned:
        want, cands = _plan_chain(passes, layers, sites, budget, candidates, plan)
    chain = parse_chain(passes) if not planned else []
    overrides = input_shape if isinstance(input_shape, dict) else parse_shape_overrides(tuple(input_shape or ()))
    loaded = load(model, example_inputs)
    steps = steps_for(loaded.ir)
    native = copy.deepcopy(loaded.native) if loaded.ir == "fx" else loaded.native  # the caller's module untouched
    seen = loaded.view if loaded.ir == "onnx" else None  # the ONNX view load made (of `native`): not built again
    specs = steps.input_specs(native, seen)
    f0, note = _fidelity_inputs(specs, feeds, inputs, overrides, example_inputs, loaded,
                                steps.run_check(native, "give smaller --inputs" if inputs else "give smaller --input-shape"))
    calib = _calibration_inputs(specs, calibrate, steps.run_check(native, "give smaller --calibrate arrays"))
    chain, sites, result = (_planned(loaded, native, steps, f0, calib, check, progress, plan, want, cands, objective)
                            if planned else (chain, sites, None))
    if calib is not None:
        note = dict(note, calibration=calibrate if isinstance(calibrate, str) else "given", heldout="the fidelity inputs")
    name, why = choose_check(check, steps.weight_bytes(native))
    if why:
        note = dict(note, check=why)
    fresh = any(getattr(p, "changes_cache", False) for p in chain) and hasattr(steps, "first_step")
    if fresh:
        first = steps.first_step(native, f0)  # a replaced cache has no counterpart of a random past
        if first is not f0:
            f0, note = first, dict(note, shapes={k: list(v.shape) for k, v in first.items()}, first_step="a pass replaces the KV cache: the fidelity inputs are the "
                                                    "step's first call (empty past); the loop checks the steps after")
    generated = feeds is None and inputs is None and example_inputs is None and not overrides
    batch1 = {k: v[:1] if v.ndim else v for k, v in f0.items()}  # a scalar (an If's condition) has no batch
    tries = [f0] + ([batch1] if generated else [])
    for i, f in enumerate(tries):
        try:
            variants = (steps.variants(native, f, overrides or bool(inputs) or i > 0, seen)
                        if name == "model" else [])
            if fresh:  # every input set a first step too
                variants = [(label, v if callable(v) else steps.first_step(native, v)) for label, v in variants]
            opts = RunOptions(check=check_strategy(name, variants), layers=_layers(layers), ids=_set(sites),
                              max_error=max_error, force=force,
                              reference=_reference(model, native, f) if name == "model" else None,
                              keep_models=keep_models, progress=progress, calibrate=calib, lora=lora,
                              input_note=note if not i else dict(note, shapes={k: list(v.shape) for k, v in f.items()},
                                                                 retried="the model failed at batch 2 and runs at batch 1"))
            out, report = run(steps, native, chain, f, opts)
            break
        except DoesNotRun:  # raised by the first run, before any rewrite: the model is untouched
            if i + 1 == len(tries):
                raise
    report.feeds, report.ir = f, loaded.ir
    if result is not None:
        report.plan = _plan_json(result, report)
    return _as_given(model, out), report


def _plan_json(result, report) -> dict:
    """The plan file: the search's summary, per site the spec, cost and measured loss, every
    assignment tried, and the pipeline's own figures for the plan applied."""
    p = report.passes[-1]
    out = result.to_json()
    out["applied"] = {"attention_flops": [p.attention_flops_before, p.attention_flops_after],
                      "flops": [p.flops_before, p.flops_after], "fidelity": p.fidelity,
                      "rewritten": p.sites_rewritten}
    return out


def _set(xs):
    return set(xs) if xs is not None else None


def _layers(layers):
    from attn_opt.core.passbase import Layers

    return Layers.of(layers) if layers is not None else None  # intervals: never expanded


def _fidelity_inputs(specs, feeds, inputs, overrides, example_inputs, loaded, run_check) -> tuple[dict, dict]:
    """The fidelity inputs and a note of where they came from; a run at their shapes is
    checked against the memory limit (`run_check`) before they are read or generated."""
    from attn_opt.core.inputs import checked_feeds, feeds_from_npz, make_inputs, resolve_shapes

    if feeds is not None:
        f = checked_feeds(specs, feeds, "feeds")
        return f, {"source": "given", "shapes": {k: list(v.shape) for k, v in f.items()}}
    if inputs is not None:
        f = feeds_from_npz(specs, inputs, "--inputs", run_check)
        return f, {"source": inputs, "shapes": {k: list(v.shape) for k, v in f.items()}}
    if example_inputs is not None and loaded.ir == "fx":
        from attn_opt.pipeline.fx_steps import feeds_of

        f = feeds_of(loaded.native, example_inputs)
        return f, {"source": "example inputs", "shapes": {k: list(v.shape) for k, v in f.items()}}
    if run_check is not None:
        run_check(resolve_shapes(specs, overrides))
    f = make_inputs(specs, overrides, seed=0, pad=False)
    return f, {"source": "generated (seed 0; ids in the embedding range, masks of ones, floats N(0,1))",
               "shapes": {k: list(v.shape) for k, v in f.items()},
               "defaults": "dynamic dims: batch 2, others 16 unless --input-shape"}


def _calibration_inputs(specs, calibrate, run_check) -> dict | None:
    from attn_opt.core.inputs import checked_feeds, feeds_from_npz

    if calibrate is None:
        return None
    if isinstance(calibrate, (str, os.PathLike)):
        return feeds_from_npz(specs, str(calibrate), "--calibrate", run_check)
    return checked_feeds(specs, calibrate, "calibrate")


def _reference(model, native, feeds) -> dict | None:
    """An nn.Module's own outputs, what a torch program's fidelity is measured against
    (only where the check runs the whole model: check=sites and check=none never do)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        return None
    from attn_opt.pipeline.fx_steps import args_of, run_module

    return run_module(model, args_of(native, feeds))


def _as_given(model, out):
    """A ModelProto for a ModelProto; the rewritten model otherwise."""
    if type(model).__name__ == "ModelProto":
        return out.to_proto()
    return out


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def choose_check(check: str | None, weight_bytes: int) -> tuple[str, str | None]:
    """--check as given, or model when the weights fit in memory twice over, else sites."""
    if check:
        return check, None
    avail = available_memory()
    if 2 * weight_bytes <= avail:
        return "model", None
    return "sites", (f"the weights ({weight_bytes / 2**30:.1f} GiB) do not fit twice in available memory "
                     f"({avail / 2**30:.1f} GiB): each rewritten site is checked alone (--check=sites)")


def heal(gm, data: dict, reference, steps: int = 200, lr: float = 1e-2) -> dict:
    """Distil a rewritten GraphModule towards `reference` (the original module) on `data`
    (input name -> array), training only the parameters attn-opt added (calibration's
    per-head affine, sink logits, gates); returns the loss before and after."""
    from attn_opt.pipeline.calibrate import heal as run

    return run(gm, data, reference, steps, lr)


def backend(passes=("fuse",), check: str | bool = "model", inner: str = "inductor"):
    """A torch.compile backend: torch.compile(m, backend=attn_opt.backend(passes=[...])).
    `check`: "model" compares the first call with the untouched graph, "none" does not."""
    from attn_opt.compile import backend as make

    return make(passes, check, inner)


__all__ = ["inspect", "optimize", "heal", "backend", "choose_check", "steps_for", "UserError"]
