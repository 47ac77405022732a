"""Crafted `.pt2` archives never run code: each way torch.export.load would execute
something from the file (pickled weights, constants and sample inputs, symbolic
expressions it evaluates, node targets it resolves by getattr, guard code it compiles,
the legacy pickle format) is refused in one line, exit 2, with no marker file made, for
inspect, the rewrite command and diff."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pt2")
    x = torch.randn(1, 2, 8, 4)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(Attn(), (x, x, x), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))
    path = d / "clean.pt2"
    torch.export.save(ep, str(path))
    return path


class Evil:
    """Unpickling it runs a command: what a hostile file would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the archive, letting `edit(name, data) -> data | None` change entries (None
    drops one) and return extra entries via edit.extra."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in getattr(edit, "extra", {}).items():
            zout.writestr(name, data)
    return dst


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_edit(suffix, change):
    def edit(name, data):
        if name.endswith(suffix):
            d = json.loads(data)
            change(d)
            return json.dumps(d).encode()
        return data
    return edit


def _evil_archives(clean: Path, d: Path, marker: Path) -> dict[str, Path]:
    cmd = f"__import__('os').system('touch {marker}')"
    out = {}

    def weights_cfg(d_):  # the reproduction: a weight entry that says use_pickle
        d_["config"]["w"] = {"path_name": "weight_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    edit = _json_edit("model_weights_config.json", weights_cfg)
    root = next(n.split("/")[0] for n in zipfile.ZipFile(clean).namelist())
    edit.extra = {f"{root}/data/weights/weight_0": _pickled(Evil(marker))}
    out["pickled weight"] = _rewrite(clean, d / "w.pt2", edit)

    def constants_cfg(d_):
        d_["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    edit = _json_edit("model_constants_config.json", constants_cfg)
    edit.extra = {f"{root}/data/constants/opaque_obj_0": _pickled(Evil(marker))}
    out["opaque constant"] = _rewrite(clean, d / "c.pt2", edit)

    def sample_inputs(name, data):
        return _pickled(Evil(marker)) if "sample_inputs" in name else data
    out["sample inputs"] = _rewrite(clean, d / "s.pt2", sample_inputs)

    def expr(d_):
        def walk(o):
            if isinstance(o, dict):
                for k in list(o):
                    if k == "expr_str":
                        o[k] = cmd
                    else:
                        walk(o[k])
            elif isinstance(o, list):
                for x in o:
                    walk(x)
        walk(d_)
    out["symbolic expression"] = _rewrite(clean, d / "e.pt2", _json_edit("models/model.json", expr))

    def target(d_):
        node = d_["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"
    out["node target"] = _rewrite(clean, d / "t.pt2", _json_edit("models/model.json", target))

    def guards(d_):
        d_["guards_code"] = [cmd]
    out["guard code"] = _rewrite(clean, d / "g.pt2", _json_edit("models/model.json", guards))

    def legacy(name, data):
        return None if "/models/" in name else data
    legacy.extra = {"version": b"8.0", "serialized_state_dict.json": _pickled(Evil(marker))}
    out["legacy format"] = _rewrite(clean, d / "l.pt2", legacy)
    return out


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attn_opt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_the_clean_archive_loads(clean_pt2, tmp_path):
    r = _cli("inspect", clean_pt2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 attention site(s)" in r.stdout


@pytest.mark.parametrize("how", ["pickled weight", "opaque constant", "sample inputs", "symbolic expression",
                                 "node target", "guard code", "legacy format"])
def test_inspect_never_runs_code_from_the_file(clean_pt2, tmp_path, how):
    marker = tmp_path / "MARKER"
    evil = _evil_archives(clean_pt2, tmp_path, marker)[how]
    before = evil.read_bytes()
    r = _cli("inspect", evil, cwd=tmp_path)
    assert not marker.exists(), f"{how}: code from the file ran"
    assert r.returncode == 2, (how, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "refused" in lines[0] or "not a readable" in lines[0]
    assert evil.read_bytes() == before  # the input is never modified


def test_rewrite_and_diff_never_run_code_from_the_file(clean_pt2, tmp_path):
    marker = tmp_path / "MARKER"
    evil = _evil_archives(clean_pt2, tmp_path, marker)["pickled weight"]
    for args in (("inspect", evil, "--why"), (evil, "--pass", "fuse", "-o", tmp_path / "out.pt2"),
                 ("diff", clean_pt2, evil, "--text"), ("diff", evil, clean_pt2, "-o", tmp_path / "d.html")):
        r = _cli(*args, cwd=tmp_path)
        assert not marker.exists(), args
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "out.pt2").exists() and not (tmp_path / "d.html").exists()


def test_the_python_api_refuses_too(clean_pt2, tmp_path):
    import attn_opt

    marker = tmp_path / "MARKER"
    evil = _evil_archives(clean_pt2, tmp_path, marker)["guard code"]
    with pytest.raises(attn_opt.UserError, match="refused"):
        attn_opt.inspect(str(evil))
    assert not marker.exists()
