"""Lineage of one pipeline run: the asset events the API records, and the UI showing them.

The miniature pipeline run of tests/e2e/conftest.py materialises every stage output as a
Prefect asset keyed by its URI. Read back from the stack's API
(``prefect.asset.materialization.succeeded`` events), each expected output must be there with
its upstream assets and metadata, chained data -> X-dataset -> models -> vector -> sweep. The
pipeline draws that graph as an artifact of its run; headless Chromium opens it in the UI and
saves a screenshot (copied to docs/img/asset-graph.png when EXPLAIN_TRANSFER_UPDATE_DOCS=1).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "asset-graph.png"


def _lineage(stack, prefix: str, table: str) -> dict[str, Any]:
    """The stack's asset records under ``prefix``, once the sweep table's has arrived."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.assets import read_lineage

    deadline = time.monotonic() + 60
    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        while True:
            records = read_lineage(prefix)
            if table in records or time.monotonic() > deadline:
                return records
            time.sleep(1.0)


def _one(keys: list[str], pattern: str) -> str:
    found = [k for k in keys if re.fullmatch(pattern, k)]
    assert len(found) == 1, (pattern, sorted(keys))
    return found[0]


@pytest.mark.slow
def test_every_stage_output_is_an_asset_with_its_upstream_and_metadata(stack, pipeline_run) -> None:
    from flows.assets import ancestors

    root = f"file://{stack.data_root / 'miniature'}"
    table = f"{root}/sweeps/miniature/results.parquet"
    records = _lineage(stack, root + "/", table)
    keys = list(records)
    assert table in records, sorted(keys)

    data = {d: _one(keys, re.escape(f"{root}/data/{d}")) for d in ("shapes", "glyphs", "scenes")}
    model = {
        name: _one(keys, re.escape(f"{root}/models/{name}-") + r"[0-9a-f]+/model\.safetensors")
        for name in ("shapes-P", "shapes-X", "glyphs-P", "scenes-P")
    }
    x_data = _one(keys, re.escape(f"{root}/xdata/shapes-x/") + r"v-[0-9a-f]+")
    vector = _one(keys, re.escape(f"{root}/vectors/shapes-") + r"[0-9a-f-]+\.safetensors")
    references = [k for k in keys if "/xdata/glyphs-ref/" in k or "/xdata/scenes-ref/" in k]
    assert len(references) == 4  # val and test of each target

    kinds = {key: records[key].kind for key in keys}
    assert {kinds[k] for k in data.values()} == {"domain"}
    assert {kinds[k] for k in model.values()} == {"checkpoint"}
    assert kinds[x_data] == kinds[references[0]] == "x-dataset"
    assert (kinds[vector], kinds[table]) == ("vector", "sweep")

    def upstream(key: str) -> set[str]:
        return set(records[key].upstream)

    base = _one(list(upstream(model["shapes-P"])), r".*/models/base-[0-9a-f]+/model\.safetensors")
    assert upstream(model["shapes-P"]) == {base, data["shapes"]}
    assert upstream(x_data) == {data["shapes"], model["shapes-P"]}
    assert upstream(model["shapes-X"]) == {base, x_data, data["shapes"]}
    assert upstream(vector) == {model["shapes-X"], model["shapes-P"]}
    assert {vector, model["glyphs-P"], model["scenes-P"], *references} <= upstream(table)
    assert {data["glyphs"], data["scenes"]} <= upstream(table)  # accuracy is measured on them

    # Metadata of each kind: counts, fingerprints, accuracy, norms, rows.
    assert records[data["shapes"]].metadata["train_shards"] >= 1
    assert records[x_data].metadata["samples"] > 0
    assert records[x_data].metadata["shards_missing"] == 0
    assert len(records[x_data].metadata["model_fingerprint"]) == 16
    theta_p = records[model["shapes-P"]].metadata
    assert len(theta_p["fingerprint"]) == 16 and 0 <= theta_p["val_accuracy"] <= 1
    assert records[vector].metadata["norm"] > 0
    sweep = records[table].metadata
    assert sweep["rows"] > 0 and {"glyphs", "scenes"} <= set(sweep["chosen_lambda"])

    # The sweep's ancestry is the whole run: every output above, and the base it started from.
    graph = ancestors(records, table)
    assert {*data.values(), *model.values(), x_data, vector, *references, base} <= set(graph)
    assert graph[base] is None  # referenced (pretrained by its own flow), not materialised

    artifacts = stack.api(
        "POST",
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(pipeline_run.id)]}}},
    )
    by_key = {a["key"]: a for a in artifacts}
    assert by_key["pipeline-miniature-lineage"]["type"] == "image"
    assert by_key["pipeline-miniature-lineage"]["data"].startswith("data:image/png;base64,")
    assert x_data in by_key["pipeline-miniature-lineage-table"]["data"]


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium (as tests/e2e/test_ui.py), a window the size of the drawing."""
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
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.browser
def test_the_ui_shows_the_lineage_of_the_pipeline_run(
    stack, pipeline_run, browser, tmp_path: Path
) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    [artifact] = stack.api(
        "POST",
        "/artifacts/filter",
        json={
            "artifacts": {
                "flow_run_id": {"any_": [str(pipeline_run.id)]},
                "key": {"any_": ["pipeline-miniature-lineage"]},
            }
        },
    )
    browser.get(f"{stack.url}/artifacts/artifact/{artifact['id']}")
    wait = WebDriverWait(browser, 90, poll_frequency=0.5)

    def drawn(driver) -> bool:
        images = driver.find_elements("css selector", "img[src^='data:image/png']")
        return any(
            i.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", i)
            for i in images
        )

    try:
        wait.until(drawn)
    except TimeoutException:
        browser.save_screenshot(str(tmp_path / "lineage-timeout.png"))
        pytest.fail(f"no lineage image on the artifact page; screenshot in {tmp_path}")
    screenshot = tmp_path / "asset-graph.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("EXPLAIN_TRANSFER_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
