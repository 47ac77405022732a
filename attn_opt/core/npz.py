"""Reading `.npz` input files without trusting them.

Every member's `.npy` header is read first (numpy.lib.format): its dtype, rank and shape
are checked against the model's signature and the memory limit, and against the size the
archive itself declares for the member, before any array data is read. Pickled arrays,
object and complex dtypes, duplicate or nested member names are refused in one line.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy

from attn_opt.core import limits
from attn_opt.core.errors import UserError, first_line

MAX_HEADER = 10_000  # numpy's own default bound on a header's length
MAX_MEMBERS = 4096  # a model has a handful of inputs; an archive of millions of names is not one


@dataclass(frozen=True)
class Header:
    name: str  # the array's key (the member name without .npy)
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def _read_header(fp, name: str, file_size: int, what: str) -> Header:
    """The .npy header at `fp`, checked: a plain numeric dtype, a shape, and no more data
    promised than the `file_size` bytes the array's file (or archive member) holds."""
    try:
        version = npy.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(fp, max_header_size=MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(fp, max_header_size=MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy format version {version}")
        start = fp.tell()
    except Exception as e:  # a bad magic string, a header that is not a dict literal, a bad CRC, ...
        raise UserError(f"{what}: {name} is not a readable .npy array ({first_line(e)[:200]})") from None
    if dtype.hasobject:
        raise UserError(f"{what}: {name} holds Python objects (pickled); give plain numeric arrays")
    if dtype.kind not in "biuf":
        raise UserError(f"{what}: {name} has dtype {dtype}; inputs are boolean, integer or float arrays")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise UserError(f"{what}: {name} declares a bad shape {shape}")
    size = limits.nbytes(shape, dtype.itemsize)
    if start + size > file_size:  # the header promises more data than the file holds
        raise UserError(f"{what}: {name} declares a {'x'.join(map(str, shape)) or 'scalar'} {dtype} array "
                        f"({limits.size_text(size)}) but the file holds {limits.size_text(file_size)} for it")
    return Header(name, tuple(shape), dtype, size)


def _header(z: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> Header:
    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    try:
        with z.open(info) as fp:
            h = _read_header(fp, f"member {name!r}", info.file_size, what)
    except UserError:
        raise
    except Exception as e:  # a bad CRC, a damaged local header, ...
        raise UserError(f"{what}: member {name!r} is not a readable .npy array ({first_line(e)[:200]})") from None
    return Header(name, h.shape, h.dtype, h.nbytes)


def load_npy(path: str, what: str) -> np.ndarray:
    """One .npy file's array, its header checked first and its size against the memory limit."""
    import os

    try:
        with open(path, "rb") as fp:
            h = _read_header(fp, "the file", os.fstat(fp.fileno()).st_size, what)
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or first_line(e)}") from None
    limits.refuse_past(f"{what} ({'x'.join(map(str, h.shape))} {h.dtype})", 2 * h.nbytes, "give a smaller array")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"cannot read {what}: {first_line(e)[:200]}") from None


def headers(path: str, what: str) -> list[Header]:
    """The headers of every member of the archive at `path`, checked as above."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read {what}: not a .npz archive (write it with numpy.savez)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_MEMBERS:
                raise UserError(f"{what}: {len(infos)} members; an input file has one array per model input")
            names = [i.filename for i in infos]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise UserError(f"{what}: member {dup[0]!r} appears more than once")
            bad = [n for n in names if not n.endswith(".npy") or "/" in n or "\\" in n]
            if bad:
                raise UserError(f"{what}: member {bad[0]!r} is not an array written by numpy.savez")
            return [_header(z, i, what) for i in infos]
    except UserError:
        raise
    except Exception as e:  # a damaged central directory, ...
        raise UserError(f"cannot read {what}: {first_line(e)[:200]}") from None


def load(path: str, what: str, names=None) -> dict[str, np.ndarray]:
    """The archive's arrays (only `names`, when given), after their headers were checked and
    their total size fits the memory limit (twice: an array and its checked copy)."""
    hs = headers(path, what)
    want = [h for h in hs if names is None or h.name in names]
    limits.refuse_past(f"{what} ({', '.join(f'{h.name} ' + 'x'.join(map(str, h.shape)) for h in want[:4])})",
                       2 * sum(h.nbytes for h in want), "give smaller arrays")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {h.name: z[h.name] for h in want}
    except Exception as e:
        raise UserError(f"cannot read {what}: {first_line(e)[:200]}") from None
