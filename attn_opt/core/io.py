"""Atomic output: write next to the destination, then rename over it.

Every output path is checked before any work is done (`check_writable`: not a folder, a
folder we may create files in); an OS error while writing (a full disk, a folder made
read-only meanwhile) is one line naming the path; a file written over keeps its
permissions; staging files and folders are removed on every exit Python sees (errors,
Ctrl-C, SIGTERM through the CLI's handler); a model and its external data are renamed
into place together under a lock on their folder, so concurrent writers never leave one
run's graph next to another run's weights.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from attn_opt.core.errors import UserError


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(dest: str | os.PathLike, what: str = "-o") -> None:
    """Refuse, before anything is computed, an output path that cannot be written: a folder,
    something that is not a regular file, or a folder we may not create files in."""
    dest = Path(dest)
    if str(dest).endswith(os.sep) or dest.is_dir():
        raise UserError(f"cannot write {what} {dest}: it is a folder; give a file name")
    if dest.exists() and not dest.is_file():
        raise UserError(f"cannot write {what} {dest}: it exists and is not a regular file")
    parent = _existing_ancestor(dest.parent)
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {dest}: {parent} is not a folder")
    try:  # the one reliable test (read-only mounts, ACLs, pseudo filesystems): create one there, remove it
        if parent != dest.parent.absolute():  # the folders are created when written
            os.rmdir(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".probe", dir=parent))
        else:
            fd, probe = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {dest}: {_reason(e)} (in {parent})") from None


def check_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse a write of about `need` bytes into a filesystem with less free space."""
    try:
        free = shutil.disk_usage(_existing_ancestor(Path(folder))).free
    except OSError:
        return
    if need > free:
        from attn_opt.core.limits import size_text

        raise UserError(f"cannot write {what}: it needs about {size_text(need)}, the disk has {size_text(free)} free")


def _mode_for(dest: Path) -> int:
    """The mode the output gets: the file's own when it is written over, else the usual one."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def os_errors(dest):
    """An OSError inside the block as a one-line UserError naming `dest`."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(dest) else ""
        msg = "the disk is full" if e.errno == errno.ENOSPC else _reason(e)
        raise UserError(f"cannot write {dest}: {msg}{where}; nothing written") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path in dest's folder; on success it is renamed to `dest`.
    On failure the temporary file is removed and `dest` is left as it was."""
    dest = Path(dest)
    tmp = None
    with os_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
        os.close(fd)
        try:
            os.chmod(tmp, _mode_for(dest))  # mkstemp makes 0600: the usual mode, or the overwritten file's
            yield tmp
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(parent: str | os.PathLike):
    """Yield a temporary folder inside `parent` for staging files that are then renamed
    into place (same filesystem, so the renames are atomic); it is removed afterwards."""
    with os_errors(parent):
        Path(parent).mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".attn-opt-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike):
    """An exclusive lock on `folder` (flock on the folder itself: no lock file left behind)
    for the renames that switch a model and its weights in together."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def switch_in(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged file over its destination, weights before the graph that names
    them, all under one lock on their folder: a concurrent writer's pair goes in wholly
    before or after this one, never interleaved."""
    folder = staged[-1][1].parent
    with os_errors(staged[-1][1]), folder_lock(folder):
        for src, dst in staged:
            os.chmod(src, _mode_for(dst))
            os.replace(src, dst)
