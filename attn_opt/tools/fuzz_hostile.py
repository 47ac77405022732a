"""Fuzzing with hostile input: files and options an attacker or a careless user would give.

Each case writes its files into a fresh folder and runs the command line in this process
(`attn_opt.tools.cli.main`), drawn round-robin from five kinds:

    protobuf   the model's bytes flipped, truncated, spliced, or a length made huge
    external   an external-data location, offset or length made hostile (`../`, absolute
               paths, symlinks and hard links out of the folder, past the end, not numbers)
    archive    .npz inputs (and a .npy prompt) whose headers lie, whose members are renamed,
               duplicated, pickled or deflated bombs, or whose bytes are flipped
    options    pass specs, --layers, --input-shape, --max-memory, --lora, ... mutated
    pt2        entries of a torch.export archive flipped, renamed, dropped or reconfigured

and asserts, per case: exit 0 or 2, an exit 2 says one line on stderr, no traceback and no
internal error, every input file byte-for-byte unchanged, and the process's peak RSS under
the bound. Cases are seeded by (seed, index), so one can be replayed:

    python -m attn_opt.tools.fuzz_hostile --seconds 50 --seed 0     # a JSON summary; exit 1 on a problem
    python -m attn_opt.tools.fuzz_hostile --seed 0 --case 17 --show  # replay case 17, print what it ran

tests/test_fuzz_hostile.py runs it in CI for a bounded time, in a child under RLIMIT_AS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

from attn_opt.tools import hostile_files as hf

KINDS = ("protobuf", "external", "archive", "options", "pt2")
RSS_BOUND = 1 << 30
HOSTILE_VALUES = ["inf", "-inf", "nan", "-1", "0", "1e309", "99999999999999999999999", "", "=", "x", "1+2", "auto",
                  "true", "0x10", "\u0663", "1_000", " 4 ", "None", "-0", "4" * 400]


class Seeds:
    """The honest files every case starts from, built once."""

    def __init__(self, folder: Path, pt2: bool):
        self.folder = folder
        model = hf.projected_output_site()
        self.model = folder / "m.onnx"
        onnx.save(model, self.model)
        self.ext = folder / "ext"
        self.ext.mkdir()
        onnx.save(hf.projected_output_site(hidden=64), self.ext / "m.onnx", save_as_external_data=True,
                  all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)  # 2 KiB weights: external
        rng = np.random.default_rng(0)
        self.inputs = {"x": rng.standard_normal((1, 8, 16)).astype(np.float32)}
        self.pt2 = _export_pt2(folder / "m.pt2") if pt2 else None


def _export_pt2(path: Path) -> Path | None:
    try:
        import torch
    except ImportError:
        return None

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v

    x = torch.randn(1, 2, 8, 4)
    torch.export.save(torch.export.export(Attn(), (x, x, x)), str(path))
    return path


def _rewrite_or_inspect(rng, model: Path, d: Path) -> list:
    return rng.choice([[model, "--pass", rng.choice(["fuse", "sparse:window=4", "softplus", "gated"]),
                        "-o", d / "out.onnx", "--report", d / "r.json"],
                       ["inspect", model], ["inspect", model, "--why", "--json"],
                       ["diff", model, model, "--text"]])


def case_protobuf(rng, s: Seeds, d: Path) -> list:
    data = bytearray(s.model.read_bytes())
    op = rng.choice(["flip", "truncate", "insert", "splice", "length"])
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "truncate":
        data = data[:rng.randrange(len(data))]
    elif op == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif op == "splice":
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randint(1, 200))
        data[rng.randrange(len(data)):0] = data[a:b]
    else:  # a length-delimited field's length made huge: a varint of 0xff bytes
        at = rng.randrange(len(data) - 1)
        data[at:at + 1] = b"\xff" * rng.randint(2, 9) + b"\x01"
    (d / "m.onnx").write_bytes(bytes(data))
    return _rewrite_or_inspect(rng, d / "m.onnx", d)


def case_external(rng, s: Seeds, d: Path) -> list:
    for f in s.ext.iterdir():
        shutil.copy(f, d / f.name)
    (d.parent / "secret").write_bytes((d / "m.onnx.data").read_bytes())
    with contextlib.suppress(FileExistsError):
        os.symlink("../secret", d / "link.data")
    with contextlib.suppress(FileExistsError):
        os.link(d.parent / "secret", d / "hard.data")
    m = onnx.load(d / "m.onnx", load_external_data=False)
    t = rng.choice([t for t in m.graph.initializer if t.external_data])
    key = rng.choice(["location", "location", "offset", "length", "checksum", "basepath", "unknown"])
    value = rng.choice({
        "location": ["../secret", "../../../../etc/passwd", "/etc/passwd", str(d.parent / "secret"), "", "link.data",
                     "hard.data", "sub/../../secret", ".", "m.onnx", "a" * 5000, "\u00e9\u00e8.data", "nothere.data"],
        "offset": ["-1", "1e3", "abc", str(2 ** 64), "100000", str(rng.randrange(4096))],
        "length": ["-1", "abc", str(2 ** 64), "100000", "0", str(rng.randrange(4096))],
    }.get(key, HOSTILE_VALUES))
    entry = next((e for e in t.external_data if e.key == key), None) or t.external_data.add()
    entry.key, entry.value = key, value
    onnx.save(m, d / "m.onnx")
    return _rewrite_or_inspect(rng, d / "m.onnx", d)


def _npz_members(rng, s: Seeds) -> list[tuple[str, bytes]]:
    x = s.inputs["x"]
    honest = hf.npy_header(x.shape, x.dtype) + x.tobytes()
    op = rng.choice(["shape", "descr", "name", "duplicate", "flip", "truncate", "pickle", "extra"])
    if op == "shape":
        shape = rng.choice([(1, 8, 1 << 40), (-1, 8, 16), (1, 8), (1, 8, 16, 1), (0, 8, 16), (1, 9, 16)])
        return [("x.npy", hf.npy_header(shape, x.dtype) + x.tobytes())]
    if op == "descr":
        descr = rng.choice(["|O", "<c8", ">f4", "|V8", "|S5", "<f8", "<i8", "|b1", "<M8[s]"])
        try:
            head = hf.npy_header(x.shape, np.dtype(descr))
        except TypeError:
            head = hf.npy_header(x.shape, x.dtype)
        return [("x.npy", head + x.tobytes())]
    if op == "name":
        return [(rng.choice(["../x.npy", "x", "/x.npy", "x.npy/", "dir/x.npy", "\u00e9.npy"]), honest)]
    if op == "duplicate":
        return [("x.npy", honest), ("x.npy", honest)]
    if op == "flip":
        data = bytearray(honest)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return [("x.npy", bytes(data))]
    if op == "truncate":
        return [("x.npy", honest[:rng.randrange(len(honest))])]
    if op == "pickle":
        buf = io.BytesIO()
        np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
        return [("x.npy", buf.getvalue())]
    return [("x.npy", honest), (f"{rng.choice(['y', 'x2', 'q'])}.npy", honest)]


def case_archive(rng, s: Seeds, d: Path) -> list:
    npz = d / "in.npz"
    if rng.random() < 0.15:  # a decompression bomb: 64 MiB of zeros behind an honest header
        hf.deflated_zeros(npz, {"x": (1, 1 << 20, 16)}, "<f4")
    else:
        hf.write_npz(npz, _npz_members(rng, s))
        if rng.random() < 0.2:  # the archive itself damaged
            data = bytearray(npz.read_bytes())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            npz.write_bytes(bytes(data))
    if rng.random() < 0.1:
        (d / "p.npy").write_bytes(hf.npy_header(rng.choice([(1, 1 << 33), (2, 3), (4,)]), "<i8") + b"\0" * 48)
        return ["generate", s.model, "--prompt-ids", d / "p.npy"]
    return rng.choice([[s.model, "--pass", "fuse", "--inputs", npz, "-o", d / "out.onnx"],
                       [s.model, "--pass", "softplus", "--calibrate", npz, "-o", d / "out.onnx"],
                       ["inspect", s.model, "--inputs", npz]])


def case_options(rng, s: Seeds, d: Path) -> list:
    from attn_opt.passes import REGISTRY

    name = rng.choice(sorted(REGISTRY) + ["", "fuse ", "sparse:", "nope", ":"])
    fields = list(getattr(REGISTRY.get(name), "__dataclass_fields__", {})) + ["nope", ""]
    opts = ",".join(f"{rng.choice(fields)}={rng.choice(HOSTILE_VALUES)}" for _ in range(rng.randint(0, 3)))
    spec = name + (f":{opts}" if opts else rng.choice(["", ":", ":,,", ":=="]))
    args = [s.model, "--pass", spec, "-o", d / "out.onnx"]
    extra = {"--layers": ["0-99999999999999999999", "-1", "3-1", "a", ",", "0-1,0-1", "1" * 5000, "0"],
             "--sites": ["", ",", "a0,a0", "a99", "<script>"],
             "--input-shape": ["x=1x1", "x=0x8x16", "x=1x8x16x1", "x=1x1000000000x16", "x=-1x8x16", "=", "x",
                               "y=1x8x16", "x=1x8x16"],
             "--max-memory": ["0", "-1", "1", "1e3G", "abc", "64K", "1T"],
             "--lora": ["-1", "1000000000", "x", "4"], "--max-error": ["nan", "-1", "inf", "0"],
             "--check": ["none", "sites", "all"]}
    for flag in rng.sample(sorted(extra), rng.randint(1, 3)):
        args += [flag, rng.choice(extra[flag])]
    return args


def case_pt2(rng, s: Seeds, d: Path) -> list:
    with zipfile.ZipFile(s.pt2) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    i = rng.randrange(len(entries))
    name, data = entries[i]
    op = rng.choice(["flip", "drop", "rename", "json", "truncate"])
    if op == "flip" and data:
        data = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        entries[i] = (name, bytes(data))
    elif op == "drop":
        entries.pop(i)
    elif op == "rename":
        entries[i] = (name.replace("/", "/../", 1) if rng.random() < 0.5 else name + ".x", data)
    elif op == "json" and name.endswith(".json"):
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and doc:
                doc[rng.choice(sorted(doc))] = rng.choice([None, True, "x" * 100, {"use_pickle": True}, [], 1e308])
            entries[i] = (name, json.dumps(doc).encode())
        except ValueError:
            pass
    else:
        entries[i] = (name, data[:rng.randrange(len(data) + 1)])
    hf.write_npz(d / "m.pt2", entries)
    return rng.choice([["inspect", d / "m.pt2"], [d / "m.pt2", "--pass", "fuse", "-o", d / "out.pt2"]])


MAKERS = {"protobuf": case_protobuf, "external": case_external, "archive": case_archive, "options": case_options,
          "pt2": case_pt2}
OUTPUTS = {"out.onnx", "out.onnx.data", "out.pt2", "r.json"}


def _digests(*folders: Path) -> dict:
    out = {}
    for f in folders:
        for p in sorted(f.iterdir()):
            if p.is_file() and not p.is_symlink() and p.name not in OUTPUTS:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(seed: int, index: int, kinds, seeds: Seeds, root: Path) -> dict:
    """Make and run case `index` of `seed`: what it ran and what was wrong (None: nothing)."""
    from attn_opt.tools.cli import main

    kind = kinds[index % len(kinds)]
    rng = random.Random(f"{seed}/{index}")
    d = root / f"case{index}" / "m"
    d.mkdir(parents=True)
    args = [str(a) for a in MAKERS[kind](rng, seeds, d)]
    before = _digests(d, d.parent, seeds.folder)
    out, err = io.StringIO(), io.StringIO()
    rc, problem = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except BaseException as e:  # main returns for every error; anything escaping is a crash
            problem = f"escaped main: {type(e).__name__}: {e}"[:300]
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    if problem is None:
        if rc not in (0, 2, 3):
            problem = f"exit {rc}: {' | '.join(lines)[:300]}"
        elif rc == 3 and (len(lines) != 1 or not lines[0].startswith("nothing found: ")):
            problem = f"exit 3 without one 'nothing found' line: {lines[:3]}"
        elif rc == 2 and (len(lines) != 1 or not lines[0].startswith(("error: ", "not supported: "))):
            problem = f"exit 2 without one error line: {lines[:3]}"
        elif "Traceback" in err.getvalue() or "Traceback" in out.getvalue():
            problem = "a traceback was printed"
        elif _digests(d, d.parent, seeds.folder) != before:
            problem = "an input file changed"
        elif peak_rss() > RSS_BOUND:
            problem = f"peak RSS {peak_rss() / 2**30:.2f} GiB"
    shutil.rmtree(d.parent, ignore_errors=True)
    return {"kind": kind, "index": index, "args": args, "rc": rc, "stderr": lines[:2], "problem": problem}


def fuzz(seconds: float, seed: int = 0, kinds=KINDS, only: int | None = None) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attn-opt-fuzz-") as tmp:
        root = Path(tmp)
        (root / "seeds").mkdir()
        seeds = Seeds(root / "seeds", pt2="pt2" in kinds)
        kinds = tuple(k for k in kinds if k != "pt2" or seeds.pt2 is not None)
        results, index = [], (only if only is not None else 0)
        while True:
            results.append(run_case(seed, index, kinds, seeds, root))
            index += 1
            if only is not None or time.perf_counter() - t0 > seconds:
                break
    by_kind = {k: {"cases": sum(r["kind"] == k for r in results),
                   "exit 0": sum(r["kind"] == k and r["rc"] == 0 for r in results),
                   "exit 2": sum(r["kind"] == k and r["rc"] == 2 for r in results)} for k in kinds}
    return {"seed": seed, "seconds": round(time.perf_counter() - t0, 1), "cases": len(results), "by_kind": by_kind,
            "peak_rss": peak_rss(), "problems": [r for r in results if r["problem"]],
            "last": results[-1] if only is not None else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=50.0, help="stop starting cases after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    ap.add_argument("--case", type=int, help="run only this case index (a replay)")
    ap.add_argument("--show", action="store_true", help="with --case: print what the case ran and said")
    a = ap.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k in KINDS)
    summary = fuzz(a.seconds, a.seed, kinds, a.case)
    if not a.show:
        summary.pop("last")
    print(json.dumps(summary, indent=1, default=str))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
