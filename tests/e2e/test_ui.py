"""The Prefect UI of the served stack, in headless Chromium (Selenium).

Opens the page of the end-to-end run (tests/e2e/conftest.py), waits until it shows the run as
Completed and its Artifacts tab lists the run's artifacts, and saves a screenshot (also copied to
docs/img/flow-run.png for docs/orchestration.md when EXPLAIN_TRANSFER_UPDATE_DOCS=1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "flow-run.png"


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium with a fresh profile; no network beyond loopback is needed."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs the Debian packages chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1440,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from looking for one online.
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _visible_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def _artifacts_text(driver) -> str:
    """The text of the Artifacts tab's panel (empty until it is shown)."""
    panels = driver.find_elements("id", "artifacts-content")
    return panels[0].text if panels else ""


def _open_run_artifacts(browser, url: str, run_name: str, artifact: str, tmp_path: Path) -> str:
    """Open a flow run's page, wait for Completed, show its Artifacts tab; return the tab text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90, poll_frequency=0.5)
    browser.get(url)
    try:
        wait.until(lambda d: run_name in _visible_text(d))
        # The state badge: an element whose whole text is the state's name.
        wait.until(
            lambda d: any(
                e.is_displayed()
                for e in d.find_elements("xpath", "//*[normalize-space(.)='Completed']")
            )
        )
        tab = wait.until(
            lambda d: next(
                (
                    e
                    for e in d.find_elements(
                        "xpath", "//*[@role='tablist']/*[normalize-space(.)='Artifacts']"
                    )
                    if e.is_displayed()
                ),
                False,
            )
        )
        tab.click()
        wait.until(lambda d: artifact in _artifacts_text(d))
    except TimeoutException:
        browser.save_screenshot(str(tmp_path / "flow-run-timeout.png"))
        pytest.fail(
            f"the run page never showed the expected content; screenshot in {tmp_path}:\n"
            + _visible_text(browser)[:2000]
        )
    return _artifacts_text(browser)


@pytest.mark.slow
def test_pipeline_run_page_shows_completed_state_and_summary(
    stack, pipeline_run, browser, tmp_path: Path
) -> None:
    url = f"{stack.url}/runs/flow-run/{pipeline_run.id}"
    listed = _open_run_artifacts(browser, url, "pipeline-miniature", "pipeline-miniature", tmp_path)
    assert "MARKDOWN" in listed.upper()
    screenshot = tmp_path / "pipeline-run.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_flow_run_page_shows_completed_state_and_artifacts(
    stack, build_run, browser, tmp_path: Path
) -> None:
    url = f"{stack.url}/runs/flow-run/{build_run.id}"
    listed = _open_run_artifacts(
        browser, url, "build-shapes-x-val", "x-dataset-shapes-x-val", tmp_path
    )
    # Both artifacts of the run are listed: the markdown summary and the progress bar.
    assert "MARKDOWN" in listed.upper() and "PROGRESS" in listed.upper()
    assert "shapes-x-val: shards labelled" in listed

    screenshot = tmp_path / "flow-run.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("EXPLAIN_TRANSFER_UPDATE_DOCS") == "1":
        # Refresh the picture in docs/orchestration.md only when asked: tests leave the tree clean.
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
