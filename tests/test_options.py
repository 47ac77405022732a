"""Every option value checked: nonsense is one line, exit 2, nothing written; a selection
that matches nothing is an error naming what the model has; `attn-opt passes` lists
every option with its type, default and accepted values."""

from __future__ import annotations

import dataclasses
import json

import pytest

import attn_opt
from attn_opt import passes
from attn_opt.core.errors import UserError
from test_pipeline import cli

BOUNDED = [(name, f) for name, cls in sorted(passes.REGISTRY.items()) for f in dataclasses.fields(cls)
           if f.metadata.get("low") is not None or f.metadata.get("high") is not None]


def _required(name: str, tested: str = "") -> str:
    """The options `name` cannot go without, less the one under test (an option is given once)."""
    need = {"sparse": {"window": "4"}, "sinkfree": {"mode": "redistribute", "alpha": "0.5"},
            "stream": {"window": "4"}, "latent": {"rank": "4"}}.get(name, {})
    need = {**need, **{("sparse", "size"): {"routing": "2"}}.get((name, tested), {})}  # size is routing's
    return "".join(f"{k}={v}," for k, v in need.items() if k != tested)


@pytest.mark.parametrize("name,f", BOUNDED, ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_bounded_option_refuses_values_outside(name, f):
    """For each option with a declared range: just outside it is refused, naming the range;
    the bound itself is accepted."""
    low, high = f.metadata.get("low"), f.metadata.get("high")
    is_int = "int" in str(f.type)
    for bad in ([low - 1] if low is not None else []) + ([high * 2 + 1] if high is not None else []):
        value = int(bad) if is_int else bad
        with pytest.raises(UserError, match=f"{f.name} must be .* \\(got "):
            passes.parse(f"{name}:{_required(name, f.name)}{f.name}={value:g}")
    ok = low if low is not None else high
    passes.parse(f"{name}:{_required(name, f.name)}{f.name}={int(ok) if is_int else ok:g}")


@pytest.mark.parametrize("spec,message", [
    ("sparse:window=0", "must be >= 1"),
    ("sparse:window=4,sinks=-1", "expected a number >= 0 or auto"),
    ("sparse:window=3x3,grid=0x4", "expected HxW"),
    ("softplus:p=nan", "nan"),
    ("sinkfree:mode=redistribute", "needs alpha"),
    ("sinkfree:mode=logit,bias=nan", "nan"),
    ("sparse:window=4,dense_heads=0+-1", "dense_heads must be >= 0"),
])
def test_pass_values_refused(spec, message):
    with pytest.raises(UserError, match=message):
        passes.parse(spec)


def test_python_api_checks_ranges_too(zoo_onnx):
    """A pass built in Python (not parsed) is checked the same way."""
    with pytest.raises(UserError, match="p must be >= 1"):
        attn_opt.optimize(str(zoo_onnx("bert-eager", "dynamo")), [passes.Softplus(p=0.5)])


@pytest.mark.parametrize("args,message", [
    (["--input-shape", "input_ids=0x0"], "every dimension must be >= 1"),
    (["--input-shape", "input_ids=2x-3"], "every dimension must be >= 1"),
    (["--sites", "zz"], "no site 'zz'; sites: a0, a1"),
    (["--sites", "a0,a7"], "no site 'a7'; sites: a0, a1"),
    (["--layers", "99"], "no attention in layer 99; layers with sites: 0-1"),
    (["--layers", "-1"], "bad --layers"),
    (["--max-error", "-1"], "--max-error"),
    (["--inputs", "missing.npz"], "no such file"),
    (["--check", "everything"], "--check"),
])
def test_cli_values_refused(zoo_onnx, tmp_path, args, message):
    out = tmp_path / "o.onnx"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "fuse", *args, "-o", out)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("spec", ["sparse:window=0", "softplus:p=0", "sinkfree:mode=redistribute,alpha=2",
                                  "sparse:window=4,stride=0", "sparse:window=4,block=0"])
def test_cli_pass_values_refused(zoo_onnx, tmp_path, spec):
    out = tmp_path / "o.onnx"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", spec, "-o", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr


def test_window_longer_than_a_fixed_length_model(variant_onnx, tmp_path):
    """A window that keeps every key of a model whose length is fixed: the report says the
    rewrite drops nothing (and it is exact)."""
    rep = tmp_path / "r.json"
    r = cli(variant_onnx("mul-scale", "dynamo"), "--pass", "sparse:window=4096", "-o", tmp_path / "o.onnx",
            "--report", rep)
    assert r.returncode == 0, r.stderr
    p = json.loads(rep.read_text())["passes"][0]
    assert p["notes"] and all("drops nothing" in n for n in p["notes"])
    assert p["fidelity"]["max_rel_error"] <= 1e-5


def test_window_longer_than_the_fidelity_inputs_is_noted(zoo_onnx, tmp_path):
    rep = tmp_path / "r.json"
    r = cli(zoo_onnx("bert-eager", "dynamo"), "--pass", "sparse:window=64", "-o", tmp_path / "o.onnx",
            "--report", rep)
    assert r.returncode == 0, r.stderr
    notes = json.loads(rep.read_text())["passes"][0]["notes"]
    assert notes and all("keeps every key" in n for n in notes)


def test_passes_listing():
    r = cli("passes", "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert set(listing) == set(passes.REGISTRY)
    for name, info in listing.items():
        assert info["what"] and info["options"] or name == "fuse"
        for o in info["options"]:
            assert o["type"] and o["accepted"] and o["help"], (name, o)
    sparse = {o["name"]: o for o in listing["sparse"]["options"]}
    assert sparse["stride"]["accepted"] == ">= 1" and sparse["sink_threshold"]["accepted"] == "0 to 1"
    r = cli("passes", "sparse")
    assert r.returncode == 0 and "dilation" in r.stdout
    r = cli("passes", "nope")
    assert r.returncode == 2 and "unknown pass 'nope'" in r.stderr


def test_layer_ranges_are_intervals():
    """--layers is never expanded: a range of 10^20 layers costs two numbers, and what the
    model lacks is said as intervals."""
    from attn_opt.core.passbase import Layers, parse_ranges, spans_text

    huge = parse_ranges("0-99999999999999999999")
    assert huge.spans == ((0, 99999999999999999999,),) and 5 in huge and 10**20 not in huge
    assert spans_text(huge.missing([0, 1, 2, 5])) == "3-4,6-99999999999999999999"
    assert parse_ranges("0-3,7").missing(range(8)) == [] and Layers.of(range(2, 10**18)).spans == ((2, 10**18 - 1),)
    assert Layers.of({3, 1}).missing([1]) == [(3, 3)]
    with pytest.raises(UserError, match="bad --layers"):
        parse_ranges("3-1")
