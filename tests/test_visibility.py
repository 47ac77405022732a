"""Window visibility is written once per language; each statement is checked here against
the NumPy reference `Pattern.visible` (patterns/form.py): the ONNX graph builder
(backends/onnx/visible.py) run in ONNX Runtime, and torch (backends/torch/forms.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest

from attn_opt.backends.onnx.edit import SiteEdit
from attn_opt.backends.onnx.visible import pattern_visible as onnx_visible
from attn_opt.backends.torch.forms import pattern_visible as torch_visible
from attn_opt.patterns.form import Pattern
from attn_opt.core.ir import onnx as onnx_adapter

PATTERNS = {
    "window": Pattern("window", False, 5, 8),
    "causal-window": Pattern("window", True, 4, 8),
    "dilated": Pattern("window", False, 5, 8, dilation=2),
    "causal-dilated": Pattern("window", True, 3, 8, dilation=3),
    "sinks": Pattern("window", False, 4, 8, sinks=2),
    "causal-sinks": Pattern("window", True, 3, 8, sinks=1),
    "shifted": Pattern("shift", False, 5, 8),
    "strided": Pattern("stride", False, 4, 4),
    "causal-strided": Pattern("stride", True, 6, 3),
}


def _onnx(pattern: Pattern, t: int) -> np.ndarray:
    q = ir.Value(name="q", shape=ir.Shape([1, 1, t, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([q], [], nodes=[], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=9)
    site = SimpleNamespace(id="t", output=SimpleNamespace(dtype="float32"), q=SimpleNamespace(value=q))
    e = SiteEdit(model, site, "test")
    vis = onnx_visible(e, pattern, q, q)
    graph.extend(e.nodes)
    graph.outputs.append(vis)
    vis.name = "vis"
    return onnx_adapter.run(ir.to_proto(model), {"q": np.zeros((1, 1, t, 2), np.float32)})["vis"]


@pytest.mark.parametrize("t", [1, 7, 13])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_each_language_keeps_the_reference_pairs(name, t):
    p = PATTERNS[name]
    want = p.visible(t)
    np.testing.assert_array_equal(_onnx(p, t), want)
    np.testing.assert_array_equal(torch_visible(p, t, t, "cpu").numpy(), want)
