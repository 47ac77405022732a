"""attn-opt: find attention in exported models and rewrite it.

    import attn_opt
    report = attn_opt.inspect("model.onnx")          # or a ModelProto, ExportedProgram,
    report = attn_opt.inspect(module, example_inputs=(x,))   # GraphModule, nn.Module
"""

from __future__ import annotations

from typing import Any

from attn_opt.patterns.detect import Detection, detect
from attn_opt.patterns.site import AttentionSite, NearMiss
from attn_opt.core.errors import NotSupported, UserError

__all__ = ["inspect", "optimize", "heal", "backend", "Detection", "AttentionSite", "NearMiss", "UserError", "NotSupported"]
__version__ = "0.1.0"


def inspect(model: Any, example_inputs=None, feeds=None, max_memory: str | int | None = None) -> Detection:
    """Find every attention site in `model`; `near_misses` says why each other softmax is not one.
    `max_memory` (bytes, or "8G"): the limit a run on `feeds` is refused past (default: the
    memory available)."""
    from attn_opt.core import limits
    from attn_opt.core.ir import load

    with limits.use(max_memory):
        loaded = load(model, example_inputs)
        return detect(loaded.view, feeds=feeds)


def optimize(model: Any, passes=("fuse",), example_inputs=None, feeds=None, force: bool = False, layers=None,
             sites=None, max_error: float | None = None, check: str = "model", calibrate=None, lora: int = 0,
             max_memory: str | int | None = None):
    """Run passes through the one pipeline; returns (rewritten model, report).

    ONNX (a path, ModelProto or OnnxModel): a ModelProto for a ModelProto, else an
    OnnxModel (`.save(path)` writes it, with external data where the input had it).
    nn.Module, ExportedProgram or GraphModule: a GraphModule, with fidelity against the
    original module. `feeds` (name -> array) sets the fidelity inputs; otherwise
    `example_inputs`, or inputs generated from the signature. `layers` / `sites` restrict
    the passes, `max_error` bounds the relative error, `check` is "model", "sites"
    (ONNX) or "none", as on the command line. `calibrate` (an .npz path or name -> array):
    inputs to fit each rewritten site's per-head parameters on, as `--calibrate`; `lora`: the
    rank of an output-projection correction fitted with them, as `--lora`. `max_memory` (bytes,
    or "8G"), as `--max-memory`: inputs, runs and fits estimated (from their shapes) to need
    more are refused before anything is allocated; default: the memory available.
    """
    from attn_opt.core import limits

    with limits.use(max_memory):
        return _optimize(model, passes, example_inputs, feeds, force, layers, sites, max_error, check, calibrate,
                         lora)


def _optimize(model, passes, example_inputs, feeds, force, layers, sites, max_error, check, calibrate, lora):
    from attn_opt.core.ir import load
    from attn_opt.core.passbase import Layers
    from attn_opt.pipeline.run import parse_chain, run_pipeline

    chain = parse_chain(passes)
    options = dict(layers=Layers.of(layers) if layers is not None else None, ids=set(sites) if sites is not None else None,
                   max_error=max_error, force=force, check=check)
    if lora:
        options["lora"] = lora
    loaded = load(model, example_inputs)
    if loaded.ir == "onnx":
        from attn_opt.core.inputs import checked_feeds, feeds_from_npz, make_inputs
        from attn_opt.core.ir import onnx as onnx_adapter

        specs = onnx_adapter.input_specs(loaded.view)
        feeds = checked_feeds(specs, feeds, "feeds") if feeds else make_inputs(specs)
        if calibrate is not None:
            options["calibrate"] = feeds_from_npz(specs, calibrate, "calibrate") if isinstance(calibrate, str) \
                else checked_feeds(specs, calibrate, "calibrate")
        import os

        return run_pipeline(loaded.native if isinstance(model, (str, os.PathLike)) else model, chain, feeds, **options)
    import torch

    from attn_opt.pipeline.fx_pipeline import run_fx_pipeline

    if example_inputs is None and feeds is None:
        example_inputs = tuple(torch.from_numpy(v) for v in loaded.view.sample_inputs().values())
    reference = model if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule) else None
    if calibrate is not None:  # the program's own (static) input shapes
        from attn_opt.core.inputs import checked_feeds, read_npz
        from attn_opt.core.ir import fx as fx_adapter

        data = read_npz(calibrate) if isinstance(calibrate, str) else calibrate
        options["calibrate"] = checked_feeds(fx_adapter.input_specs(loaded.view), data, "calibrate")
    return run_fx_pipeline(loaded.native, chain, example_inputs, reference=reference, feeds=feeds, **options)


def heal(gm, data: dict, reference, steps: int = 200, lr: float = 1e-2) -> dict:
    """Distil a rewritten GraphModule towards `reference` (the original module) on `data`
    (input name -> array), training only the parameters attn-opt added (calibration's
    per-head affine, sink logits, gates); returns the loss before and after."""
    from attn_opt.pipeline.calibrate import heal as run

    return run(gm, data, reference, steps, lr)


def backend(passes=("fuse",), check: bool = True, inner: str = "inductor"):
    """A torch.compile backend: torch.compile(m, backend=attn_opt.backend(passes=[...]))."""
    from attn_opt.compile import backend as make

    return make(passes, check, inner)
