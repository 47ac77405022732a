"""attn-opt as a Microsoft Olive pass (extra `olive`: `pip install -e ".[olive]"`).

Olive runs a workflow of passes, each an `olive.passes.Pass` subclass with a
`_default_config` (its parameters) and `_run_for_config(model, config, output_model_path)`
taking and returning Olive's model handlers. `AttnOpt` is one: its parameters are
attn-opt's pass specs and the command line's options; the input and output are
`ONNXModelHandler`s; the per-pass report (fidelity, FLOPs, what was skipped and why) is
written beside the output model as `attn_opt_report.json`, one of the model's
`additional_files`, which Olive carries through later passes to the workflow's output
folder. Olive finds a pass by its
type through its package config, so a workflow is run with attn-opt's added:

    from attn_opt.olive import run
    run({"input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
         "passes": {"attn": {"type": "AttnOpt", "passes": ["sparse:window=256"]},
                    "quant": {"type": "OnnxDynamicQuantization"}},
         "output_dir": "out"})

(`olive run --config workflow.json --package-config` with `package_config()` written to a
file does the same from the command line.) A fidelity bound exceeded fails the pass, as
it fails the command line, unless `force` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

REPORT = "attn_opt_report.json"


class AttnOpt(Pass):
    """Rewrite the ONNX model's attention with attn-opt's passes, checking fidelity and
    FLOPs after each (attn_opt.optimize)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "passes": PassConfigParam(type_=list, required=True,
                                      description="attn-opt passes in order, as on its command line: "
                                                  "[\"fuse\"], [\"sparse:window=256\", \"gated\"]"),
            "max_error": PassConfigParam(type_=Optional[float], default_value=None,
                                         description="Fail if a pass moves the outputs further (relative error)."),
            "force": PassConfigParam(type_=bool, default_value=False,
                                     description="Keep the model even when a fidelity bound is exceeded."),
            "check": PassConfigParam(type_=Optional[str], default_value=None,
                                     description="model | sites | none (attn-opt's --check)."),
            "input_shape": PassConfigParam(type_=list, default_value=[],
                                           description="Sizes of dynamic dims, [\"input_ids=1x128\"]."),
            "inputs": PassConfigParam(type_=Optional[str], default_value=None,
                                      description="Fidelity inputs as .npz (default: generated)."),
            "layers": PassConfigParam(type_=Optional[str], default_value=None,
                                      description="Only sites in these layers, \"0-3,7\"."),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        from attn_opt import api
        from attn_opt.core import strict_json
        from attn_opt.core.io import atomic_path
        from attn_opt.core.passbase import parse_ranges

        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"AttnOpt takes an ONNX model (put it after OnnxConversion), not {type(model).__name__}")
        out_dir = Path(output_model_path)
        if out_dir.suffix == ".onnx":
            out_dir = out_dir.parent / out_dir.stem
        out_dir.mkdir(parents=True, exist_ok=True)
        src = Path(model.model_path)
        out, report = api.optimize(str(src), list(config.passes), inputs=config.inputs,
                                   input_shape=tuple(config.input_shape), force=config.force,
                                   layers=parse_ranges(config.layers), max_error=config.max_error, check=config.check)
        target = out_dir / src.name
        api.steps_for(report.ir).save(out, str(target), report.feeds)
        with atomic_path(str(out_dir / REPORT)) as tmp:
            Path(tmp).write_text(strict_json.dumps(report.to_json(), indent=2))
        attrs = dict(model.model_attributes or {})  # Olive carries "additional_files" to the workflow's output
        attrs["additional_files"] = sorted(set(attrs.get("additional_files") or []) | {str(out_dir / REPORT)})
        return ONNXModelHandler(model_path=str(out_dir), onnx_file_name=target.name, model_attributes=attrs)


def package_config() -> dict:
    """Olive's own package config with `AttnOpt` added (Olive looks a pass type up there)."""
    from olive.package_config import OlivePackageConfig

    data = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    data["passes"]["AttnOpt"] = {"module_path": "attn_opt.olive.AttnOpt", "supported_providers": ["*"],
                                 "supported_accelerators": ["*"], "supported_precisions": ["*"],
                                 "supported_algorithms": [], "supported_quantization_encodings": []}
    return data


def run(workflow):
    """`olive.workflows.run` with `AttnOpt` known: a workflow dict or a JSON/YAML path."""
    from olive.workflows import run as olive_run

    return olive_run(workflow, package_config=package_config())
