"""The web page in a real headless Chromium: upload an image, type labels, see the overlay and the legend.

Uses Debian's ``chromium`` and ``chromium-driver`` through Selenium with explicit paths, so Selenium never
downloads a driver or a browser. Skipped (with the reason) when either is missing, unless
``TALK2DINO_REQUIRE_BROWSER=1`` (CI sets it), which turns the skip into a failure. The screenshot is saved
under the test's ``tmp_path`` and, when ``TALK2DINO_ARTIFACTS`` names a folder, copied there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

from test_server import FAST, running_server  # noqa: E402

from talk2dino import Segmenter  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402

CHROMIUM = os.environ.get("TALK2DINO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TALK2DINO_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_S = 90


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    return None


@pytest.fixture()
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("TALK2DINO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", "--window-size=1280,1000"):
        options.add_argument(flag)
    # Explicit driver and browser paths: Selenium Manager is never asked to fetch anything.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _photo(path: Path) -> Path:
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, 255 - xx], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[30:70, 40:90] = (220, 40, 40)  # a red box, so the overlay has some structure
    Image.fromarray(rgb).save(path)
    return path


def _save_artifact(source: Path) -> Path | None:
    folder = os.environ.get("TALK2DINO_ARTIFACTS")
    if not folder:
        return None
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(source, target / source.name))


def test_page_uploads_image_and_shows_overlay_legend_heatmaps_and_attention(browser: Any, tiny_model,
                                                                            tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = _photo(tmp_path / "photo.png")
    wait = WebDriverWait(browser, WAIT_S)
    # A random model scores about 0.5 everywhere; a threshold of 0.5 lets some labels beat the background, so
    # the screenshot shows colours.
    segmenter = Segmenter(tiny_model, dataclasses.replace(FAST, bg_threshold=0.5))
    with running_server(create_app(segmenter, ServerConfig())) as url:
        browser.get(url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), "composed"))

        # A bad vocabulary first: the page shows the server's one-line error.
        browser.find_element(By.ID, "file").send_keys(str(photo))
        labels = browser.find_element(By.ID, "labels")
        labels.send_keys("cat,,window")
        browser.find_element(By.ID, "submit").click()
        wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "empty" in browser.find_element(By.ID, "error").text

        labels.clear()
        labels.send_keys("cat, sofa, window")
        for toggle in ("background", "heatmaps", "attention"):
            box = browser.find_element(By.ID, toggle)
            if not box.is_selected():
                box.click()
        if browser.find_element(By.ID, "pamr").is_selected():
            browser.find_element(By.ID, "pamr").click()  # faster; PAMR is exercised by the API tests
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#legend li")) == 4)
        wait.until(lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") == 128)

        assert browser.find_element(By.ID, "result").is_displayed()
        assert not browser.find_element(By.ID, "error").is_displayed()
        names = [li.find_element(By.CLASS_NAME, "name").text for li in browser.find_elements(By.CSS_SELECTOR,
                                                                                              "#legend li")]
        assert names == ["background", "cat", "sofa", "window"]
        shares = [float(li.find_element(By.CLASS_NAME, "share").text.rstrip(" %"))
                  for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert abs(sum(shares) - 100) < 0.5
        swatch = browser.find_elements(By.CSS_SELECTOR, "#legend .swatch")[1]
        assert swatch.value_of_css_property("background-color") in ("rgba(128, 0, 0, 1)", "rgb(128, 0, 0)")
        assert browser.find_element(By.ID, "download").get_attribute("href").startswith("data:image/png;base64,")
        assert browser.find_element(By.ID, "download").get_attribute("download") == "photo_labels.png"

        # Opacity slider drives the overlay layer.
        browser.execute_script("const s = document.getElementById('opacity'); s.value = '0.8';"
                               "s.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "overlay").value_of_css_property("opacity") == "0.8"

        # Hover reads the label under the cursor from the label map.
        ActionChains(browser).move_to_element(browser.find_element(By.ID, "stage")).perform()
        wait.until(lambda d: any(n in d.find_element(By.ID, "readout").text for n in names))

        # Attention heads and per-label heat maps arrived on request.
        heads = browser.find_elements(By.CSS_SELECTOR, "#attention-grid img")
        assert len(heads) == tiny_model.backbone.model.config.num_attention_heads
        assert browser.find_element(By.ID, "attention-section").is_displayed()
        overlay_shot = tmp_path / "talk2dino-web-page.png"
        assert browser.save_screenshot(str(overlay_shot)) and overlay_shot.stat().st_size > 0
        _save_artifact(overlay_shot)

        # A legend click shows that label's heat map; the view menu switches between maps and the overlay.
        browser.find_elements(By.CSS_SELECTOR, "#legend li")[3].click()
        assert Select(browser.find_element(By.ID, "view")).first_selected_option.text == "heat map: window"
        assert browser.find_element(By.ID, "heat").is_displayed()
        assert not browser.find_element(By.ID, "overlay").is_displayed()
        Select(browser.find_element(By.ID, "view")).select_by_visible_text("heat map: sofa")
        assert "sofa" in browser.find_element(By.CSS_SELECTOR, "#legend li.selected").text
        heat_shot = tmp_path / "talk2dino-web-page-heatmap.png"
        assert browser.save_screenshot(str(heat_shot))
        _save_artifact(heat_shot)


def test_page_examples_spinner_and_labels_only_change(browser: Any, tiny_model, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One click on an example segments it with a spinner, elapsed seconds and an estimate; a labels-only
    change reuses the image's features. Screenshots: the examples, the spinner, the result with its legend."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    segmenter = Segmenter(tiny_model, dataclasses.replace(FAST, bg_threshold=0.5, pamr=False))
    original = segmenter._run_backbone

    def slow_backbone(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2.5)  # a real model takes seconds: long enough to see (and photograph) the spinner
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter, "_run_backbone", slow_backbone)

    def shot(name: str) -> None:
        path = tmp_path / name
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 0
        _save_artifact(path)

    with running_server(create_app(segmenter, ServerConfig())) as url:
        browser.get(url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), "composed"))
        assert browser.execute_script("return document.querySelector('link[rel=icon]').href").endswith("/favicon.ico")
        assert browser.find_elements(By.CSS_SELECTOR, "footer a[href='/docs']") == []
        examples = browser.find_elements(By.CSS_SELECTOR, "#examples .example")
        assert len(examples) == 2
        wait.until(lambda d: all(d.execute_script("return arguments[0].querySelector('img').naturalWidth", e) > 0
                                 for e in examples))
        shot("talk2dino-web-page-examples.png")

        examples[0].click()
        wait.until(ec.visibility_of_element_located((By.ID, "progress")))
        wait.until(lambda d: "segmenting… 1." in d.find_element(By.ID, "status").text)  # the seconds count up
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("segmenting… ") and " s" in status, status
        shot("talk2dino-web-page-spinner.png")

        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        assert not browser.find_element(By.ID, "progress").is_displayed()
        names = [li.find_element(By.CLASS_NAME, "name").text
                 for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert [n for n in names if n != "background"] == ["rocket", "smoke", "sky", "tree"]
        assert browser.find_element(By.ID, "labels").get_attribute("value") == "rocket, smoke, sky, tree"
        assert browser.find_element(By.ID, "download").get_attribute("download") == "example-rocket_labels.png"
        shot("talk2dino-web-page-example-result.png")

        # Only the labels change: the server reuses the image's features (no slow backbone pass).
        labels = browser.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys("rocket, cloud")
        started = time.monotonic()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done")
                   and "reused" in d.find_element(By.ID, "status").text)
        assert time.monotonic() - started < 2.5
        names = [li.find_element(By.CLASS_NAME, "name").text
                 for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert [n for n in names if n != "background"] == ["rocket", "cloud"]
