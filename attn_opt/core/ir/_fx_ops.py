"""The spelling table of the torch.fx adapter: every function, aten overload and method
name that means one view op. Dynamo graphs use torch functions and methods, torch.export
graphs aten overloads, symbolic_trace both; rules are written once against the op names."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _t(*targets):
    return [t for t in targets if t is not None]


def _aten(name: str, *overloads: str):
    packet = getattr(aten, name, None)
    if packet is None:
        return []
    return [getattr(packet, o) for o in overloads if hasattr(packet, o)] + [packet]


# op name -> the call targets (functions, aten overloads) and method names that spell it
SPELLINGS: dict[str, list[Any]] = {
    "MatMul": _t(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
    + _aten("matmul", "default") + _aten("bmm", "default"),
    "Softmax": _t(F.softmax, torch.softmax, "softmax") + _aten("softmax", "int") + _aten("_softmax", "default"),
    "Mul": _t(operator.mul, torch.mul, "mul", "mul_") + _aten("mul", "Tensor", "Scalar"),
    "Div": _t(operator.truediv, torch.div, torch.true_divide, "div", "div_", "true_divide")
    + _aten("div", "Tensor", "Scalar"),
    "Sub": _t(operator.sub, torch.sub, "sub") + _aten("sub", "Tensor", "Scalar"),
    "Add": _t(operator.add, torch.add, "add", "add_", operator.iadd) + _aten("add", "Tensor", "Scalar"),
    "Where": _t(torch.where) + _aten("where", "self", "ScalarOther", "ScalarSelf", "Scalar"),
    "MaskedFill": _t("masked_fill", "masked_fill_", torch.masked_fill) + _aten("masked_fill", "Scalar", "Tensor"),
    "Transpose": _t(torch.transpose, "transpose") + _aten("transpose", "int"),
    "Permute": _t(torch.permute, "permute") + _aten("permute", "default"),
    "Reshape": _t(torch.reshape, "reshape", "view") + _aten("view", "default") + _aten("reshape", "default")
    + _aten("_unsafe_view", "default"),
    "Expand": _t("expand") + _aten("expand", "default"),
    "Unsqueeze": _t(torch.unsqueeze, "unsqueeze") + _aten("unsqueeze", "default"),
    "Contiguous": _t("contiguous", "clone", torch.clone) + _aten("clone", "default") + _aten("contiguous", "default")
    + _aten("alias", "default"),
    "Cast": _t("to", "float", "type_as", "half", "bfloat16", "type") + _aten("to", "dtype", "dtype_layout")
    + _aten("_to_copy", "default") + _aten("type_as", "default"),
    "Dropout": _t(F.dropout, torch.dropout, "dropout") + _aten("dropout", "default"),
    "Einsum": _t(torch.einsum) + _aten("einsum", "default"),
    "SDPA": _t(F.scaled_dot_product_attention) + _aten("scaled_dot_product_attention", "default"),
    "SDPAImpl": _aten("_scaled_dot_product_flash_attention_for_cpu", "default")
    + _aten("_scaled_dot_product_efficient_attention", "default")
    + _aten("_scaled_dot_product_flash_attention", "default"),
    "TorchMHA": _t(F.multi_head_attention_forward),
    # inference fast paths of nn.MultiheadAttention / nn.TransformerEncoderLayer (no_grad)
    "TorchFastMHA": _t(getattr(torch, "_native_multi_head_attention", None))
    + _aten("_native_multi_head_attention", "default"),
    "TorchEncoderLayer": _t(getattr(torch, "_transformer_encoder_layer_fwd", None))
    + _aten("_transformer_encoder_layer_fwd", "default"),
    "Linear": _t(F.linear) + _aten("linear", "default"),
    "RepeatInterleave": _t(torch.repeat_interleave, "repeat_interleave") + _aten("repeat_interleave", "self_int"),
    "IsNaN": _t(torch.isnan, "isnan") + _aten("isnan", "default"),
    "Tanh": _t(torch.tanh, "tanh") + _aten("tanh", "default"),
    "Gelu": _t(F.gelu, "gelu") + _aten("gelu", "default"),
    "Relu": _t(F.relu, torch.relu, "relu") + _aten("relu", "default"),
    "Silu": _t(F.silu, "silu") + _aten("silu", "default"),
    "Sigmoid": _t(torch.sigmoid, F.sigmoid, "sigmoid") + _aten("sigmoid", "default"),
    "Neg": _t(operator.neg, torch.neg, "neg") + _aten("neg", "default"),
    "Concat": _t(torch.cat, torch.concat) + _aten("cat", "default"),
    "Getitem": _t(operator.getitem),
    "Assert": _aten("_assert_tensor_metadata", "default") + _aten("_assert_async", "default", "msg")
    + _aten("_assert_scalar", "default"),
    # ops that read only shapes: a mask built from them does not depend on input data
    "ConstantOfShape": _t(torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like,
                          "new_ones", "new_zeros", "new_full", "new_empty")
    + _aten("ones_like", "default") + _aten("zeros_like", "default") + _aten("full_like", "default")
    + _aten("empty_like", "default") + _aten("new_ones", "default") + _aten("new_zeros", "default"),
    "Shape": _t("size", "dim") + _aten("sym_size", "int") + _aten("size", "int"),
    "Gemm": _t(torch.addmm) + _aten("addmm", "default"),
    "Baddbmm": _t(torch.baddbmm, "baddbmm") + _aten("baddbmm", "default"),
    "Slice": _t("narrow", "select") + _aten("slice", "Tensor") + _aten("select", "int") + _aten("narrow", "default"),
    "Split": _t(torch.split, torch.chunk, torch.unbind, "split", "chunk", "unbind", "unflatten")
    + _aten("split", "Tensor") + _aten("split_with_sizes", "default") + _aten("chunk", "default")
    + _aten("unbind", "int") + _aten("unflatten", "int"),
    "Squeeze": _t(torch.squeeze, "squeeze") + _aten("squeeze", "dim", "dims", "default"),
    # S − max(S) written out (gpt-oss): amax, or max(dim) whose values are taken by getitem 0
    "ReduceMax": _t(torch.amax, "amax") + _aten("amax", "default"),
    "MaxDim": _t(torch.max, "max") + _aten("max", "dim"),  # a (values, indices) pair where a dim is given
    "Getattr": _t(getattr),
}
_BY_TARGET: dict[Any, str] = {}
for _op, _targets in SPELLINGS.items():
    for _t_ in _targets:
        _BY_TARGET[_t_] = _op
