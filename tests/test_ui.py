"""The MLflow UI shows an explain run and a train run's training page: headless Chromium
(selenium) against a real ``mlflow server``.

The pages' scripts run inside the UI's sandboxed artifact frame: the tests move their
controls, read hover values, and check that the browser logged no script error and made
no request outside the MLflow server.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them the test is skipped with the reason in the summary, never passed. Screenshots go to
``test-artifacts/ui/`` at the repository root (ignored by git), or to
``$MLFLOW_XAI_TEST_ARTIFACTS/ui/``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("MLFLOW_XAI_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
# Site isolation off: the UI's sandboxed artifact frame (an opaque origin) then runs in the
# page's process, so chromedriver's console and network logs include it (with isolation
# they silently miss a script error or a request made by the frame).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000",
         "--disable-site-isolation-trials", "--disable-features=IsolateOrigins,site-per-process"]
WAIT_S = 60


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return None
    what = " and ".join(n for n, found in (("chromium", browser), ("chromedriver", driver)) if not found)
    return (f"{what} not found on PATH: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver; .ci/run does it) to run the UI test")


# Decided at collection: a skip before the session's server and training are set up for nothing.
MISSING = _missing()
pytestmark = [pytest.mark.server, pytest.mark.ui, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    # The console (script errors) and the network log (every request the pages make).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # Explicit driver and browser paths: selenium-manager downloads nothing.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, condition: Any) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "failure.png"))
        pytest.fail(f"the UI did not show {what} within {WAIT_S} s; screenshot {SHOTS / 'failure.png'}")


_LOADED_IMAGES = """
return Array.from(document.images).filter(i => i.src.startsWith(arguments[0]) && i.complete && i.naturalWidth > 0)
    .map(i => [i.naturalWidth, i.naturalHeight]);
