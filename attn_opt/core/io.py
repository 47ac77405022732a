"""Atomic output: write next to the destination, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path in dest's folder; on success it is renamed to `dest`.
    On failure the temporary file is removed and `dest` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output should get the usual mode
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(parent: str | os.PathLike):
    """Yield a temporary folder inside `parent` for staging files that are then renamed
    into place (same filesystem, so the renames are atomic); it is removed afterwards."""
    import shutil

    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".attn-opt-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


