"""Sizes a user controls are decided before anything is allocated: every huge-size case
below is refused in one line (exit 2) and the process never grows past 1 GB, measured in
a child under an address-space limit (resource.RLIMIT_AS) with its own peak RSS from
os.wait4. And malicious `.npz` files (headers that lie, pickles, complex or float ids,
NaN, ids outside the table, duplicate or nested members) are refused from their headers
or values, never cast."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from attn_opt.core.errors import UserError
from attn_opt.core.inputs import InputSpec, feeds_from_npz
from attn_opt.tools.hostile_files import deflated_zeros, npy_header, write_npz
from hostile_run import one_line_error, run_limited

GB = 1 << 30
IDS = np.ones((2, 16), np.int64)


@pytest.fixture(scope="module")
def files(tmp_path_factory, zoo_onnx):
    d = tmp_path_factory.mktemp("huge")
    model = zoo_onnx("bert-eager", "dynamo")
    np.savez(d / "small.npz", input_ids=IDS, attention_mask=IDS)
    write_npz(d / "lies.npz", {"input_ids.npy": npy_header((1, 12 * GB // 8), "<i8") + b"\0" * (1 << 20),
                               "attention_mask.npy": npy_header((2, 16), "<i8") + IDS.tobytes()})
    deflated_zeros(d / "bomb.npz", {"input_ids": (1, 1 << 27), "attention_mask": (1, 1 << 27)})  # 2 GiB in ~2 MB
    (d / "huge.npy").write_bytes(npy_header((1, 1 << 33), "<i8") + b"\0" * 1024)
    return d, model


# (id, arguments (d: the files' folder, m: the model, o: an output path), what the one line says)
HUGE = [
    ("layers", lambda d, m, o: [m, "--pass", "fuse", "--layers", "0-99999999999999999999", "-o", o],
     "no attention in layer 2-99999999999999999999"),
    ("input-shape ids", lambda d, m, o: [m, "--pass", "fuse", "--input-shape", "input_ids=1x1000000000", "-o", o],
     "running the model at input_ids 1x1000000000"),
    ("input-shape scores", lambda d, m, o: [m, "--pass", "fuse", "--input-shape", "input_ids=1x100000", "-o", o],
     "x100000x100000)"),
    ("input-shape max-memory", lambda d, m, o: [m, "--pass", "fuse", "--input-shape", "input_ids=2x2048",
                                                "--max-memory", "64M", "-o", o], "(--max-memory 64M)"),
    ("lora", lambda d, m, o: [m, "--pass", "softplus", "--calibrate", d / "small.npz", "--lora", "1000000000",
                              "-o", o], "rank at most"),
    ("npz header lies", lambda d, m, o: [m, "--pass", "fuse", "--inputs", d / "lies.npz", "-o", o],
     "declares a 1x1610612736 int64 array"),
    ("npz deflate bomb", lambda d, m, o: [m, "--pass", "fuse", "--inputs", d / "bomb.npz", "-o", o],
     "running the model at input_ids 1x134217728"),
    ("calibrate bomb", lambda d, m, o: [m, "--pass", "softplus", "--calibrate", d / "bomb.npz", "-o", o],
     "running the model at input_ids 1x134217728"),
    ("inspect bomb", lambda d, m, o: ["inspect", m, "--inputs", d / "bomb.npz"], "give smaller --inputs"),
    ("prompt npy header lies", lambda d, m, o: ["generate", m, "--prompt-ids", d / "huge.npy"],
     "declares a 1x8589934592 int64 array"),
]


@pytest.mark.parametrize("case", HUGE, ids=[c[0] for c in HUGE])
def test_huge_sizes_refused_under_1gb(files, tmp_path, case):
    d, model = files
    _, args, says = case
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    r = run_limited(*args(d, model, tmp_path / "o.onnx"))
    assert says in one_line_error(r)
    assert r.peak_rss < GB, f"peak RSS {r.peak_rss / GB:.2f} GB"
    assert not (tmp_path / "o.onnx").exists()
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


SPECS = [InputSpec("input_ids", "int64", ("batch", "seq"), int_high=99),
         InputSpec("attention_mask", "int64", ("batch", "seq")),
         InputSpec("bias", "float32", ("batch", "seq"))]
OK = {"input_ids": IDS, "attention_mask": IDS, "bias": np.zeros((2, 16), np.float32)}


def _member(a) -> bytes:
    return npy_header(a.shape, a.dtype) + np.ascontiguousarray(a).tobytes()


def _with(**change):
    return {f"{k}.npy": _member(v) for k, v in {**OK, **change}.items()}


def _object_member() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
    return buf.getvalue()


# (id, the archive's members, what the one line says)
MALICIOUS = [
    ("header larger than its data", {**_with(), "input_ids.npy": npy_header((2, 1 << 40), "<i8")},
     "declares a 2x1099511627776 int64 array"),
    ("pickled objects", {**_with(), "input_ids.npy": _object_member()}, "holds Python objects"),
    ("header not a literal", {**_with(), "input_ids.npy": b"\x93NUMPY\x01\x00\x20\x00{'descr': __import__('os')} \n"},
     "not a readable .npy array"),
    ("unknown format version", {**_with(), "input_ids.npy": b"\x93NUMPY\x09\x00" + b"\0" * 16},
     "not a readable .npy array"),
    ("complex values", _with(bias=np.zeros((2, 16), np.complex64)), "has dtype complex64"),
    ("float ids", _with(input_ids=IDS + 0.5), "input_ids is float64, the model takes int64"),
    ("NaN", _with(bias=np.full((2, 16), np.nan, np.float32)), "bias has NaN values"),
    ("float64 past float32", _with(bias=np.full((2, 16), 1e300)), "beyond float32's range"),
    ("negative ids", _with(input_ids=-IDS), "input_ids has value -1, outside 0..98"),
    ("ids past the table", _with(input_ids=IDS * 99), "input_ids has value 99, outside 0..98"),
    ("missing input", {k: v for k, v in _with().items() if k != "bias.npy"}, "lacks ['bias']"),
    ("wrong rank", _with(attention_mask=IDS[0]), "attention_mask has shape 16; the model wants ?x?"),
    ("empty", _with(bias=np.zeros((0, 16), np.float32)), "bias is empty"),
    ("nested member", {**_with(), "../input_ids.npy": _member(IDS)}, "is not an array written by numpy.savez"),
    ("duplicate member", list(_with().items()) + [("input_ids.npy", _member(IDS))], "appears more than once"),
]


@pytest.mark.parametrize("case", MALICIOUS, ids=[c[0] for c in MALICIOUS])
def test_malicious_npz_refused(tmp_path, case):
    _, members, says = case
    path = tmp_path / "x.npz"
    write_npz(path, members)
    with pytest.raises(UserError, match=None) as e:
        feeds_from_npz(SPECS, str(path), "--inputs")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_honest_npz_read_exactly(tmp_path):
    np.savez(tmp_path / "x.npz", **OK)
    got = feeds_from_npz(SPECS, str(tmp_path / "x.npz"), "--inputs")
    assert set(got) == set(OK) and all(np.array_equal(got[k], OK[k]) and got[k].dtype == OK[k].dtype for k in OK)


def test_not_an_archive(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="not a .npz archive"):
        feeds_from_npz(SPECS, str(tmp_path / "x.npz"), "--inputs")
    assert not zipfile.is_zipfile(tmp_path / "x.npz")
