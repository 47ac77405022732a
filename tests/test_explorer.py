"""Model Explorer overlays (`--model-explorer FILE.json`), `attn-opt view`, and the diff
page's first view. The overlay's shape is checked everywhere; against Model Explorer's own
loader (model_explorer's node_data_builder, model-explorer-onnx's ONNX adapter) and in
headless Chromium where the `explorer` extra and the browser are installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from attn_opt.core.graph import SITE_TAG
from attn_opt.tools.cli import main

BERT = Path(__file__).parent / "fixtures" / "optimum" / "bert" / "model.onnx"
ROOT = Path(__file__).resolve().parent.parent

try:
    import model_explorer  # noqa: F401
    import model_explorer_onnx  # noqa: F401

    EXPLORER_MISSING = None
except ImportError as e:
    EXPLORER_MISSING = f"Model Explorer is not installed here ({e.name}); pip install -e \".[explorer]\""
needs_explorer = pytest.mark.skipif(EXPLORER_MISSING is not None, reason=EXPLORER_MISSING or "")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed")


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    d = tmp_path_factory.mktemp("explorer")
    out, rep, me = d / "out.onnx", d / "report.json", d / "out.explorer.json"
    assert main([str(BERT), "--pass", "sparse:window=4", "--pass", "gated", "-o", str(out), "--report", str(rep),
                 "--model-explorer", str(me)]) == 0
    return out, json.loads(rep.read_text()), json.loads(me.read_text()), json.loads((d / "out.explorer.error.json")
                                                                                      .read_text())


def test_overlay_names_every_node_a_pass_emitted(rewritten):
    out, report, labels, errors = rewritten
    m = onnx.load(str(out))
    tagged = {n.name: next(p.value for p in n.metadata_props if p.key == SITE_TAG)
              for n in m.graph.node if any(p.key == SITE_TAG for p in n.metadata_props)}
    assert list(labels) == [m.graph.name] == list(errors)
    results = labels[m.graph.name]["results"]
    assert set(results) == set(tagged) and len(tagged) > 10
    for name, site in tagged.items():
        text = results[name]["value"]
        assert text.startswith(f"{site}: sparse, gated | attention FLOPs ")
        before, after = map(float, re.search(r"FLOPs (\S+) -> (\S+)", text).groups())
        assert after < before  # a window of 4 over 16 tokens
    err = report["passes"][-1]["fidelity"]["max_rel_error"]
    assert {r["value"] for r in errors[m.graph.name]["results"].values()} == {err}
    assert errors[m.graph.name]["gradient"][0]["stop"] == 0 and errors[m.graph.name]["gradient"][-1]["stop"] == 1


def test_overlay_site_errors_with_check_sites(tmp_path):
    me = tmp_path / "o.json"
    assert main([str(BERT), "--pass", "sparse:window=4", "-o", str(tmp_path / "o.onnx"), "--check", "sites",
                 "--model-explorer", str(me)]) == 0
    values = [r["value"] for g in json.loads(me.read_text()).values() for r in g["results"].values()]
    assert values and all(" | site error " in v for v in values)


def test_overlay_refusals(capsys, tmp_path):
    out = tmp_path / "o.onnx"
    for args, said in ((["--model-explorer", str(out)], "also -o"),
                       (["--model-explorer", str(tmp_path / "x.json"), "--report", str(tmp_path / "x.error.json")],
                        "also --report")):
        capsys.readouterr()
        assert main([str(BERT), "--pass", "fuse", "-o", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert said in err and err.strip().count("\n") == 0
        assert not out.exists()


@pytest.mark.skipif(EXPLORER_MISSING is None, reason="Model Explorer is installed: view would start it")
def test_view_without_model_explorer_is_one_line(capsys):
    assert main(["view", str(BERT), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "Model Explorer is not installed" in err and "[explorer]" in err and err.strip().count("\n") == 0


@needs_explorer
def test_overlay_loads_in_model_explorer(rewritten):
    """Model Explorer's own classes take the JSON, and every key is a node of the graph
    its ONNX adapter builds from the output model."""
    from model_explorer import node_data_builder as ndb
    from model_explorer_onnx.main import ONNXAdapter

    out, _, labels, errors = rewritten
    graphs = {g.id: {n.id for n in g.nodes} for g in ONNXAdapter().convert(str(out), {})["graphs"]}
    for data in (labels, errors):
        built = ndb.ModelNodeData(graphsData={
            gid: ndb.GraphNodeData(results={k: ndb.NodeDataResult(**v) for k, v in g["results"].items()},
                                   name=g["name"], gradient=[ndb.GradientItem(**x) for x in g.get("gradient", [])])
            for gid, g in data.items()})
        for gid, g in data.items():
            assert gid in graphs and set(g["results"]) <= graphs[gid]
            assert json.loads(built.to_json_string())[gid]["results"] == g["results"]


def _browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
              "--disable-background-networking", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))


@needs_explorer
@needs_browser
def test_model_explorer_page_renders_the_overlay(rewritten):
    out = rewritten[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "attn_opt", "view", str(out), "--no-browser", "--port", "8097"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    driver = None
    try:
        url = next((m.group(1) for line in proc.stdout if (m := re.search(r"(http://\S+/\?data=\S+)", line))), None)
        assert url is not None
        driver = _browser()
        driver.get(url)
        for _ in range(120):
            if "attn-opt error" in driver.find_element("tag name", "body").text:
                break
            time.sleep(0.5)
        text = driver.find_element("tag name", "body").text
        assert "attn-opt sites" in text and "attn-opt error (max relative)" in text
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(10)


@needs_browser
def test_diff_page_opens_on_the_whole_graph_centred_on_the_first_change(rewritten, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "d.html"
    assert main(["diff", str(BERT), str(rewritten[0]), "-o", str(page)]) == 0
    driver = _browser()
    try:
        driver.get(page.as_uri())
        for _ in range(600):
            if driver.execute_script("return document.body.dataset.ready") == "1":
                break
            time.sleep(0.05)
        for side in ("before", "after"):
            pane = driver.find_element(By.CSS_SELECTOR, f"#{side} svg").rect
            boxes = [b.rect for b in driver.find_elements(By.CSS_SELECTOR, f"#{side} .box")]
            assert boxes
            for b in boxes:  # every box inside its pane: nothing cut at an edge
                assert pane["x"] - 1 <= b["x"] and b["x"] + b["width"] <= pane["x"] + pane["width"] + 1
                assert pane["y"] - 1 <= b["y"] and b["y"] + b["height"] <= pane["y"] + pane["height"] + 1
        first = driver.execute_script("""
            const s = STEPS[0], ch = s.after.boxes.concat(s.before.boxes).filter(b => b.status !== 'same')
                .sort((a, b) => a.y - b.y)[0];
            const svg = document.querySelector('#after svg'), r = svg.getBoundingClientRect(), v = view;
            return [(ch.x - v.x) / v.w * r.width, (ch.y - v.y) / v.h * r.height, r.width, r.height];""")
        x, y, w, h = first
        assert abs(x - w / 2) < 2 and abs(y - h / 2) < 2  # the first change at the centre
    finally:
        driver.quit()
