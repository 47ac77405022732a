"""How much memory one run of an ONNX model takes at given input shapes, from shapes alone.

Shape inference on the weightless graph with the inputs' dims made concrete gives every
value's size without computing anything; a run holds its inputs and outputs and, at its
peak, about an op's input and output of the largest value (score matrices, in attention
models). A dim inference cannot tell counts as 1, so the estimate is a lower bound: what
it refuses cannot fit. It is refused past the memory limit before ONNX Runtime (or the
generator of the inputs) allocates anything.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from attn_opt.core import limits


def _bytes(t: onnx.TypeProto) -> tuple[int, tuple[int, ...]] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim  # a dim inference could not tell counts as 1: a lower bound
    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):  # strings, float8s numpy lacks: sized as one byte each
        item = 1
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims)
    return limits.nbytes((1 if d is None else d for d in shape), item), shape


def run_bytes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[int, str | None, tuple]:
    """(estimated bytes of one run, the largest value's name, its shape) with the graph's
    inputs at `shapes`; values of unknown rank are left out."""
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    g = work.graph
    del g.value_info[:]  # the model's own symbolic shapes would win over the concrete ones
    for i in g.input:
        if i.name in shapes and i.type.HasField("tensor_type"):
            shp = i.type.tensor_type.shape
            del shp.dim[:]
            for d in shapes[i.name]:
                shp.dim.add().dim_value = int(d)
    for o in g.output:  # outputs' declared dims may be symbolic: inferred instead
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    try:
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception:  # inference gives up on some models: only the inputs are counted
        pass
    ins = sum((_bytes(i.type) or (0, ()))[0] for i in work.graph.input if i.name in shapes)
    outs = sum((_bytes(o.type) or (0, ()))[0] for o in work.graph.output)
    largest, name, shape = 0, None, ()
    for v in list(work.graph.value_info) + list(work.graph.output):
        got = _bytes(v.type)
        if got and got[0] > largest:
            (largest, shape), name = got, v.name
    return ins + outs + 2 * largest, name, shape


def check_run(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], hint: str = "give smaller inputs") -> None:
    """Refuse a run at `shapes` that would not fit the memory limit."""
    need, name, shape = run_bytes(proto, shapes)
    at = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in list(shapes.items())[:4])
    biggest = f" (its largest value, {name}, is {'x'.join('?' if d is None else str(d) for d in shape)})" if name else ""
    limits.refuse_past(f"running the model at {at}{biggest}", need, hint)
