"""torch.fx adapter: view GraphModules from symbolic_trace, torch.export and Dynamo in
the neutral vocabulary, and run them to probe intermediate values.

The three front ends spell the same op differently (Dynamo: `torch.matmul`, method
calls and `F.softmax`; torch.export: `aten.matmul.default`, `aten.softmax.int`;
symbolic_trace: the same as Dynamo plus `call_module` leaves), so one table maps every
spelling to one op name, with an argument-normaliser for the ops whose signatures differ.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import fx

from attn_opt.core.graph import EPILOGUE_TAG, FORM_KEY, PASS_TAG, SITE_TAG, GraphView, Node, Value, link
from attn_opt.core.inputs import InputSpec, make_inputs

from attn_opt.core.ir._fx_ops import _BY_TARGET, _aten  # the spelling table


FX_META = (FORM_KEY, SITE_TAG, PASS_TAG, EPILOGUE_TAG)  # what attn-opt leaves on nodes it emits


def op_of(n: fx.Node, modules: dict[str, torch.nn.Module]) -> str:
    if FORM_KEY in n.meta:  # a site attn-opt rewrote: one call carrying its record
        return "attn_opt.Attention"
    if n.op == "call_module":
        mod = modules.get(str(n.target))
        if isinstance(mod, torch.nn.MultiheadAttention):
            return "TorchMHA"
        if isinstance(mod, torch.nn.Linear):
            return "Linear"
        if isinstance(mod, torch.nn.Softmax):
            return "Softmax"
        if isinstance(mod, torch.nn.Dropout):
            return "Dropout"
        return f"module:{type(mod).__name__}"
    if n.op in ("call_function", "call_method"):
        try:
            return _BY_TARGET.get(n.target, str(getattr(n.target, "__name__", n.target)))
        except TypeError:
            return str(n.target)
    return n.op


def _meta_tensor(n: Any):
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val", n.meta.get("example_value"))
    if isinstance(v, (list, tuple)) and v:
        v = v[0]
    if isinstance(v, torch.Tensor):
        return v
    tm = n.meta.get("tensor_meta")
    return tm if tm is not None and hasattr(tm, "shape") else None


def _shape(t) -> tuple | None:
    if t is None:
        return None
    return tuple(int(d) if isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) else str(d)
                 for d in t.shape)


def _dtype(t) -> str | None:
    if t is None:
        return None
    return str(t.dtype).replace("torch.", "")


_DYNAMO_PATH = re.compile(r"\[(\d+)\]")


def scope_of(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", str(path))
    return _DYNAMO_PATH.sub(r".\1", path).strip(".")


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _rank(x) -> int:
    t = _meta_tensor(x)
    return len(t.shape) if t is not None else 4


def _normalise(op: str, n: fx.Node, modules) -> tuple[str, list, dict]:
    """(op, inputs (fx nodes or literals), attrs) for one fx node."""
    a = n.args
    if op == "Softmax":
        return op, [a[0]], {"axis": _arg(n, 1, "dim", -1)}
    if op in ("Mul", "Div", "Add", "Sub", "MatMul"):
        if op == "Div" and n.kwargs.get("rounding_mode"):
            return "DivRounded", [a[0], a[1]], {}
        return op, [a[0], _arg(n, 1, "other")], {}
    if op == "Where":
        return op, [a[0], a[1], a[2]], {}
    if op == "Concat" and isinstance(a[0], (list, tuple)):  # cat(tensors, dim)
        return op, list(a[0]), {"axis": _arg(n, 1, "dim", 0)}
    if op == "MaskedFill":  # masked_fill(x, mask, value) == where(mask, value, x)
        return "Where", [a[1], a[2], a[0]], {}
    if op == "Transpose":
        r = _rank(a[0])
        perm = list(range(r))
        d0, d1 = _dim(a[1], r), _dim(a[2], r)
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return op, [a[0]], {"perm": perm}
    if op == "Permute":
        dims = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
        r = len(dims)
        return "Transpose", [a[0]], {"perm": [_dim(d, r) for d in dims]}
    if op == "Unsqueeze":
        return op, [a[0]], {"axes": [_arg(n, 1, "dim")]}
    if op in ("Reshape", "Expand", "Contiguous", "Cast", "Dropout", "IsNaN", "Tanh", "Neg", "Gelu", "Relu", "Silu",
              "Sigmoid"):
        return op, [a[0]], {}
    if op == "Einsum":
        ops = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
        return op, list(ops), {"equation": a[0]}
    if op == "SDPA":
        return op, [a[0], a[1], a[2], _arg(n, 3, "attn_mask")], {
            "is_causal": bool(_arg(n, 5, "is_causal", False)), "scale": _arg(n, 6, "scale"),
            "enable_gqa": bool(n.kwargs.get("enable_gqa", False))}
    if op == "TorchMHA":
        if n.op == "call_module":
            mod = modules[str(n.target)]
            return op, [a[0], _arg(n, 1, "key"), _arg(n, 2, "value"), _arg(n, 5, "attn_mask")], {
                "num_heads": mod.num_heads, "batch_first": mod.batch_first,
                "is_causal": bool(n.kwargs.get("is_causal", False))}
        return op, [a[0], a[1], a[2], _arg(n, 16, "attn_mask")], {  # F.multi_head_attention_forward
            "num_heads": _arg(n, 4, "num_heads"), "batch_first": False,
            "is_causal": bool(n.kwargs.get("is_causal", False))}
    if op == "TorchFastMHA":  # (q, k, v, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, mask, ...)
        return "TorchMHA", [a[0], a[1], a[2], _arg(n, 9, "mask")], {
            "num_heads": a[4], "batch_first": True, "fast_path": True}
    if op == "TorchEncoderLayer":  # (src, embed_dim, num_heads, ..., mask, mask_type)
        return "TorchMHA", [a[0], a[0], a[0], _arg(n, 18, "mask")], {
            "num_heads": a[2], "batch_first": True, "fast_path": True, "whole_layer": True}
    if op == "Gemm":  # addmm(bias, x, W) = x @ W + bias (GPT-2's Conv1D)
        return op, [a[1], a[2], a[0]], {}
    if op == "Linear":
        if n.op == "call_module":
            mod = modules[str(n.target)]
            return op, [a[0], mod.weight, mod.bias], {}
        return op, [a[0], a[1], _arg(n, 2, "bias")], {}
    if op == "RepeatInterleave":
        return op, [a[0]], {"repeats": _arg(n, 1, "repeats"), "dim": _arg(n, 2, "dim")}
    if op == "ReduceMax":  # amax(x, dim, keepdim)
        dims = _arg(n, 1, "dim", [])
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        return op, [a[0]], {"axes": dims, "keepdims": int(bool(_arg(n, 2, "keepdim", False)))}
    if (op in ("Getitem", "Getattr") and isinstance(a[0], fx.Node) and a[1] in (0, "values")
            and op_of(a[0], modules) == "MaxDim" and _arg(a[0], 1, "dim") is not None):
        m = a[0]  # max(x, dim, keepdim).values
        return "ReduceMax", [m.args[0]], {"axes": [_arg(m, 1, "dim")], "keepdims": int(bool(_arg(m, 2, "keepdim", False)))}
    if op == "Slice" and n.target in _aten("slice", "Tensor"):  # slice(x, dim, start, end, step): ONNX's inputs
        dim, start, end, step = (_arg(n, i, k, d) for i, k, d in ((1, "dim", 0), (2, "start", None), (3, "end", None),
                                                                   (4, "step", 1)))
        if all(isinstance(x, int) or x is None for x in (dim, start, end, step)):
            big = 2 ** 63 - 1
            return op, [a[0]] + [torch.tensor([x]) for x in (0 if start is None else start,
                                                            big if end is None else end, dim, step)], {}
    if op == "Getitem" and (sl := _one_slice(a[1])) is not None:  # x[..., :-1]: Slice on one axis
        start, end, axis, step = sl
        return "Slice", [a[0]] + [torch.tensor([x]) for x in (start, end, axis, step)], {}
    if op == "Getitem" and isinstance(a[1], tuple) and a[1].count(None) == 1 \
            and all(i is None or i == slice(None) for i in a[1]) and a[1].index(None) == 2:
        return "Unsqueeze", [a[0]], {"axes": [2]}  # x[:, :, None] in HF's repeat_kv
    inputs = []
    fx.node.map_arg((a, n.kwargs), inputs.append)
    return op, inputs, {}


def _one_slice(index) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of an index that slices one axis with ints and keeps the
    others whole (`[..., :-1]`, `[:, :, :, 1:]`), else None."""
    if not isinstance(index, tuple) or index.count(Ellipsis) > 1:
        return None
    if any(not (i is Ellipsis or isinstance(i, slice)) for i in index):
        return None
    cut = [j for j, i in enumerate(index) if isinstance(i, slice) and i != slice(None)]
    if len(cut) != 1:
        return None
    j, s = cut[0], index[cut[0]]
    if any(not (x is None or isinstance(x, int)) for x in (s.start, s.stop, s.step)):
        return None
    if Ellipsis in index and index.index(Ellipsis) < j:
        axis = j - len(index)  # counted from the end
    else:
        axis = j
    return (s.start or 0, 2 ** 63 - 1 if s.stop is None else s.stop, axis, s.step or 1)


