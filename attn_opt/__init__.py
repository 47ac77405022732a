"""attn-opt: find attention in exported models and rewrite it.

    import attn_opt
    report = attn_opt.inspect("model.onnx")          # or a ModelProto, ExportedProgram,
    report = attn_opt.inspect(module, example_inputs=(x,))   # GraphModule, nn.Module
    model, report = attn_opt.optimize("model.onnx", ["sparse:window=16", "gated"])
"""

from __future__ import annotations

from attn_opt.api import backend, heal, inspect, optimize
from attn_opt.core.errors import NotSupported, UserError
from attn_opt.patterns.detect import Detection
from attn_opt.patterns.site import AttentionSite, NearMiss

__all__ = ["inspect", "optimize", "heal", "backend", "Detection", "AttentionSite", "NearMiss", "UserError", "NotSupported"]
__version__ = "0.1.0"
