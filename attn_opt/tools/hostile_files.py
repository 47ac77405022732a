"""Files for hostile-input testing (tools/fuzz_hostile.py and the tests): small hand-built
ONNX models (attention whose output is itself the graph output, with its Q, K, V as inputs
or projected from one hidden state), .npy headers that declare what their data is not,
.npz archives with any members, and decompression bombs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
SHAPE = [1, 2, 8, 4]  # B, H, T, D


def _attention(q: str, k: str, v: str, out: str = "y") -> list:
    return [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, "kt"], ["s"]),
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", F, [], [0.5])),
            helper.make_node("Mul", ["s", "c"], ["ss"]),
            helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", v], [out])]


def output_site(opset: int = 18) -> onnx.ModelProto:
    """Inputs q, k, v [1, 2, 8, 4] -> Transpose(k), MatMul, Mul 0.5, Softmax, MatMul -> graph output y."""
    ins = [helper.make_tensor_value_info(n, F, SHAPE) for n in "qkv"]
    g = helper.make_graph(_attention("q", "k", "v"), "g", ins, [helper.make_tensor_value_info("y", F, SHAPE)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def projected_output_site(opset: int = 18, hidden: int = 16) -> onnx.ModelProto:
    """The same attention with Q, K, V projected from a hidden state x [1, 8, hidden] (so
    gated and mlpfree have projections to read); y is still the graph output. hidden=64
    makes each weight 2 KiB: large enough to stay in an external data file."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, 8)) * 0.3).astype(np.float32), f"W{c}")
             for c in "qkv"]
    inits.append(numpy_helper.from_array(np.array([1, 8, 2, 4], np.int64), "shp"))
    nodes = []
    for c in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{c}"], [f"{c}p"]),
                  helper.make_node("Reshape", [f"{c}p", "shp"], [f"{c}r"]),
                  helper.make_node("Transpose", [f"{c}r"], [c], perm=[0, 2, 1, 3])]
    g = helper.make_graph(nodes + _attention("q", "k", "v"), "g", [helper.make_tensor_value_info("x", F, [1, 8, hidden])],
                          [helper.make_tensor_value_info("y", F, SHAPE)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


# ---- .npy / .npz files whose headers lie -----------------------------------------------------
def npy_header(shape, dtype) -> bytes:
    """A .npy header (format 1.0) declaring `shape` and `dtype`, whatever data follows."""
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                     "shape": tuple(shape)})
    return buf.getvalue()


def write_npz(path, members: dict[str, bytes]) -> None:
    """An archive with these raw members (names as given), stored."""
    import zipfile
    import warnings

    with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are what some tests want
        for name, raw in members.items() if isinstance(members, dict) else members:
            z.writestr(name, raw)


def deflated_zeros(path, shapes: dict[str, tuple[int, ...]], dtype="<i8") -> None:
    """An honest-looking archive: each member a header and that many zero bytes, deflated
    (a few MB on disk for GBs of array): a decompression bomb."""
    import zipfile

    chunk = b"\0" * (16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, shape in shapes.items():
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                f.write(npy_header(shape, dtype))
                for start in range(0, size, len(chunk)):
                    f.write(chunk[:min(len(chunk), size - start)])
