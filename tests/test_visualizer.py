"""The diff page in headless Chromium: it loads without console errors, makes no network
request, and shows one box per attention site and the changes highlighted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attn_opt.tools.visualizer import page_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed "
                                   "(.ci/run installs them from Debian's packages)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "attn_opt", *map(str, args)], capture_output=True, text=True)


def open_page(driver, path: Path, shot: Path):
    driver.get_log("performance")  # drop what came before
    t0 = time.perf_counter()
    driver.get(path.resolve().as_uri())
    for _ in range(600):  # a loaded machine (the suite runs on 2 cores) may take seconds
        if driver.execute_script("return document.body.dataset.ready") == "1":
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    assert driver.execute_script("return document.body.dataset.ready") == "1", "the page never became ready"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    severe = [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
    assert not severe, severe
    urls = [json.loads(m["message"])["message"]["params"]["request"]["url"] for m in driver.get_log("performance")
            if json.loads(m["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in urls), urls  # no network request
    return seconds


@needs_browser
@pytest.mark.parametrize("name,exporter,spec", [("bert-eager", "dynamo", "fuse"),
                                                ("t5-eager", "torchscript", "sparse:window=4"),
                                                ("llama-eager", "dynamo", "gated")])
def test_diff_page(browser, zoo_onnx, tmp_path, name, exporter, spec):
    from selenium.webdriver.common.by import By

    from attn_opt.core.ir import load
    from attn_opt.tools import zoo
    from attn_opt.tools.diff import diff_views

    src, out, page = zoo_onnx(name, exporter), tmp_path / "out.onnx", tmp_path / "diff.html"
    assert cli(src, "--pass", spec, "-o", out).returncode == 0
    r = cli("diff", src, out, "-o", page)
    assert r.returncode == 0, r.stderr
    open_page(browser, page, tmp_path / "shot.png")
    sites = zoo.MODELS[name].expected.sites
    for side in ("before", "after"):  # a site box each, or counted in its collapsed layer's box
        boxes = browser.find_elements(By.CSS_SELECTOR, f"#{side} .box.site")
        layers = browser.find_elements(By.CSS_SELECTOR, f"#{side} .box.layer")
        assert len(boxes) + sum(int(b.get_attribute("data-sites")) for b in layers) == sites
    data = page_data(diff_views(load(str(src)).view, load(str(out)).view))
    marked = [b for b in data["after"]["boxes"] if b["status"] in ("added", "changed")]
    shown = browser.find_elements(By.CSS_SELECTOR, "#after .box.added, #after .box.changed")
    assert marked and len(shown) == len(marked)
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", shown[0])
    WebDriverWait(browser, 60).until(ec.element_to_be_clickable(shown[0])).click()  # details of a changed box
    assert "in:" in browser.find_element(By.ID, "details").text


@needs_browser
def test_pipeline_page_has_a_tab_per_pass(browser, zoo_onnx, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "p.html"
    r = cli(zoo_onnx("gpt2-eager", "dynamo"), "--pass", "fuse", "--pass", "gated", "-o", tmp_path / "o.onnx",
            "--html", page)
    assert r.returncode == 0, r.stderr
    open_page(browser, page, tmp_path / "shot.png")
    tabs = browser.find_elements(By.CSS_SELECTOR, "#tabs button")
    assert [t.text for t in tabs] == ["fuse", "gated"]
    assert "attention FLOPs" in browser.find_element(By.ID, "passinfo").text
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(ec.element_to_be_clickable(tabs[1])).click()
    assert "gated" in browser.find_element(By.ID, "passinfo").text


def test_diff_text_and_errors(zoo_onnx, variant_onnx, tmp_path):
    src = zoo_onnx("bert-eager", "dynamo")
    out = tmp_path / "o.onnx"
    assert cli(src, "--pass", "sparse:window=4", "-o", out).returncode == 0
    r = cli("diff", src, out, "--text")
    assert r.returncode == 0 and "Softmax" in r.stdout and "parameters" in r.stdout and "FLOPs" in r.stdout
    r = cli("diff", src, variant_onnx("moe-gate", "dynamo"), "--text")
    assert r.returncode == 2 and "unrelated" in r.stderr
    bad = tmp_path / "x.onnx"
    bad.write_text("not a model")
    r = cli("diff", src, bad, "-o", tmp_path / "d.html")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d.html").exists()
    r = cli("diff", src, out)
    assert r.returncode == 2 and "give -o" in r.stderr


def test_diff_labels_every_form_on_a_site(zoo_onnx, tmp_path):
    """sparse then softplus then gated on one site: the label names all three."""
    src, out = zoo_onnx("bert-eager", "dynamo"), tmp_path / "o.onnx"
    r = cli(src, "--pass", "sparse:window=4", "--pass", "softplus", "--pass", "gated", "-o", out)
    assert r.returncode == 0, r.stderr
    r = cli("diff", src, out, "--text")
    assert r.returncode == 0 and "sparse 4 softplus gated" in r.stdout, r.stdout
