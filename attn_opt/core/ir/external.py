"""Where a tensor's external data may be read from: inside the model's folder, and nowhere
else. Every read of external data (loading, ONNX Runtime's folder, the writers that copy
weights file to file) goes through `data_path`, so a hostile location is one line, exit 2,
whichever library would have opened it. The rules are onnx's and onnx_ir's own (string
containment, then symlinks resolved, then hard links), checked here first so that their
errors never surface as internal ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from attn_opt.core.errors import UserError


def _inside(path: str, folder: str) -> bool:
    folder = folder.rstrip(os.sep) + os.sep
    return path.startswith(folder)


def data_path(folder: str | os.PathLike, location: str, tensor: str = "", own: str | None = None,
              links: bool = True) -> Path:
    """The file `location` names, checked: relative, inside `folder` before and after
    symlinks are resolved, a regular file with one hard link. `own`: the model file's name,
    whose inline weights a large model references in place (the file the user named).
    links=False: the location only (the writers, re-reading what loading checked in full)."""
    what = f"tensor {tensor!r}: external data location {location!r}" if tensor else f"external data location {location!r}"
    if not location or "\0" in location:
        raise UserError(f"{what} is empty or not a file name")
    if os.path.isabs(location) or os.path.splitdrive(location)[0]:
        raise UserError(f"{what} is an absolute path; external data must be a file in the model's folder")
    base = os.path.normpath(os.path.abspath(os.fspath(folder)))
    path = os.path.normpath(os.path.join(base, location))
    if not _inside(path, base):
        raise UserError(f"{what} leaves the model's folder ({base})")
    if not links or (own is not None and location == own):
        return Path(path)
    real = os.path.realpath(path)
    if not _inside(real, os.path.realpath(base)):
        raise UserError(f"{what} is a symbolic link out of the model's folder (to {real})")
    try:
        st = os.stat(real)
    except OSError:
        raise UserError(f"the model's external data file {location!r} is missing next to it (looked in {base})") from None
    if not os.path.isfile(real):
        raise UserError(f"{what} is not a regular file")
    if st.st_nlink > 1:  # a hard link may be a file from anywhere on the filesystem
        raise UserError(f"{what} has {st.st_nlink} hard links; external data must be a file of its own "
                        "(copy it instead of linking)")
    return Path(path)


def check_range(path: Path, offset: int | None, length: int | None, need: int | None, tensor: str) -> None:
    """The tensor's bytes lie inside its file, and are as many as its type and shape need."""
    size = path.stat().st_size
    offset = offset or 0
    if offset > size:
        raise UserError(f"tensor {tensor!r}: external data offset {offset} is past the end of {path.name} "
                        f"({size} bytes)")
    if length is not None and offset + length > size:
        raise UserError(f"tensor {tensor!r}: external data {offset}+{length} runs past the end of {path.name} "
                        f"({size} bytes)")
    have = length if length is not None else size - offset
    if need is not None and have < need:
        raise UserError(f"tensor {tensor!r}: its type and shape need {need} bytes of external data, "
                        f"{path.name} holds {have} for it")
    if need is not None and length is not None and length != need:
        raise UserError(f"tensor {tensor!r}: external data length {length}, its type and shape need {need} bytes")
