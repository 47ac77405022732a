"""Screenshots, taken in headless Chromium (selenium + /usr/bin/chromium, chromedriver):

    benchmarks/results/diff_first_view.png      the diff page as it first opens (whole graph, first change centred)
    benchmarks/results/model_explorer_overlay.png  Model Explorer on the rewritten model with attn-opt's overlay

    python benchmarks/screenshots.py [--explorer-python /work/venv-explorer/bin/python]

The model is the Optimum BERT fixture (tests/fixtures/optimum/bert/model.onnx) rewritten
with sparse:window=4 and gated. Model Explorer runs in the Python given (the one with the
`explorer` extra); where it has no Model Explorer, that screenshot is skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "tests" / "fixtures" / "optimum" / "bert" / "model.onnx"


def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
              "--disable-background-networking", "--disable-component-update", "--no-first-run",
              "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):  # WebGL on the CPU for Model Explorer
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def attn_opt(python: str, *args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([python, "-m", "attn_opt", *map(str, args)], env=env, check=True, capture_output=True,
                          text=True, **kw)


def diff_first_view(driver, work: Path, out: Path) -> None:
    page = work / "diff.html"
    attn_opt(sys.executable, "diff", MODEL, work / "out.onnx", "-o", page)
    driver.get(page.as_uri())
    for _ in range(600):
        if driver.execute_script("return document.body.dataset.ready") == "1":
            break
        time.sleep(0.05)
    driver.save_screenshot(str(out))
    print(f"wrote {out.relative_to(ROOT)}")


def explorer_view(driver, python: str, work: Path, out: Path) -> None:
    check = subprocess.run([python, "-c", "import model_explorer, model_explorer_onnx"], capture_output=True)
    if check.returncode != 0:
        print(f"skipped {out.name}: {python} has no Model Explorer (pip install -e \".[explorer]\")")
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([python, "-m", "attn_opt", "view", work / "out.onnx", "--no-browser", "--port", "8093"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"(http://localhost:\d+/\?data=\S+)", line):
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("Model Explorer did not start")
        driver.get(url)
        time.sleep(15)  # the graph is laid out in a web worker and drawn with WebGL
        for icon in driver.find_elements("css selector", "mat-icon"):
            if icon.text == "unfold_more_double":  # the toolbar's "expand all layers": the overlay's nodes in view
                icon.click()
                time.sleep(15)
                break
        driver.save_screenshot(str(out))
        print(f"wrote {out.relative_to(ROOT)}")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--explorer-python", default=sys.executable, help="a Python with the explorer extra")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        attn_opt(sys.executable, MODEL, "--pass", "sparse:window=4", "--pass", "gated", "-o", work / "out.onnx",
                 "--model-explorer", work / "out.explorer.json")
        driver = browser()
        try:
            diff_first_view(driver, work, RESULTS / "diff_first_view.png")
            explorer_view(driver, a.explorer_python, work, RESULTS / "model_explorer_overlay.png")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
