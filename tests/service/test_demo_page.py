"""The demo page at ``GET /``, in a real headless Chromium (Debian's ``chromium`` driven by Selenium through
``chromium-driver``) against a real server process: upload a shipped photo, see the API's top-1 on the page
and the attention overlay; upload a text file, see the API's error in words; nothing the strict
Content-Security-Policy blocks. A screenshot of each state is kept in ``build/test-artifacts/``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import ROOT, Server, running_server

from deepvit.service.web.page import CSP

PHOTO = ROOT / "tests" / "data" / "photos" / "chelsea.jpg"
ARTIFACTS = ROOT / "build" / "test-artifacts"
APT = "apt-get install chromium chromium-driver (Debian's browser and its WebDriver)"


def _require(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must provide a real browser: {name} is not installed: {APT}")
    pytest.skip(f"{name} is not installed: {APT}")


@pytest.fixture(scope="module")
def server(exported_tiny_cnn_explain: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("demo_repo")
    (repo / "tiny" / "1").mkdir(parents=True)
    shutil.copy(exported_tiny_cnn_explain, repo / "tiny" / "1" / "model.onnx")
    with running_server(repo, repo.parent / "demo_server.log") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = _require("chromium")
    driver_path = _require("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, timeout_s: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s).until(condition)


def _visible(element_id: str) -> Any:
    return lambda d: d.find_element("id", element_id).is_displayed()


def _screenshot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def test_the_page_is_served_whole_from_this_server_under_a_strict_csp(server: Server) -> None:
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP
        for asset, kind in (("/web/app.js", "javascript"), ("/web/app.css", "css")):
            r = c.get(asset)
            assert r.status_code == 200
            assert kind in r.headers["content-type"]
    assert "http://" not in page.text
    assert "https://" not in page.text  # nothing from elsewhere: it works offline


def test_uploading_a_photo_shows_the_apis_top_1_and_the_overlay(server: Server, browser: Any) -> None:
    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_element("id", "model-line").get_attribute("data-state") == "ready")
    assert "tiny" in browser.find_element("id", "model-line").text
    assert ", chosen by " in browser.find_element("id", "model-line").text  # the engine that computes, and why
    browser.find_element("id", "file").send_keys(str(PHOTO))
    _wait(browser, _visible("result"))
    _wait(browser, lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") > 0)
    _screenshot(browser, "demo-page-answer.png")

    api = httpx.post(
        server.url + "/classify?top_k=5", content=PHOTO.read_bytes(), headers={"content-type": "image/jpeg"}
    ).json()
    items = browser.find_elements("css selector", "#predictions li")
    assert len(items) == 5
    top = items[0]
    assert top.get_attribute("data-class-id") == str(api["predictions"][0]["class_id"])
    assert top.find_element("class name", "label").text == api["predictions"][0]["label"]
    assert browser.find_element("id", "overlay").is_displayed()
    assert "tiny version 1" in browser.find_element("id", "answered-by").text
    assert not browser.find_element("id", "error").is_displayed()


def test_an_error_from_the_api_is_shown_in_its_words(server: Server, browser: Any, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_element("id", "model-line").get_attribute("data-state") == "ready")
    browser.find_element("id", "file").send_keys(str(text))
    _wait(browser, _visible("error"))
    _screenshot(browser, "demo-page-error.png")
    api = httpx.post(server.url + "/explain", content=text.read_bytes(), headers={"content-type": "text/plain"})
    shown = browser.find_element("id", "error").text
    assert str(api.status_code) in shown
    assert api.json()["error"] in shown
    assert not browser.find_element("id", "result").is_displayed()


def test_the_browser_reports_no_blocked_resource_or_script_error(server: Server, browser: Any) -> None:
    browser.get_log("browser")  # reading the log empties it: what follows is this page load's only
    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_element("id", "model-line").get_attribute("data-state") == "ready")
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