def _to_numpy(t) -> np.ndarray | None:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
    if isinstance(t, (int, float, bool)):
        return np.asarray(t)
    return None


def view(gm: fx.GraphModule, example_inputs: list | tuple | None = None) -> GraphView:
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = dict(zip((p.name for p in placeholders), example_inputs)) if example_inputs is not None else {}
    values: dict[fx.Node, Value] = {}

    def val(n: fx.Node) -> Value:
        if n not in values:
            t = _meta_tensor(n)
            ex = examples.get(n.name)
            if t is None and isinstance(ex, torch.Tensor):
                t = ex
            values[n] = Value(name=n.name, shape=_shape(t), dtype=_dtype(t), native=n,
                              is_input=n.op == "placeholder")
        return values[n]

    nodes: list[Node] = []
    literal_count = 0

    def inp(x) -> Value | None:
        nonlocal literal_count
        if isinstance(x, fx.Node):
            return val(x)
        arr = _to_numpy(x)
        if arr is None:
            return None
        literal_count += 1
        return Value(name=f"literal{literal_count}", shape=arr.shape, dtype=arr.dtype.name, const=arr)

    for n in gm.graph.nodes:
        same = _same_as(n, values)
        if same is not None:  # no-op slices, detach, cat with an empty cache: the value itself
            values[n] = val(same)
            continue
        v = val(n)
        if n.op == "get_attr":
            v.const = _to_numpy(_fetch(gm, str(n.target)))
            continue
        if n.op == "placeholder":
            ex = examples.get(n.name)
            if isinstance(ex, torch.nn.Parameter) or "_parameters_" in n.name or "_buffers_" in n.name:
                v.const = _to_numpy(ex) if ex is not None else None
                v.is_input = v.const is None
            continue
        if n.op == "output":
            fx.node.map_arg(n.args, lambda x: setattr(val(x), "is_output", True))
            continue
        op = op_of(n, modules)
        meta = {k: n.meta[k] for k in FX_META if k in n.meta}
        if op == "Baddbmm":  # beta·input + alpha·(b1 @ b2) (BLOOM's ALiBi scores): MatMul, Mul, Add
            nodes += _baddbmm(n, v, inp, scope_of(n), meta)
            continue
        op, args, attrs = _normalise(op, n, modules)
        nodes.append(Node(name=n.name, op=op, inputs=[inp(x) for x in args], outputs=[v], attrs=attrs,
                          scope=scope_of(n), native=n, meta=meta))
    link(nodes)
    gv = GraphView(nodes=nodes, inputs=[values[p] for p in placeholders if values[p].is_input],
                   outputs=[v for v in values.values() if v.is_output], ir="fx")
    gv.probe_fn = lambda vals, feeds: probe(gm, placeholders, vals, feeds)
    if example_inputs is not None:
        gv.sample_inputs_fn = lambda: {p.name: _to_numpy(x) for p, x in zip(placeholders, example_inputs)
                                       if isinstance(x, torch.Tensor)}
    else:
        gv.sample_inputs_fn = lambda: make_inputs(input_specs(gv), pad=True)
    return gv


