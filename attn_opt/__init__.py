"""attn-opt: find attention in exported models and rewrite it.

    import attn_opt
    report = attn_opt.inspect("model.onnx")          # or a ModelProto, ExportedProgram,
    report = attn_opt.inspect(module, example_inputs=(x,))   # GraphModule, nn.Module
"""

from __future__ import annotations

from typing import Any

from attn_opt.patterns.detect import Detection, detect
from attn_opt.patterns.site import AttentionSite, NearMiss
from attn_opt.rewriter.errors import NotSupported, UserError

__all__ = ["inspect", "Detection", "AttentionSite", "NearMiss", "UserError", "NotSupported"]
__version__ = "0.1.0"


def inspect(model: Any, example_inputs=None, feeds=None) -> Detection:
    """Find every attention site in `model`; `near_misses` says why each other softmax is not one."""
    from attn_opt.rewriter.ir import load

    loaded = load(model, example_inputs)
    return detect(loaded.view, feeds=feeds)
