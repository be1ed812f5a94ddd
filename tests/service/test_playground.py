"""GET /playground: its routes and key policy over HTTP, then the page itself driven in headless Chromium against
a real server on the default registry (skipped where selenium or a Chromium with its chromedriver is missing).

`LOGITFUSE_PLAYGROUND_SHOT=docs/playground.png` also saves the README's screenshot (1280x800)."""

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from logitfuse.service.app import create_app, start_in_thread

ROOT = Path(__file__).resolve().parents[2]
KEY = "playground-test-key"
QUESTION = "what is the capital of ludu ?"


def test_routes_open_without_a_key_and_the_api_behind_it(config_file):
    with TestClient(create_app(config_file, [KEY])) as c:
        page = c.get("/playground")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
            r = c.get(f"/playground/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
            assert "http" not in r.text  # nothing from elsewhere: works offline
            assert f'"/playground/{name}"' in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere: works offline
        assert c.get("/v1/models").status_code == 401
        assert c.get("/playground/other.js").status_code == 401  # only the page's own paths are open
        auth = {"Authorization": f"Bearer {KEY}"}
        missing = c.get("/playground/other.js", headers=auth)
        assert missing.status_code == 404 and "playground.js" in missing.json()["error"]["message"]
        assert c.get("/playground/..%2Fapp.py", headers=auth).status_code == 404


def test_playground_false_leaves_the_routes_out(config_file, tmp_path):
    cfg = tmp_path / "off.yaml"
    cfg.write_text(config_file.read_text().replace("server: {", "server: {playground: false, "))
    with TestClient(create_app(cfg)) as c:
        assert c.get("/playground").status_code == 404
        assert c.get("/playground/playground.js").status_code == 404
        assert c.get("/health").status_code == 200


def _browser():
    """A headless Chromium (1280x800) through the system chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install -e .[browser])")
    from selenium.webdriver.chrome.service import Service

    chromium = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium with chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--force-device-scale-factor=1"]:
        opts.add_argument(arg)
    try:
        browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except Exception as err:  # e.g. a chromedriver of another major version than the browser
        pytest.skip(f"Chromium did not start under {driver}: {str(err).splitlines()[0]}")
    # the window's size includes the browser's frame: the page itself gets exactly 1280x800
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    return browser


@pytest.fixture(scope="module")
def page():
    """The playground of a real server on the default registry, with an API key, open in headless Chromium."""
    browser = _browser()
    url, server = start_in_thread(ROOT / "configs" / "default.yaml", keys=[KEY], timeout=180)
    try:
        browser.get(f"{url}/playground")
        yield browser
    finally:
        browser.quit()
        server.should_exit = True


def _ask(browser, model: str, prompt: str, max_tokens: int, timeout: float = 120) -> dict:
    """Fill the form, submit, wait for both columns to end; their states and texts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    for field, value in [("prompt", prompt), ("max_tokens", str(max_tokens)), ("temperature", "0")]:
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.find_element(By.ID, "submit").click()
    done = ("done", "error", "stopped")
    WebDriverWait(browser, timeout).until(
        lambda b: all(b.find_element(By.ID, c).get_attribute("data-state") in done for c in ("base", "fused")))
    return {c: (browser.find_element(By.ID, c).get_attribute("data-state"),
                browser.find_element(By.ID, f"{c}-out").text) for c in ("base", "fused")}


def _hover_strongest(browser):
    """Hover the fused token fusion moved most; its span, its shift and the open tooltip."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spans = browser.find_elements(By.CSS_SELECTOR, "#fused-out .tok.coloured")
    assert spans, "no coloured token in the fused column"
    span = max(spans, key=lambda s: abs(float(s.get_attribute("data-shift"))))
    ActionChains(browser).move_to_element(span).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 5).until(lambda b: tip.is_displayed())
    return span, float(span.get_attribute("data-shift")), tip


def test_the_page_answers_beside_the_base_with_coloured_tokens(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = page.find_element(By.ID, "status")
    WebDriverWait(page, 30).until(lambda b: "401" in status.text)  # no key yet: the page says so
    assert not page.find_elements(By.CSS_SELECTOR, "#model option")
    page.find_element(By.ID, "key").send_keys(KEY)
    page.find_element(By.ID, "prompt").click()  # leaving the key field lists the models with it
    result = _ask(page, "large-qa", QUESTION, 8)
    assert result["base"][0] == "done" and result["fused"][0] == "done", result
    fused, base = result["fused"][1], result["base"][1]
    assert fused.split()[0] == "tizen", fused
    assert base.split()[:2] == ["tizen", "."], base  # the base alone knows it, in its pretraining style

    span, shift, tip = _hover_strongest(page)
    assert abs(shift) >= 0.01
    head = tip.find_element(By.CSS_SELECTOR, "p.head").text
    assert head.endswith(f"shift {shift:+.2f}"), head  # the tooltip is the hovered token's
    tables = tip.find_elements(By.CSS_SELECTOR, "table.alts")
    assert [t.find_element(By.TAG_NAME, "caption").text for t in tables] == ["fused top", "base top"]
    fused_rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                  for tr in tables[0].find_elements(By.TAG_NAME, "tr")]
    base_rows = tables[1].find_elements(By.TAG_NAME, "tr")
    assert len(fused_rows) >= 2 and len(base_rows) >= 2  # alternatives, not just the chosen token
    chosen = json.loads(fused_rows[0][0])  # temperature 0: the fused top-1 is the token taken
    assert (span.text or span.get_attribute("data-mark")) == chosen.strip()  # an end token shows its name
    assert "chosen" in tables[0].find_element(By.TAG_NAME, "tr").get_attribute("class")
    percents = [float(r[2].rstrip("%")) for r in fused_rows]
    assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.05
    assert "push" in tip.text  # the expert's push on that token

    shot = os.environ.get("LOGITFUSE_PLAYGROUND_SHOT")
    if shot:
        _screenshot(page, ROOT / shot)


def _screenshot(browser, path: Path) -> None:
    """The README's picture: a longer fused answer (large-desc), its most moved token's tooltip open."""
    result = _ask(browser, "large-desc", "tell me about folon .", 40)
    assert result["fused"][0] == "done", result
    browser.execute_script("window.scrollTo(0, 0)")
    _hover_strongest(browser)
    browser.save_screenshot(str(path))


def test_a_bad_request_shows_its_error_and_the_page_recovers(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "alpha").send_keys("1000")  # beyond the coefficient limit: a 400 for the fused column
    try:
        result = _ask(page, "large-qa", QUESTION, 8)
    finally:
        page.find_element(By.ID, "alpha").clear()
    assert result["fused"][0] == "error" and "400" in result["fused"][1] and "alpha" in result["fused"][1]
    assert result["base"][0] == "done" and result["base"][1].split()[0] == "tizen"
    again = _ask(page, "large-qa", QUESTION, 8)
    assert again["fused"][0] == "done" and again["fused"][1].split()[0] == "tizen"
    assert httpx.get(page.current_url.replace("/playground", "/health"), timeout=5).status_code == 200
