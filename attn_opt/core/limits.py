"""Memory limits, decided from shapes before anything is allocated.

Every size a user controls (`--input-shape`, the arrays an `.npz` header declares, the
values a run computes at those shapes, a LoRA's rank) is turned into bytes from its
shape alone and refused past the limit: the memory the machine has available (psutil,
and a container's cgroup limit where there is one), or `--max-memory` / `max_memory=`
when given. A refusal is a one-line UserError naming what was too large.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass
from pathlib import Path

from attn_opt.core.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def size_text(n: int | float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def parse_size(text: str | int, what: str = "--max-memory") -> int:
    """`8G`, `512MiB`, `1.5GB` or a number of bytes, as bytes (binary units for K/M/G/T)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"bad {what} {text!r}: expected a size such as 8G, 512M or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise UserError(f"bad {what} {text!r}: must be at least 1 byte")
    return n


def _cgroup_room() -> int | None:
    """What a cgroup (v2) memory limit still allows, where the process runs in one."""
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap == "max":
            return None
        return max(0, int(cap) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available() -> int:
    import psutil

    room = int(psutil.virtual_memory().available)
    cg = _cgroup_room()
    return min(room, cg) if cg is not None else room


@dataclass(frozen=True)
class Limit:
    bytes: int
    source: str  # said in every refusal: where the figure comes from and how to change it


_given: contextvars.ContextVar[Limit | None] = contextvars.ContextVar("attn_opt_max_memory", default=None)


def current() -> Limit:
    """The limit in force: the one `use()` set, else the memory available now."""
    given = _given.get()
    if given is not None:
        return given
    return Limit(available(), "the memory available now; --max-memory sets another limit")


@contextlib.contextmanager
def use(max_memory: str | int | None):
    """Within the block, sizes are checked against `max_memory` (None: available memory)."""
    token = _given.set(Limit(parse_size(max_memory), f"--max-memory {max_memory}") if max_memory is not None
                       else None)
    try:
        yield
    finally:
        _given.reset(token)


def nbytes(shape, itemsize: int) -> int:
    """Bytes of an array of `shape`, in Python integers (no overflow, nothing allocated)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def refuse_past(what: str, need: int, hint: str = "") -> None:
    """A one-line UserError when `need` bytes exceed the limit in force."""
    lim = current()
    if need > lim.bytes:
        raise UserError(f"{what} needs about {size_text(need)}, more than the memory limit of "
                        f"{size_text(lim.bytes)} ({lim.source})" + (f"; {hint}" if hint else ""))