def _baddbmm(n: fx.Node, out: Value, inp, scope, meta) -> list[Node]:
    """baddbmm(input, b1, b2, beta=β, alpha=α) as view nodes: MatMul(b1, b2), its scaling
    by α and the input's by β (where not 1), and the Add that gives the native node's value."""
    bias, b1, b2 = n.args[0], _arg(n, 1, "batch1"), _arg(n, 2, "batch2")
    beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
    mm = Value(name=f"{n.name}.mm", dtype=out.dtype)
    made = [Node(name=f"{n.name}.mm", op="MatMul", inputs=[inp(b1), inp(b2)], outputs=[mm], scope=scope, native=n,
                 meta=meta)]
    terms = []
    for name, x, factor in (("scaled", mm, alpha), ("bias", inp(bias), beta)):
        if factor != 1:
            y = Value(name=f"{n.name}.{name}", dtype=out.dtype)
            made.append(Node(name=f"{n.name}.{name}", op="Mul", inputs=[x, inp(factor)], outputs=[y], scope=scope,
                             native=n, meta=meta))
            x = y
        terms.append(x)
    made.append(Node(name=n.name, op="Add", inputs=terms, outputs=[out], scope=scope, native=n, meta=meta))
    return made


_ALIASES = set(_aten("detach", "default") + _aten("detach_", "default") + _aten("lift_fresh_copy", "default")
               + _aten("alias", "default"))


