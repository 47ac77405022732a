"""Reports and pages every reader can load: strict JSON (a non-finite figure is null, and
the document says what it was), the diff page's embedded data escaped so no name in a
model can end or change its <script>; option values that mean nothing refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import onnx
import pytest

from attn_opt import passes
from attn_opt.core.errors import UserError
from attn_opt.core.strict_json import dumps, for_script
from attn_opt.tools.cli import main
from attn_opt.tools.hostile_files import output_site

HOSTILE_NAMES = ["<!--<script>", "</script><script>alert(1)</script>", "a&amp;b", "x>y", "\u2028"]


def _strict_load(text: str):
    def refuse(c):
        raise ValueError(f"not strict JSON: {c}")

    return json.loads(text, parse_constant=refuse)


def _page_data(path) -> str:
    text = path.read_text()
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    assert m and text.count("<script") == 2, "the page's two script elements, intact"
    return m.group(1)


@pytest.fixture
def named(tmp_path):
    """The graph-output attention model with hostile node names."""
    m = output_site()
    for n, name in zip([n for n in m.graph.node if n.op_type != "Constant"], HOSTILE_NAMES):  # the page hides constants
        n.name = name
    onnx.save(m, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


def test_page_escapes_names_and_stays_strict(named, tmp_path):
    """--html and diff -o: the data holds no raw <, > or &, parses as strict JSON and
    gives the names back exactly."""
    out, page, diff = tmp_path / "o.onnx", tmp_path / "p.html", tmp_path / "d.html"
    assert main([str(named), "--pass", "sinkfree:mode=logit,bias=-inf", "-o", str(out), "--html", str(page),
                 "--report", str(tmp_path / "r.json")]) == 0
    assert main(["diff", str(named), str(out), "-o", str(diff)]) == 0
    for p in (page, diff):
        blob = _page_data(p)
        assert not set("<>&") & set(blob)
        data = _strict_load(blob)
        names = {m["name"] for box in data[0]["before"]["boxes"] for m in box["members"]}
        assert set(HOSTILE_NAMES) <= names
    report = _strict_load((tmp_path / "r.json").read_text())
    assert report["passes"][0]["options"]["bias"] is None
    assert report["non_finite"] == {"$.passes[0].options.bias": "-inf (not a JSON number)"}


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_page_data_parses_in_javascript(named, tmp_path):
    """What the page does first: JSON.parse of its data element's text."""
    out, page = tmp_path / "o.onnx", tmp_path / "p.html"
    assert main([str(named), "--pass", "sinkfree:mode=logit,bias=-inf", "-o", str(out), "--html", str(page)]) == 0
    script = ("const t=require('fs').readFileSync(process.argv[1],'utf8');"
              "const m=t.match(/<script id=\"data\" type=\"application\\/json\">([\\s\\S]*?)<\\/script>/);"
              "const d=JSON.parse(m[1]);console.log(d[0].pass.options.bias===null?'ok':'bad')")
    r = subprocess.run(["node", "-e", script, str(page)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr


def test_strict_json_unit():
    doc = {"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf")}, "e": 2}
    got = _strict_load(dumps(doc))
    assert got["a"] is None and got["b"] == [1.0, None] and got["c"]["d"] is None and got["e"] == 2
    assert got["non_finite"] == {"$.a": "inf (not a JSON number)", "$.b[1]": "nan (not a JSON number)",
                                 "$.c.d": "-inf (not a JSON number)"}
    assert for_script({"x": "</script><!--&"}) == '{"x": "\\u003c/script\\u003e\\u003c!--\\u0026"}'


@pytest.mark.parametrize("spec,says", [
    ("softplus:p=inf", "p must be a finite number (got inf)"),
    ("sinkfree:mode=logit,bias=inf", "bias must be a finite number or -inf (got inf)"),
    ("sparse:window=4,sink_threshold=-inf", "sink_threshold must be a finite number"),
    ("sparse:window=4,window=8", "option window is given twice"),
    ("sinkfree:mode=logit,bias=0,mode=relu", "option mode is given twice"),
])
def test_meaningless_option_values_refused(spec, says):
    with pytest.raises(UserError, match=re.escape(says)):
        passes.parse(spec)


def test_negative_infinity_where_it_is_defined():
    assert passes.parse("sinkfree:mode=logit,bias=-inf").bias == float("-inf")