"""


def _click(driver: Any, text: str) -> None:
    """Click the visible tree entry (or any element) whose text is ``text``."""
    from selenium.webdriver.common.by import By

    found = _wait(driver, f"an element {text!r}", lambda d: [
        e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()])
    driver.execute_script("arguments[0].click()", found[0])  # a JS click: no overlay can intercept it


def _frame_of(driver: Any, what: str) -> Any:
    from selenium.webdriver.common.by import By

    frame = _wait(driver, f"{what} in a frame", lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
    driver.switch_to.frame(frame)
    _wait(driver, f"{what}'s script to finish", lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    # A second watch from inside the frame, for what the interactions below may raise.
    driver.execute_script("window.__errors = []; window.addEventListener('error', e => __errors.push(String(e.message)))")
    return frame


def _frame_made_no_error_and_no_request(driver: Any) -> None:
    """Inside the frame: no error since :func:`_frame_of`, no resource fetched (data: URIs aside)."""
    assert driver.execute_script("return window.__errors") == []
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith("data:")] == []


def _no_script_error_and_no_request_outside(driver: Any, server: str) -> None:
    """Read (and clear) the browser's console and network logs since the last call.

    An error whose source is the server (the UI's own 404 for ``users/current``, say) is the
    UI's business; one from the artifact frame (a ``blob:`` URL), an uncaught exception or a
    failed load from another host fails the test.
    """
    errors = [e["message"] for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and not e["message"].startswith(server + "/")]
    assert not errors, errors
    outside = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith((server, "data:", "blob:", "about:")):
                outside.append(url)
    assert not outside, outside


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_ui_shows_the_report_and_a_weight_heatmap(browser: Any, mlflow_server: MlflowServer,
                                                  served: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    rid = served["explain_run_id"]
    exp = MlflowClient(mlflow_server.uri).get_run(rid).info.experiment_id
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get_log("browser"), browser.get_log("performance")  # only this test's entries

    # The explain run's page, its artifacts tab, the xai/ folder.
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp}/runs/{rid}/artifacts")
    _click(browser, "xai")

    # report.html: the UI renders HTML artifacts in a sandboxed iframe; its embedded images must load.
    _click(browser, "report.html")
    _frame_of(browser, "report.html")
    try:
        _wait(browser, "the report's diagnostics", lambda d: "Diagnostics" in d.page_source)
        loaded = _wait(browser, "the report's embedded images",
                       lambda d: len(imgs := d.execute_script(_LOADED_IMAGES, "data:image/")) >= 10 and imgs)
        assert all(w > 0 and h > 0 for w, h in loaded)
        assert "Feature attributions" in browser.page_source and served["train_run_id"] in browser.page_source
        _sort_the_layer_table(browser)
        _zoom_a_heatmap(browser)
        _frame_made_no_error_and_no_request(browser)
    finally:
        browser.switch_to.default_content()
    browser.save_screenshot(str(SHOTS / "explain-report.png"))
    _no_script_error_and_no_request_outside(browser, mlflow_server.uri)

    # A weight heatmap: the image view fetches the PNG through the server's artifact proxy
    # into a blob: URL; it must decode at the PNG's own size.
    _click(browser, "weights")
    _click(browser, "layers.0.png")
    png = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="xai/weights/layers.0.png",
                                                   dst_path=str(tmp_path), tracking_uri=mlflow_server.uri))
    width, height = _png_size(png)
    _wait(browser, "the layers.0 heatmap at its size",
          lambda d: [width, height] in d.execute_script(_LOADED_IMAGES, "blob:"))
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("get-artifact" in u and "layers.0.png" in u for u in fetched), fetched
    browser.save_screenshot(str(SHOTS / "weight-heatmap.png"))
    assert (SHOTS / "explain-report.png").stat().st_size > 10_000


_ROWS = "return Array.from(document.querySelectorAll('table.layers-table tbody tr')).map(r => r.cells[0].textContent)"


def _sort_the_layer_table(driver: Any) -> None:
    """A click on the weight L2 norm heading orders the rows by it, a second one reverses them."""
    from selenium.webdriver.common.by import By

    before = driver.execute_script(_ROWS)
    heading = driver.find_element(By.XPATH, "//table[contains(@class,'layers-table')]//th[text()='L2 norm'][1]")
    col = int(heading.get_attribute("data-col"))
    heading.click()
    norms = driver.execute_script(
        f"return Array.from(document.querySelectorAll('table.layers-table tbody tr'))"
        f".map(r => r.cells[{col}].dataset.v).filter(v => v !== undefined).map(Number)")
    assert norms == sorted(norms) and len(norms) >= 2, norms
    heading.click()
    reversed_norms = driver.execute_script(
        f"return Array.from(document.querySelectorAll('table.layers-table tbody tr'))"
        f".map(r => r.cells[{col}].dataset.v).filter(v => v !== undefined).map(Number)")
    assert reversed_norms == sorted(norms, reverse=True)
    assert sorted(driver.execute_script(_ROWS)) == sorted(before)


def _zoom_a_heatmap(driver: Any) -> None:
    """The layers.0 weight heatmap's view reads a value on hover and zooms on a click."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    boxes = [b for b in driver.find_elements(By.CSS_SELECTOR, "div.zoom") if b.is_displayed()]
    assert boxes, "no heatmap view shown: the report's script did not run"
    canvas = boxes[0].find_element(By.TAG_NAME, "canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    pixels = "return arguments[0].toDataURL()"
    drawn = driver.execute_script(pixels, canvas)
    # Hover the top-left cell (offsets count from the centre): its value is the matrix's first.
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, -size["width"] // 2 + 2, -size["height"] // 2 + 2).perform()
    tip = boxes[0].find_element(By.CSS_SELECTOR, ".tip").text
    data = json.loads(boxes[0].find_element(By.CSS_SELECTOR, "script.heat-data").get_attribute("textContent"))
    first = float(np.frombuffer(base64.b64decode(data["v"]), dtype="<f4")[0])
    where, shown = tip.rsplit(": ", 1)
    assert where.startswith(("row 0, col 0", "rows 0-")), tip
    assert math.isclose(float(shown), first, rel_tol=1e-3, abs_tol=1e-12), (tip, first)
    boxes[0].find_element(By.CSS_SELECTOR, "[data-z=in]").click()
    assert driver.execute_script(pixels, canvas) != drawn  # zoomed in: a different picture


def test_ui_shows_the_training_page_and_its_controls(browser: Any, mlflow_server: MlflowServer,
                                                     served: dict[str, Any]) -> None:
    """The train run's xai/training.html: scrub the epochs, hover the curves, one click per layer and kind."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rid = served["train_run_id"]
    exp = MlflowClient(mlflow_server.uri).get_run(rid).info.experiment_id
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get_log("browser"), browser.get_log("performance")
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp}/runs/{rid}/artifacts")
    _click(browser, "xai")
    _click(browser, "training.html")
    _frame_of(browser, "training.html")
    try:
        label = browser.find_element(By.ID, "epoch-label")
        epochs = json.loads(browser.execute_script("return document.getElementById('xai-data').textContent"))["epochs"]
        assert len(epochs) >= 2, epochs  # the tiny config trains 3 epochs, each one kept
        assert label.text.startswith(f"epoch {epochs[-1]} ")  # opens on the last epoch
        heat = browser.find_element(By.ID, "heat")
        pixels = "return arguments[0].toDataURL()"
        path = browser.find_element(By.ID, "hist-path").get_attribute("d")
        drawn = browser.execute_script(pixels, heat)

        # The epoch control, moved with the keyboard as a user would: Home = the first epoch.
        slider = browser.find_element(By.ID, "epoch")
        slider.send_keys(Keys.HOME)
        _wait(browser, "the first epoch's histogram", lambda d: label.text.startswith(f"epoch {epochs[0]} "))
        assert browser.find_element(By.ID, "hist-path").get_attribute("d") != path
        assert browser.execute_script(pixels, heat) != drawn  # the marked epoch row moved

        # Hover values: a curve (all curves follow the same step) and the heatmap.
        curve = browser.find_element(By.CSS_SELECTOR, "svg.curve[data-chart='0']")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", curve)
        ActionChains(browser).move_to_element(curve).perform()
        value = browser.find_element(By.ID, "val-0").text
        assert re.fullmatch(r"step \d+: .*-?\d.*", value), value
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", heat)
        ActionChains(browser).move_to_element(heat).perform()
        tip = browser.find_element(By.ID, "heat-tip").text
        assert re.match(r"epoch \d+ +\[", tip) and tip.endswith("%"), tip

        # One click on a kind, one on a layer.
        title = browser.find_element(By.ID, "dist-title")
        browser.find_element(By.CSS_SELECTOR, "#kinds button[data-kind='gradients']").click()
        assert title.text.startswith("Distribution over epochs: gradients of ")
        layers = browser.find_elements(By.CSS_SELECTOR, "#layers button")
        assert len(layers) >= 2
        name = layers[-1].text
        layers[-1].click()
        assert title.text == f"Distribution over epochs: gradients of {name}"
        assert browser.find_element(By.CSS_SELECTOR, "#layers button.on").text == name
        _frame_made_no_error_and_no_request(browser)
        browser.execute_script("window.scrollTo(0, 0)")
    finally:
        browser.switch_to.default_content()
    browser.save_screenshot(str(SHOTS / "training-page.png"))
    _no_script_error_and_no_request_outside(browser, mlflow_server.uri)
    assert (SHOTS / "training-page.png").stat().st_size > 10_000
