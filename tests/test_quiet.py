"""A quiet first run: third-party warnings and log records are hushed on the command line
(shown with -v), errors still print; `attn-opt --version`."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

from attn_opt.tools.guard import guarded


def _noisy():
    """What torch's exporter does: a logger with a handler of its own, and a warning."""
    log = logging.getLogger("thirdparty.exporter")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.warning("torchvision is not installed. Skipping torchvision::nms")
    warnings.warn("a UserWarning from a library", UserWarning)
    log.error("a real error from the library")


def test_hushed_unless_verbose(capsys):
    assert guarded(_noisy) == 0
    err = capsys.readouterr().err
    assert "torchvision" not in err and "UserWarning" not in err and "a real error" in err
    assert guarded(_noisy, verbose=True) == 0
    err = capsys.readouterr().err
    assert "torchvision is not installed" in err  # (warnings then follow the process's own filters)
    assert logging.root.manager.disable == logging.NOTSET  # restored after the command


def test_readme_first_command_prints_no_third_party_warning(tmp_path):
    out = tmp_path / "bert.onnx"
    r = subprocess.run([sys.executable, "-m", "attn_opt", "zoo", "bert-eager", "-o", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {out} (bert-eager, dynamo exporter)"


def test_version(capsys):
    from importlib.metadata import version

    from attn_opt.tools.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"attn-opt, version {version('attn-opt')}"
