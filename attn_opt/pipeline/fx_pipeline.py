"""torch.fx entry points of the one pipeline (pipeline/run.py with FxSteps)."""

from __future__ import annotations

import copy

from torch import fx

from attn_opt.patterns.detect import detect
from attn_opt.core.ir import fx as fx_adapter
from attn_opt.pipeline.fx_steps import FxSteps, placeholders, run_module
from attn_opt.pipeline.run import State, rewrite, run_passes


def apply_fx(gm: fx.GraphModule, p, example_inputs, notes: list | None = None):
    """One pass on a copy of `gm`, without checks (the torch.compile backend's path):
    (new GraphModule, rewritten ids, skipped [{id, reason}])."""
    gm = copy.deepcopy(gm)
    gv = fx_adapter.view(gm, example_inputs)
    state = State(gm, gv, detect(gv), None, None, 0)
    applied = rewrite(FxSteps(), state, p)
    gm.graph.lint()
    if notes is not None:
        notes += applied.notes
    return gm, applied.rewritten, applied.skipped


def feeds_of(gm: fx.GraphModule, example_inputs) -> dict:
    """Example inputs as the pipeline's feeds (placeholder name -> array)."""
    return {p.name: fx_adapter._to_numpy(x) for p, x in zip(placeholders(gm), example_inputs)}


def run_fx_pipeline(gm: fx.GraphModule, passes, example_inputs=None, reference=None, force: bool = False,
                    feeds: dict | None = None, **options):
    """Passes in order on a copy of a GraphModule; returns (new GraphModule, Report).
    `reference`: the untouched nn.Module, run once for fidelity."""
    gm = copy.deepcopy(gm)
    feeds = feeds if feeds is not None else feeds_of(gm, example_inputs)
    ref = None
    if reference is not None:
        from attn_opt.pipeline.fx_steps import args_of

        ref = run_module(reference, args_of(gm, feeds))
    if "variants" not in options:
        from attn_opt.core.inputs import fidelity_variants

        options["variants"] = fidelity_variants(feeds, fx_adapter.input_specs(fx_adapter.view(gm)))
    return run_passes(FxSteps(), gm, list(passes), feeds, force=force, reference=ref, **options)