def _same_as(n: fx.Node, values: dict) -> fx.Node | None:
    """The node whose value `n` merely repeats, or None."""
    if n.op != "call_function":
        return None
    if n.target in _ALIASES or _noop_slice(n):
        return n.args[0]
    if n.target in _aten("cat", "default") and isinstance(n.args[0], (list, tuple)):
        rest = [x for x in n.args[0] if not _empty(x, values)]
        return rest[0] if len(rest) == 1 and len(n.args[0]) > 1 else None
    return None


def _empty(x, values: dict) -> bool:
    v = values.get(x) if isinstance(x, fx.Node) else None
    if v is not None and v.const is not None:
        return v.const.size == 0
    t = _meta_tensor(x)
    return t is not None and any(isinstance(d, int) and d == 0 for d in t.shape)


def _noop_slice(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target not in _aten("slice", "Tensor"):
        return False
    args = list(n.args) + [None] * (5 - len(n.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or end >= 2 ** 62)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _embedding_rows(v: Value) -> int | None:
    for u in v.users:
        if u.op in ("embedding", "embedding.default") or "embedding" in u.op:
            w = u.inputs[0]
            if w is not None and w.const is not None and w is not v:
                return int(w.const.shape[0])
    return None


def input_specs(gv: GraphView) -> list[InputSpec]:
    specs = []
    for v in gv.inputs:
        if v.shape is None or v.dtype is None:
            from attn_opt.core.errors import UserError

            raise UserError(f"input {v.name!r} has no recorded shape; pass example inputs")
        high = _embedding_rows(v) if np.dtype(v.dtype).kind in "iu" else None
        specs.append(InputSpec(v.name, v.dtype, v.shape, high))
    return specs


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[n.name] = out[0] if isinstance(out, (tuple, list)) else out
        return out


def probe(gm: fx.GraphModule, placeholders: list[fx.Node], vals: list[Value], feeds) -> dict[str, np.ndarray]:
    rec = _Recorder(gm, {v.name for v in vals})
    args = []
    for p in placeholders:
        if p.name in feeds:
            args.append(torch.from_numpy(np.asarray(feeds[p.name])))
        else:
            raise KeyError(f"no value for graph input {p.name!r}")
    with torch.no_grad():
        rec.run(*args)
    return {k: _to_numpy(t) for k, t in rec.seen.items() if _to_numpy(t) is not None}


def dynamo_graphs(model: torch.nn.Module, args: tuple) -> list[tuple[fx.GraphModule, list]]:
    """The FX graphs Dynamo captures for `model(*args)` (one per graph break)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=False)(*args)
    torch._dynamo.reset()
    return graphs
