"""The `attn_opt` torch.compile backend.

    torch.compile(model, backend="attn_opt")          # registered by the entry point
    torch.compile(model, backend=attn_opt.backend(passes=["fuse"], check="model", inner="eager"))

Each captured graph gets the passes (default: the exact `fuse`) through the one pipeline
(pipeline/run.py, validity checked, the graph not run for fidelity there), then goes to
Inductor (or runs as is with inner="eager"). With check="model" (the default; True is the
same) the first call also runs the untouched graph and logs fidelity and FLOPs; "none"
(False) does not. A graph with no attention passes through
unchanged; a graph the passes cannot handle falls back to the untouched graph, with the
reason logged, rather than failing the compile.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("attn_opt")


def backend(passes=("fuse",), check: str | bool = "model", inner: str = "inductor"):
    """A torch.compile backend running `passes` on every captured graph."""
    if inner not in ("inductor", "eager"):
        raise ValueError("inner must be 'inductor' or 'eager'")
    check = {True: "model", False: "none"}.get(check, check)
    if check not in ("model", "none"):
        raise ValueError("check must be 'model' or 'none' (a compiled graph is checked whole on its first call)")
    from attn_opt.pipeline.run import parse_chain

    chain = parse_chain(passes)

    def compile_fn(gm: torch.fx.GraphModule, example_inputs):
        new = gm
        try:
            new = rewritten_graph(gm, chain, example_inputs)
        except Exception as e:  # never break the user's compile: run the graph untouched
            log.warning("attn_opt: passes not applied to this graph (%s); using it untouched", e)
            new = gm
        run = new.forward
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            run = compile_fx(new, example_inputs)
        if check == "none" or new is gm:
            return run
        return _checked(gm, run)

    return compile_fn


def rewritten_graph(gm: torch.fx.GraphModule, chain, example_inputs) -> torch.fx.GraphModule:
    """The passes on a copy of a captured graph, through the pipeline without a fidelity
    run (the first call is compared instead, with check="model")."""
    import copy

    from attn_opt.pipeline.checks import NoCheck
    from attn_opt.pipeline.fx_steps import FxSteps, feeds_of
    from attn_opt.pipeline.run import RunOptions, run

    new = copy.deepcopy(gm)
    out, report = run(FxSteps(), new, chain, feeds_of(new, example_inputs), RunOptions(check=NoCheck(), force=True))
    for p in report.passes:
        log.info("attn_opt %s: rewrote %s; skipped %s", p.name, p.sites_rewritten, p.sites_skipped)
    return out


def _checked(original, run):
    """On the first call, compare with the untouched graph and log fidelity and FLOPs."""
    state = {"done": False}

    def wrapper(*args):
        out = run(*args)
        if not state["done"]:
            state["done"] = True
            from torch.utils.flop_counter import FlopCounterMode

            from attn_opt.core import fidelity
            from attn_opt.pipeline.fx_steps import CUSTOM_FLOPS, outputs_of

            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
                ref = outputs_of(original.forward(*args))
            flops = counter.get_total_flops()
            got = outputs_of(out)
            worst = fidelity.worst({k: fidelity.compare(ref[k], got[k]) for k in ref})
            log.info("attn_opt check: max rel error %.3g, cosine %.6f (eager graph: %d FLOPs counted)",
                     worst.max_rel_error, worst.cosine, flops)
            wrapper.fidelity = worst
        return out

    wrapper.fidelity = None
    return wrapper


attn_opt_backend = backend()  # what `backend="attn_opt"` resolves to, through the entry point
