"""Hostile model files and careless output paths: each is one line on stderr, exit 2, with
the input unchanged and nothing written (or the right result).

- external data that leaves the model's folder (`../`, absolute paths, symlinks and hard
  links out of it) or lies about its bytes (offsets and lengths past the end, too few
  bytes, negative offsets), for the rewrite, inspect and diff;
- duplicate value names;
- outputs: -o naming a folder, folders that cannot be written, --report/--html that
  could not be written (checked before the model is), a full disk before and while
  writing, the input named as an output; an overwritten output keeps its permissions;
  SIGTERM while writing leaves no staging; a model and its weights switch in together.
"""

from __future__ import annotations

import copy
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest

from attn_opt.tools.cli import main
from attn_opt.tools.hostile_files import output_site, projected_output_site

UNWRITABLE = Path("/proc") if os.geteuid() == 0 else None  # root writes anywhere a mode allows


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


@pytest.fixture(scope="module")
def hostile_external(tmp_path_factory) -> Path:
    """model folder m/ with good.onnx + good.onnx.data, and one model per hostile location;
    secret (outside m/) is what they try to reach."""
    root = tmp_path_factory.mktemp("ext")
    m = root / "m"
    m.mkdir()
    model = projected_output_site(hidden=64)  # weights of 2 KiB: they stay external when loaded
    onnx.save(model, m / "good.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="good.onnx.data", size_threshold=0)
    (root / "secret").write_bytes((m / "good.onnx.data").read_bytes())
    os.symlink("../secret", m / "link.data")
    os.link(root / "secret", m / "hard.data")
    base = onnx.load(m / "good.onnx", load_external_data=False)
    for name, key, value, _ in EXTERNAL:
        v = copy.deepcopy(base)
        t = next(t for t in v.graph.initializer if t.name == "Wq")
        e = next(e for e in t.external_data if e.key == key)
        e.value = value.replace("SECRET", str(root / "secret"))
        onnx.save(v, m / f"{name}.onnx")
    return m


# (model name, external_data key, its value, what the one line says)
EXTERNAL = [
    ("dotdot", "location", "../secret", "leaves the model's folder"),
    ("absolute", "location", "SECRET", "is an absolute path"),
    ("symlink", "location", "link.data", "is a symbolic link out of the model's folder"),
    ("hardlink", "location", "hard.data", "has 2 hard links"),
    ("missing", "location", "nothere.data", "is missing next to it"),
    ("offset-past-end", "offset", "100000", "offset 100000 is past the end of good.onnx.data"),
    ("length-past-end", "length", "100000", "runs past the end of good.onnx.data"),
    ("too-few-bytes", "length", "16", "its type and shape need 2048 bytes"),
    ("negative-offset", "offset", "-5", "must be non-negative"),
]
SAYS = {name: says for name, _, _, says in EXTERNAL}


@pytest.mark.parametrize("command", ["rewrite", "inspect", "diff"])
@pytest.mark.parametrize("name", list(SAYS))
def test_hostile_external_data(hostile_external, tmp_path, capsys, name, command):
    m = hostile_external
    before = _digest(m) | _digest(m.parent)
    src = m / f"{name}.onnx"
    args = {"rewrite": [str(src), "--pass", "fuse", "-o", str(tmp_path / "o.onnx")],
            "inspect": ["inspect", str(src)],
            "diff": ["diff", str(m / "good.onnx"), str(src), "-o", str(tmp_path / "d.html")]}[command]
    assert SAYS[name] in _one_line(capsys, main(args))
    assert _digest(m) | _digest(m.parent) == before and not list(tmp_path.iterdir())


def test_good_external_data_still_works(hostile_external, tmp_path):
    """The honest model rewrites, its weights copied (through the same checks) to o.onnx.data."""
    assert main([str(hostile_external / "good.onnx"), "--pass", "fuse", "-o", str(tmp_path / "o.onnx")]) == 0
    assert (tmp_path / "o.onnx.data").stat().st_size == 3 * 64 * 8 * 4
    out = onnx.load(tmp_path / "o.onnx")  # loads the weights back from o.onnx.data
    assert {t.name for t in out.graph.initializer} >= {"Wq", "Wk", "Wv"}


def _dups():
    def node_outputs(m):
        m.graph.node[2].output[0] = "s"  # the scale's Constant named like the scores

    def inputs(m):
        m.graph.input.append(copy.deepcopy(m.graph.input[0]))

    def input_and_output(m):
        m.graph.node[0].output[0] = "q"

    return [("node outputs", output_site, node_outputs, "'s' (an output of node"),
            ("graph inputs", output_site, inputs, "'q'"),
            ("input and node output", output_site, input_and_output, "'q' (a graph input and an output of node"),
            ("initializers", projected_output_site,
             lambda m: m.graph.initializer.append(copy.deepcopy(m.graph.initializer[0])), "'Wq' (an initializer")]


@pytest.mark.parametrize("case", _dups(), ids=lambda c: c[0])
def test_duplicate_value_names(tmp_path, capsys, case):
    _, build, edit, says = case
    model = build()
    edit(model)
    onnx.save(model, tmp_path / "m.onnx")
    for args in (["inspect", str(tmp_path / "m.onnx")],
                 [str(tmp_path / "m.onnx"), "--pass", "fuse", "-o", str(tmp_path / "o.onnx")]):
        line = _one_line(capsys, main(args))
        assert says in line or "single static assignment" in line, line
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture
def plain(tmp_path) -> Path:
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save(output_site(), src)
    return src


def _outputs_cases():
    cases = [("-o a folder", lambda d: ["-o", str(d)], "it is a folder"),
             ("-o the input", lambda d: ["-o", str(d.parent / "in" / "m.onnx")], "is the input model"),
             ("--report the input", lambda d: ["-o", str(d / "o.onnx"), "--report", str(d.parent / "in" / "m.onnx")],
              "is also the input model"),
             ("--html = -o", lambda d: ["-o", str(d / "o.onnx"), "--html", str(d / "o.onnx")], "is also -o")]
    if UNWRITABLE is not None:
        cases += [("-o unwritable", lambda d: ["-o", str(UNWRITABLE / "o.onnx")], "cannot write -o"),
                  ("-o under unwritable", lambda d: ["-o", str(UNWRITABLE / "a" / "b" / "o.onnx")], "cannot write -o"),
                  ("--report unwritable", lambda d: ["-o", str(d / "o.onnx"), "--report", str(UNWRITABLE / "r.json")],
                   "cannot write --report"),
                  ("--html unwritable", lambda d: ["-o", str(d / "o.onnx"), "--html", str(UNWRITABLE / "p.html")],
                   "cannot write --html")]
    return cases


@pytest.mark.parametrize("case", _outputs_cases(), ids=lambda c: c[0])
def test_output_paths_checked_first(plain, tmp_path, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    _, args, says = case
    before = _digest(plain.parent)
    assert says in _one_line(capsys, main([str(plain), "--pass", "fuse", *args(out)]))
    assert not list(out.iterdir())  # the model was not written either
    assert _digest(plain.parent) == before


def test_unwritable_folder_without_root(plain, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0555 folder")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert "cannot write -o" in _one_line(capsys, main([str(plain), "--pass", "fuse", "-o", str(ro / "o.onnx")]))


def test_disk_full_before_and_while_writing(plain, tmp_path, capsys, monkeypatch):
    import shutil

    import onnx_ir

    out = tmp_path / "out"
    out.mkdir()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    assert "the disk has 10 B free" in _one_line(capsys, main([str(plain), "--pass", "fuse", "-o", str(out / "o.onnx")]))
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", full)
    line = _one_line(capsys, main([str(plain), "--pass", "fuse", "-o", str(out / "o.onnx")]))
    assert "the disk is full" in line and str(out / "o.onnx") in line
    assert not list(out.iterdir())  # neither the output nor a staging folder


def test_overwritten_output_keeps_its_permissions(plain, tmp_path):
    out = tmp_path / "o.onnx"
    assert main([str(plain), "--pass", "fuse", "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    os.chmod(out, 0o600)
    os.chmod(tmp_path / "r.json", 0o640)
    assert main([str(plain), "--pass", "sparse:window=16", "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640


def test_sigterm_while_writing_leaves_no_staging(plain, tmp_path):
    """The write is interrupted by SIGTERM from inside the staging folder (deterministic):
    the run exits 143 through its finally blocks, leaving nothing behind."""
    out = tmp_path / "out"
    out.mkdir()
    code = f"""
import os, signal, sys, onnx_ir
from attn_opt.tools.cli import main
real = onnx_ir.save
def save(model, path, *a, **k):
    real(model, path, *a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    import time; time.sleep(5)
onnx_ir.save = save
sys.exit(main([{str(plain)!r}, "--pass", "fuse", "-o", {str(out / "o.onnx")!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    assert not list(out.iterdir()), list(out.iterdir())


def test_model_and_weights_switch_in_under_one_lock(tmp_path):
    """While another writer holds the folder's lock, switch_in waits: a pair goes in wholly
    before or after another pair."""
    from attn_opt.core.io import folder_lock, switch_in

    (tmp_path / "a.data").write_text("new weights")
    (tmp_path / "a.onnx").write_text("new graph")
    done = []
    with folder_lock(tmp_path / ""):
        t = threading.Thread(target=lambda: (switch_in([(tmp_path / "a.data", tmp_path / "o.onnx.data"),
                                                        (tmp_path / "a.onnx", tmp_path / "o.onnx")]), done.append(1)))
        t.start()
        time.sleep(0.3)
        assert not done and not (tmp_path / "o.onnx.data").exists()
    t.join(10)
    assert done and (tmp_path / "o.onnx").read_text() == "new graph"
