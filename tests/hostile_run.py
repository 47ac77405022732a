"""Running the command line as a hostile-input test needs it: in a child process under an
address-space limit (so a blow-up fails instead of taking the machine) and a CPU-time
limit (so a runaway ends), with the child's own peak RSS read from os.wait4, and the
one-line-error contract checked."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

AS_LIMIT = 2 << 30  # address space the child may map: room for ORT, far below what a blow-up takes
CPU_LIMIT = 300  # seconds of CPU a child may use


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the child's own ru_maxrss


def run_limited(*args, as_limit: int = AS_LIMIT, cwd=None, module: str = "attn_opt") -> Run:
    """`python -m MODULE ARGS` (the command line by default) under the limits."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT))

    cmd = [sys.executable, "-m", module, *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=limit, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0), err.seek(0)
        return Run(p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   usage.ru_maxrss * 1024)


def one_line_error(r: Run) -> str:
    """The error line of a refused run: exit 2, one line on stderr, no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.rc == 2, (r.rc, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return lines[0]
