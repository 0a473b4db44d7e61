"""The pages in a real browser: Debian's Chromium, headless, driven by Selenium, against a served demo-sized run;
every number the page shows is checked against the API's own answer for the same request."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from bench.pages import CHROMEDRIVER, CHROMIUM, wait
from bench.pages import browser as headless_chromium
from mode_ray.samples.shards import iter_tar_rows
from tests.conftest import served_config, undeploy

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
MAX_LABELS = 8
SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def served_pages(evaluated_run):
    from mode_ray.stages.serve import deploy

    eval_cfg, _ = evaluated_run
    cfg = served_config(eval_cfg, f"serve.max_labels={MAX_LABELS}", "serve.layout=single")
    url = deploy(cfg)
    yield cfg, url
    undeploy(cfg)


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(1400)
    yield driver
    driver.quit()


def _shape_image(cfg, tmp_path: Path) -> Path:
    """One of the run's evaluation images, as a file the page's file input can take."""
    tar = sorted(Path(cfg.eval.shards).rglob("*.tar"))[0]
    with open(tar, "rb") as f:
        for row in iter_tar_rows(f, str(tar)):
            if json.loads(row["json"])["attributes"].get("shape") and row["image"]:
                path = tmp_path / "image.jpg"
                path.write_bytes(row["image"])
                return path
    raise AssertionError("no shape image in the eval split")


def _classify_in_page(driver, url: str, image: Path, labels: list[str], model: str = "ensemble") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(url)
    wait(driver, "return document.body.dataset.ready === '1'")
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait(driver, "return !document.getElementById('preview').hidden")
    box = driver.find_element(By.ID, "labels")
    box.clear()
    box.send_keys("\n".join(labels))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    if model == "ensemble":
        Select(driver.find_element(By.ID, "routing")).select_by_value("calibrated")
    driver.find_element(By.ID, "classify").click()
    wait(driver, "return document.body.dataset.answered === '1'")


def _bars(driver, selector: str, key: str) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"{selector} .bar-row")
    return [(r.get_attribute(f"data-{key}"), float(r.get_attribute("data-value"))) for r in rows]


def _api(url: str, image: Path, labels: list[str], **extra) -> httpx.Response:
    body = {
        "inputs": base64.b64encode(image.read_bytes()).decode(),
        "parameters": {"candidate_labels": labels, **extra},
    }
    return httpx.post(url, json=body, timeout=60)


def test_the_try_it_page_opens_on_the_routing_the_report_found_best(served_pages, evaluated_run, browser):
    from selenium.webdriver.common.by import By

    _, url = served_pages
    _, result = evaluated_run
    best = max(("reference", "calibrated"), key=lambda m: result["accuracy"][f"ensemble-{m}"]["average"])
    assert result["best_routing"] == best == httpx.get(f"{url}v1/experts").json()["best_routing"]
    browser.get(url)
    wait(browser, "return document.body.dataset.ready === '1'")
    assert browser.find_element(By.ID, "routing").get_attribute("value") == best


def test_the_try_it_page_shows_what_the_api_answers(served_pages, browser, tmp_path):
    from selenium.webdriver.common.by import By

    cfg, url = served_pages
    image = _shape_image(cfg, tmp_path)
    _classify_in_page(browser, url, image, SHAPES)
    api = _api(url, image, SHAPES, routing="calibrated", return_expert_weights=True).json()
    page = _bars(browser, "#scores", "label")
    assert [label for label, _ in page] == [p["label"] for p in api["predictions"]]
    assert [score for _, score in page] == pytest.approx([p["score"] for p in api["predictions"]], rel=1e-9)
    weights = dict(_bars(browser, "#weights", "expert"))
    assert weights.keys() == api["expert_weights"].keys()
    assert [weights[k] for k in weights] == pytest.approx([api["expert_weights"][k] for k in weights], rel=1e-9)
    assert "mostly to expert-" in browser.find_element(By.ID, "router-summary").text
    assert '"candidate_labels":[' in browser.find_element(By.ID, "curl").text.replace("\\", "")
    assert "zero_shot_image_classification" in browser.find_element(By.ID, "client").text
    # The examples come from the run's evaluation split: picking one fills in its task's class names.
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert examples
    examples[0].click()
    assert len(browser.find_element(By.ID, "labels").get_attribute("value").splitlines()) >= 2


def test_errors_show_the_apis_message_and_markup_shows_as_text(served_pages, browser, tmp_path):
    from selenium.webdriver.common.by import By

    cfg, url = served_pages
    image = _shape_image(cfg, tmp_path)
    too_many = [f"class {i}" for i in range(MAX_LABELS + 1)]
    _classify_in_page(browser, url, image, too_many, model="generalist")
    message = _api(url, image, too_many, model="generalist").json()["error"]
    assert browser.find_element(By.ID, "error").text == message and "at most" in message
    assert not browser.find_elements(By.CSS_SELECTOR, "#scores .bar-row")

    hostile = ["<script>window.pwned = 1</script>", "<b>bold</b>", "<img src=x onerror='window.pwned=2'>"]
    _classify_in_page(browser, url, image, hostile, model="generalist")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#scores .bar-row .name")]
    assert sorted(names) == sorted(hostile)
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#scores b, #scores img, #scores script")


def test_the_experts_page_shows_every_expert_and_explains_the_routing(served_pages, browser):
    from selenium.webdriver.common.by import By

    _, url = served_pages
    browser.get(f"{url}experts")
    wait(browser, "return document.body.dataset.ready === '1'")
    experts = {e["id"] for e in httpx.get(f"{url}v1/experts").json()["experts"] if e["kind"] == "expert"}
    cards = browser.find_elements(By.CSS_SELECTOR, "#experts .card")
    assert {c.get_attribute("data-expert") for c in cards} == experts
    for card in cards:
        thumbnails = card.find_elements(By.CSS_SELECTOR, "img")
        assert thumbnails and all(t.get_attribute("src").startswith("data:image/jpeg;base64,") for t in thumbnails)
        assert card.find_elements(By.CSS_SELECTOR, ".terms span") and "accuracy:" in card.text
    assert browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr[data-model='generalist']")
    assert browser.find_elements(By.CSS_SELECTOR, "#report-images img[alt='report.png']")

    labels = ["the digit seven", "a red circle", "a letter K"]
    box = browser.find_element(By.ID, "route-labels")
    box.send_keys("\n".join(labels))
    wait(browser, "return document.querySelectorAll('#route-labels-table tbody tr').length === 3")
    method = browser.find_element(By.ID, "route-method").get_attribute("value")
    answer = httpx.post(f"{url}v1/route", json={"candidate_labels": labels, "routing": method}).json()
    page = dict(_bars(browser, "#route-weights", "expert"))
    assert page == pytest.approx(answer["expert_weights"], rel=1e-9)
    rows = browser.find_elements(By.CSS_SELECTOR, "#route-labels-table tbody tr")
    assert [r.get_attribute("data-label") for r in rows] == labels
    assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == [x["expert"] for x in answer["labels"]]


def test_pages_are_served_only_to_browsers_and_only_the_runs_report(served_pages):
    _, url = served_pages
    page = httpx.get(url, headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    api_client = httpx.get(url)  # no text/html: the API's answer, in its shape
    assert api_client.status_code == 405 and "POST" in api_client.json()["error"]
    assert httpx.get(f"{url}v1/report/report.md").status_code == 200
    for path in ("v1/report/..%2Fconfig.yaml", "v1/report/state.pt", "static/..%2F__init__.py", "static/nope.js"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 404 and "error" in response.json(), path
    routed = httpx.post(f"{url}v1/route", json={"candidate_labels": ["only one"]})
    assert routed.status_code == 422 and "at least 2" in routed.json()["error"]
