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

A graph that changes a tensor in place (`x.mul_(2)`, `x[i] = v`, `out=`, `inplace=True`)
passes through untouched, with the node named in the log: a rewrite re-emits a site's
nodes after the site's last node, which could move a read across the write. The check
runs the untouched graph on clones of the inputs with the random-number state restored
afterwards, so it never repeats an effect the user's call already had.
"""

from __future__ import annotations

import logging
import operator

import torch

log = logging.getLogger("attn_opt")

# operator.i* on tensors updates the left operand in place (Dynamo records `x += y` so)
_INPLACE_OPERATORS = {getattr(operator, n) for n in (
    "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior", "ipow", "irshift", "isub",
    "itruediv", "ixor", "setitem", "delitem")}


def _name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def mutation(gm: torch.fx.GraphModule) -> str | None:
    """Why `gm` changes a tensor in place (the first node that does), or None."""
    for n in gm.graph.nodes:
        why = None
        if n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_"):
            why = f"Tensor.{n.target}"  # the in-place method convention (mul_, copy_, index_put_, ...)
        elif n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if n.target in _INPLACE_OPERATORS:
                why = f"operator.{_name(n.target)}"
            elif schema is not None and schema.is_mutable:
                why = str(n.target)
            elif _name(n.target).endswith("_") and not _name(n.target).startswith("_"):
                why = _name(n.target)
        elif n.op == "call_module":
            if getattr(gm.get_submodule(n.target), "inplace", False):
                why = f"{n.target} (inplace=True)"
        if why is None and n.op in ("call_function", "call_method", "call_module"):
            if n.kwargs.get("inplace") is True or n.kwargs.get("out") is not None:
                why = f"{_name(n.target)} ({'inplace=True' if n.kwargs.get('inplace') is True else 'out='})"
        if why:
            return f"node {n.name} ({why}) changes a tensor in place"
    return None


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
        effect = mutation(gm)
        if effect:
            log.warning("attn_opt: passes not applied to this graph (%s); using it untouched", effect)
        else:
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


def _clone(x):
    # parameters are not copied: a graph that reaches the check writes no tensor (`mutation`)
    return x.detach().clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) else x


def _checked(original, run):
    """On the first call, compare with the untouched graph and log fidelity and FLOPs."""
    state = {"done": False}

    def wrapper(*args):
        if state["done"]:
            return run(*args)
        state["done"] = True
        copies = [_clone(a) for a in args]  # taken before the call, which may change its inputs
        out = run(*args)
        from torch.utils.flop_counter import FlopCounterMode

        from attn_opt.core import fidelity
        from attn_opt.pipeline.fx_steps import CUSTOM_FLOPS, outputs_of

        devices = sorted({a.device.index for a in copies if isinstance(a, torch.Tensor) and a.is_cuda
                          and a.device.index is not None})
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            ref = outputs_of(original.forward(*copies))  # random draws are undone with the state: no replay
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
