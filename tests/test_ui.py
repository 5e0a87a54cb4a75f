"""The MLflow UI shows an explain run: headless Chromium (selenium) against a real ``mlflow server``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them the test is skipped with the reason in the summary, never passed. Screenshots go to
``test-artifacts/ui/`` at the repository root (ignored by git), or to
``$MLFLOW_XAI_TEST_ARTIFACTS/ui/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("MLFLOW_XAI_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000"]
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


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_ui_shows_the_report_and_a_weight_heatmap(browser: Any, mlflow_server: MlflowServer,
                                                  served: dict[str, Any], tmp_path: Path) -> None:
    import mlflow
    from selenium.webdriver.common.by import By

    rid = served["explain_run_id"]
    exp = MlflowClient(mlflow_server.uri).get_run(rid).info.experiment_id
    SHOTS.mkdir(parents=True, exist_ok=True)

    # The explain run's page, its artifacts tab, the xai/ folder.
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp}/runs/{rid}/artifacts")
    _click(browser, "xai")

    # report.html: the UI renders HTML artifacts in a sandboxed iframe; its embedded images must load.
    _click(browser, "report.html")
    frame = _wait(browser, "report.html in a frame", lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
    browser.switch_to.frame(frame)
    try:
        _wait(browser, "the report's diagnostics", lambda d: "Diagnostics" in d.page_source)
        loaded = _wait(browser, "the report's embedded images",
                       lambda d: len(imgs := d.execute_script(_LOADED_IMAGES, "data:image/")) >= 10 and imgs)
        assert all(w > 0 and h > 0 for w, h in loaded)
        assert "Feature attributions" in browser.page_source and served["train_run_id"] in browser.page_source
    finally:
        browser.switch_to.default_content()
    browser.save_screenshot(str(SHOTS / "explain-report.png"))

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
