"""Pages benchmark: time to result in a real browser against the same request sent by httpx; screenshots.

    python bench/pages.py [--run-root runs/demo] [--config configs/demo.yaml] [--rounds 10] [--screenshots DIR]

Serves RUN_ROOT (a finished run: the demo's `mode-ray run` leaves one) on a free port and drives Debian's
Chromium, headless, through Selenium. Per round: the try-it page loaded afresh (navigation start → models and
examples shown), an example image of the run's evaluation split picked with its task's class names, Classify
clicked → the scores drawn (the page's own clock, `performance.now()`); then the same request body sent by
httpx. Prints the medians and the ratio browser / httpx. With --screenshots, saves tryit.png and experts.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.autoscale_local import _free_port  # noqa: E402 — one free-port probe for tests and benchmarks

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian: chromium, chromium-driver
BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")


def browser(height: int):  # noqa: ANN201
    """Debian's Chromium, headless, driven through its own chromedriver (Selenium never downloads one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        raise RuntimeError("needs Debian's chromium and chromium-driver packages (apt-get install both)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*BROWSER_ARGS, f"--window-size=1280,{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait(driver, script: str, timeout: float = 120) -> None:  # noqa: ANN001
    """Until `script` returns something true in the page."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def one_round(driver, url: str) -> tuple[float, float, dict]:  # noqa: ANN001
    """(page load ms, time to result ms, the request body the page sent)."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait(driver, "return document.body.dataset.ready === '1'")
    load = float(driver.execute_script("return document.body.dataset.readyMs"))
    driver.find_elements(By.CSS_SELECTOR, "#examples button")[0].click()
    driver.find_element(By.ID, "classify").click()
    wait(driver, "return document.body.dataset.answered === '1'")
    result = float(driver.execute_script("return document.body.dataset.resultMs"))
    labels = driver.find_element(By.ID, "labels").get_attribute("value").splitlines()
    image = driver.find_element(By.ID, "preview").get_attribute("src")
    body = {
        "inputs": image,
        "parameters": {"candidate_labels": labels, "model": "ensemble", "return_expert_weights": True},
    }
    body["parameters"]["routing"] = driver.find_element(By.ID, "routing").get_attribute("value")
    return load, result, body


def screenshots(url: str, folder: Path) -> None:
    from selenium.webdriver.common.by import By

    folder.mkdir(parents=True, exist_ok=True)
    driver = browser(1100)
    try:
        one_round(driver, url)
        driver.save_screenshot(str(folder / "tryit.png"))
        driver.set_window_size(1280, 2000)
        driver.get(f"{url}experts")
        wait(driver, "return document.body.dataset.ready === '1'")
        driver.find_element(By.ID, "route-labels").send_keys("the digit seven\na red circle\nstripes")
        wait(driver, "return document.querySelectorAll('#route-labels-table tbody tr').length === 3")
        driver.save_screenshot(str(folder / "experts.png"))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs/demo")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--screenshots", default=None, help="a folder for tryit.png and experts.png")
    args = parser.parse_args()
    from ray import serve

    from mode_ray.config import load_config
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.stages.serve import deploy

    cfg = load_config(args.config, [f"run_root={args.run_root}", f"serve.port={_free_port()}"])
    with ray_runtime(cfg):
        url = deploy(cfg)
        driver = browser(1100)
        loads, results, direct = [], [], []
        try:
            one_round(driver, url)  # warm-up: the models' first forward pass, the router's encoder
            for _ in range(args.rounds):
                load, result, body = one_round(driver, url)
                start = time.perf_counter()
                httpx.post(url, json=body, timeout=60).raise_for_status()
                direct.append(1000 * (time.perf_counter() - start))
                loads.append(load)
                results.append(result)
        finally:
            driver.quit()
        if args.screenshots:
            screenshots(url, Path(args.screenshots))
        serve.shutdown()
    load, result, plain = (statistics.median(x) for x in (loads, results, direct))
    print(f"try-it page load (navigation → models and examples shown): median {load:.0f} ms over {args.rounds}")
    print(f"time to result in the browser (click → scores drawn):       median {result:.0f} ms")
    print(f"the same request by httpx:                                 median {plain:.0f} ms")
    print(f"ratio browser / httpx: {result / plain:.2f}x")


if __name__ == "__main__":
    main()
