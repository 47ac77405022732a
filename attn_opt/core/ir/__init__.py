"""One adapter per IR, and `load()` that picks the right one for a model object or path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attn_opt.core.errors import UserError, first_line
from attn_opt.core.graph import GraphView


@dataclass
class Loaded:
    ir: str  # "onnx" or "fx"
    view: GraphView
    native: Any  # the OnnxModel, or the GraphModule that was viewed
    source: str  # what the user gave, for messages
    ir_model: Any = None  # onnx_ir.Model for ONNX
    program: Any = None  # the ExportedProgram, for .pt2 files


def _load_pt2(path: Path) -> Loaded:
    import logging

    import torch

    log = logging.getLogger("torch.export")  # it logs a traceback before raising
    level = log.level
    log.setLevel(logging.CRITICAL)
    from attn_opt.core.ir.pt2_vet import guarded, vet

    vet(path)  # refuses what would run code from the file, before torch reads it
    try:
        with guarded():
            ep = torch.export.load(str(path))
        return _from_program(ep, str(path))  # building the module reads the program too (its guards)
    except UserError:
        raise
    except Exception as e:
        first = first_line(e)
        raise UserError(f"{path} is not a readable torch.export program ({first})") from None
    finally:
        log.setLevel(level)


def _from_program(ep, source: str) -> Loaded:
    from attn_opt.core.ir import fx as fxa

    gm = ep.module()
    return Loaded("fx", fxa.view(gm, _program_examples(ep, gm)), gm, source, program=ep)


def _program_examples(ep, gm) -> tuple | None:
    """The example inputs the program was exported with (a .pt2 file keeps them), where
    they are plain tensors for its positional inputs: sample inputs that read its masks as
    the model's author fed them, rather than generated from the signature; else None."""
    import torch

    ex = getattr(ep, "example_inputs", None)
    if not ex or len(ex) != 2 or ex[1]:
        return None
    args = ex[0]
    n = sum(1 for node in gm.graph.nodes if node.op == "placeholder")
    if len(args) != n or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple(args)


def load(obj: Any, example_inputs: tuple | list | None = None) -> Loaded:
    """A path (.onnx, .pt2), onnx.ModelProto, ExportedProgram, GraphModule or nn.Module."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.exists():
            raise UserError(f"no such file: {path}")
        if path.suffix == ".pt2":
            return _load_pt2(path)
        from attn_opt.core.ir import onnx as onnx_adapter

        proto, model, gv = onnx_adapter.load_view(path)
        return Loaded("onnx", gv, proto, str(path), ir_model=model)
    kind = type(obj).__module__ + "." + type(obj).__name__
    if (kind.startswith("onnx") and type(obj).__name__ == "ModelProto") or type(obj).__name__ == "OnnxModel":
        from attn_opt.core.ir import onnx as onnx_adapter

        proto, model, gv = onnx_adapter.load_view(obj)
        return Loaded("onnx", gv, proto, f"<{type(obj).__name__}>", ir_model=model)
    import torch
    from torch import fx

    from attn_opt.core.ir import fx as fxa

    if isinstance(obj, torch.export.ExportedProgram):
        return _from_program(obj, "<ExportedProgram>")
    if isinstance(obj, fx.GraphModule):
        gm = obj
        if example_inputs is not None and not any("val" in n.meta or "tensor_meta" in n.meta
                                                  for n in gm.graph.nodes if n.op == "placeholder"):
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(gm).propagate(*example_inputs)
        return Loaded("fx", fxa.view(gm, example_inputs), gm, "<GraphModule>")
    if isinstance(obj, torch.nn.Module):
        if example_inputs is None:
            raise UserError("an nn.Module needs example inputs: inspect(module, example_inputs=(x,))")
        try:
            ep = torch.export.export(obj.eval(), tuple(example_inputs))
        except Exception as e:
            first = first_line(e)
            raise UserError(f"torch.export could not trace the module ({first})") from None
        return _from_program(ep, f"<{type(obj).__name__}>")
    raise UserError(f"cannot inspect a {kind}: give a path, ModelProto, ExportedProgram, GraphModule or nn.Module")
