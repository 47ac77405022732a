"""How the command line ends: every error one line on stderr with its exit status, nothing
else printed beside it, and every `finally` run on the way out.

    0    done
    2    a user error (a bad file, option or path; too large for memory; an OS refusal)
    3    nothing found: a pass found no attention site (`optimize --allow-empty` writes the copy)
    1    a bug (`internal error: ...`; ATTN_OPT_DEBUG=1 shows the traceback)
    130  Ctrl-C;  128 + N: signal N (SIGTERM, SIGHUP), after staging files are removed
"""

from __future__ import annotations

import logging
import os
import signal
import warnings

import click

from attn_opt.core.errors import NothingFound, UserError


def _error(msg: str) -> None:
    click.echo(msg.replace("\n", " "), err=True)


def _terminated(signum, frame):
    """SIGTERM / SIGHUP end the run like Ctrl-C does: through every `finally`, so staging
    files and folders are removed (only SIGKILL, which Python never sees, leaves them)."""
    raise SystemExit(128 + signum)


def guarded(run, verbose: bool = False) -> int:
    """Call `run()` as the command line does: signals turned into exits that unwind, library
    warnings and log records below ERROR hushed (unless `verbose` (-v) or ATTN_OPT_DEBUG:
    the exporters' "torchvision is not installed" lines go through loggers with handlers of
    their own, so they are disabled by level, not by handler), errors as one line; the
    process's handlers are restored afterwards (the CLI may be called in-process)."""
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            try:
                saved[sig] = signal.signal(sig, _terminated)
            except ValueError:  # not the main thread: leave the process's handlers alone
                pass
    quiet = not (verbose or os.environ.get("ATTN_OPT_DEBUG"))
    root, hush = logging.getLogger(), logging.NullHandler()
    if quiet and not root.handlers:  # libraries' warnings (onnx_ir's "cannot be found in any scope") would
        root.addHandler(hush)        # print through logging's last resort, beside our one line
    disabled = logging.root.manager.disable
    if quiet:
        logging.disable(max(disabled, logging.WARNING))  # errors and critical records still print
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return _one_line(run)
    finally:
        logging.disable(disabled)
        root.removeHandler(hush)
        for sig, old in saved.items():
            signal.signal(sig, old)


def _one_line(run) -> int:
    try:
        run()
    except click.exceptions.Abort:
        _error("aborted")
        return 130
    except click.ClickException as e:
        _error(f"error: {e.format_message()}")
        return 2
    except NothingFound as e:
        _error(f"nothing found: {e}")
        return 3
    except UserError as e:
        _error(f"error: {e}")
        return 2
    except NotImplementedError as e:
        _error(f"not supported: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the system refused a path the user gave (a name too long, a folder not readable, ...)
        name = f"{str(e.filename)[:120]}: " if e.filename else ""
        _error(f"error: {name}{e.strerror or type(e).__name__}")
        return 2
    except MemoryError:  # an allocation no estimate foresaw: still one line, and said plainly
        _error("error: out of memory (an estimate from shapes let this through; --max-memory sets a lower limit)")
        return 2
    except Exception as e:  # a bug: still one line, with a way to see more
        if os.environ.get("ATTN_OPT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _error(f"internal error: {type(e).__name__}: {first} (ATTN_OPT_DEBUG=1 shows the traceback)")
        return 1
    return 0
