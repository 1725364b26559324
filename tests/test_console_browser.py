"""The start page and the console in a real browser: Debian's Chromium, driven by Selenium through
Debian's chromedriver, against the relay served over HTTP on 127.0.0.1 with the useapi stand-in.

Set RELAY_TEST_SCREENSHOTS=1 to rewrite docs/screenshots/*.png (the README shows them); a normal
run only looks at the pages.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from relay import create_app

from .conftest import (
    HEADERS,
    JOBS_SECRET_KEY,
    RELAY_KEY,
    allowed_host_server,
    audio_bytes,
    fast_settings,
    over_http,
)
from .fake_useapi import FakeUseapi

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
WAIT = 30  # generous: the machine may be busy; a condition met early returns at once

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """The relay over HTTP with two jobs made through the API: one ready, one failed."""
    fake = FakeUseapi("useapi-token-for-tests-9876543210").start()
    with allowed_host_server() as audio:
        audio.expect_request("/my-voice.wav").respond_with_data(audio_bytes("wav_pcm16_mono.wav"))
        audio.expect_request("/share/page.html").respond_with_data(
            "<html><body>Sign in to see this file</body></html>", content_type="text/html"
        )
        settings = fast_settings(
            fake.base_url,
            tmp_path_factory.mktemp("relay") / "data",
            secret_key=JOBS_SECRET_KEY,
            useapi_token="useapi-token-for-tests-9876543210",
        )
        app = create_app(settings)
        try:
            with over_http(app) as base:
                ready = _clone(base, {"audio_url": audio.url_for("/my-voice.wav"), "name": "Narrator (ready)"})
                failed = _clone(base, {"audio_url": audio.url_for("/share/page.html"), "name": "Podcast intro"})
                assert ready["status"] == "ready" and failed["error_code"] == "not_audio"
                yield {"base": base, "ready": ready, "failed": failed, "audio": audio, "fake": fake}
        finally:
            app.extensions["relay.runtime"].close(timeout=5)
            fake.stop()


def _clone(base: str, body: dict) -> dict:
    headers = {"Authorization": HEADERS["Authorization"]}
    return requests.post(f"{base}/v1/voice-clones", json=body, headers=headers, timeout=30).json()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see CSP violations
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition):
    return WebDriverWait(driver, WAIT).until(condition)


def sign_in(driver, base: str, key: str = RELAY_KEY) -> None:
    driver.get(base + "/console/login")
    if "/console/login" not in driver.current_url:  # already signed in
        return
    field = wait_for(driver, EC.element_to_be_clickable((By.ID, "key")))
    field.clear()
    field.send_keys(key)
    button = driver.find_element(By.ID, "sign-in")
    button.click()
    if key == RELAY_KEY:  # wait for the page the login leads to: a navigation before it lands would be undone
        wait_for(
            driver,
            lambda d: (
                "/console/login" not in d.current_url and d.execute_script("return document.readyState") == "complete"
            ),
        )
    else:
        wait_for(driver, EC.staleness_of(button))  # the refusal's page has replaced the form


def sign_out(driver, base: str) -> None:
    driver.get(base + "/console")
    if "/console/login" in driver.current_url:
        return
    wait_for(driver, EC.element_to_be_clickable((By.ID, "logout"))).click()
    wait_for(driver, EC.url_contains("/console/login"))


def screenshot(driver, name: str, width: int = 1280) -> None:
    """The whole page as docs/screenshots/<name>.png, only when RELAY_TEST_SCREENSHOTS is set."""
    if not os.environ.get("RELAY_TEST_SCREENSHOTS"):
        return
    driver.set_window_size(width, 900)  # the page's height at this width
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height, 600), 4000) + 140)  # window chrome above the page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def test_the_start_page_tells_how_to_connect_with_this_relays_address(browser, relay):
    base = relay["base"]
    browser.get(base + "/")
    wait_for(browser, EC.visibility_of_element_located((By.ID, "relay-url")))
    assert browser.find_element(By.ID, "relay-url").text == base
    assert browser.find_element(By.ID, "n8n-url").get_attribute("textContent") == base + "/v1/voice-clones"
    assert "running" in browser.find_element(By.ID, "health-title").find_element(By.XPATH, "..").text
    assert RELAY_KEY not in browser.page_source
    screenshot(browser, "start-page")
    # The copy button works without inline script (the page's CSP forbids it).
    button = browser.find_element(By.CSS_SELECTOR, "button[data-copy='relay-url']")
    button.click()
    # Copied to the clipboard, or (where the browser refuses the clipboard) selected for Ctrl+C.
    wait_for(
        browser,
        lambda d: button.text == "Copied" or d.execute_script("return String(window.getSelection())") == base,
    )
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]


def test_every_console_page_sends_a_browser_without_a_session_to_the_login(browser, relay):
    base = relay["base"]
    sign_out(browser, base)
    for path in ("/console", f"/console/clones/{relay['failed']['job_id']}", "/console/voices", "/console/try"):
        browser.get(base + path)
        wait_for(browser, EC.url_contains("/console/login"))
        assert browser.find_element(By.ID, "key").get_attribute("type") == "password"
        assert "Podcast intro" not in browser.page_source and "not_audio" not in browser.page_source


def test_a_wrong_key_is_refused_then_the_right_key_signs_in(browser, relay):
    base = relay["base"]
    sign_out(browser, base)
    sign_in(browser, base, "not-the-relay-key")
    error = wait_for(browser, EC.visibility_of_element_located((By.ID, "login-error")))
    assert "not this relay's key" in error.text
    screenshot(browser, "login")
    field = browser.find_element(By.ID, "key")  # the keyboard alone signs in: type, then Enter
    field.send_keys(RELAY_KEY + Keys.ENTER)
    wait_for(browser, EC.title_contains("Recent clones"))


def test_the_list_shows_the_clones_made_through_the_api(browser, relay):
    base = relay["base"]
    sign_in(browser, base)
    browser.get(base + "/console")
    table = wait_for(browser, EC.visibility_of_element_located((By.CSS_SELECTOR, "table.clones")))
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    texts = [row.text for row in rows]
    assert len(rows) >= 2
    failed_row = next(t for t in texts if "Podcast intro" in t)
    ready_row = next(t for t in texts if "Narrator (ready)" in t)
    assert "failed" in failed_row and "not_audio" in failed_row and "127.0.0.2" in failed_row
    assert "ready" in ready_row and "server token" in ready_row
    screenshot(browser, "clones")
    screenshot(browser, "clones-phone", width=400)


def test_the_failed_job_page_shows_its_error_next_step_and_timeline(browser, relay):
    base = relay["base"]
    sign_in(browser, base)
    browser.get(base + "/console")
    wait_for(browser, EC.element_to_be_clickable((By.XPATH, "//tr[contains(., 'Podcast intro')]//a"))).click()
    problem = wait_for(browser, EC.visibility_of_element_located((By.ID, "problem-title")))
    assert "not_audio" in problem.text
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "What to do:" in page and "The link gave a web page" in page
    steps = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "ol.timeline li")]
    assert any("Received" in s for s in steps) and any("Download started" in s for s in steps)
    assert "Failed" in steps[-1] and "not_audio" in steps[-1]
    assert '"error_code": "not_audio"' in browser.find_element(By.ID, "answer-json").text
    assert "$RELAY_API_KEY" in browser.find_element(By.ID, "curl").text
    screenshot(browser, "job-failed")
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background != "rgb(247, 247, 245)"  # the dark palette applies
        screenshot(browser, "job-failed-dark")
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_a_dry_run_from_the_form_checks_the_link_without_uploading(browser, relay):
    base = relay["base"]
    uploads = relay["fake"].upload_count()
    sign_in(browser, base)
    browser.get(base + "/console/try")
    assert wait_for(browser, EC.presence_of_element_located((By.ID, "t-dry"))).is_selected()  # dry run by default
    browser.find_element(By.ID, "t-url").send_keys(relay["audio"].url_for("/my-voice.wav"))
    browser.find_element(By.ID, "t-name").send_keys("Checked link")
    browser.find_element(By.ID, "try-submit").click()
    words = wait_for(browser, EC.visibility_of_element_located((By.ID, "plain-words")))
    assert "Dry run: the file is valid WAV" in words.text and "Nothing was uploaded" in words.text
    assert '"status": "validated"' in browser.find_element(By.ID, "try-answer").text
    assert relay["fake"].upload_count() == uploads
    screenshot(browser, "try-a-clone")


def test_a_double_click_on_send_makes_one_paid_clone(browser, relay):
    base, fake = relay["base"], relay["fake"]
    uploads = fake.upload_count()
    sign_in(browser, base)
    browser.get(base + "/console/try")
    wait_for(browser, EC.element_to_be_clickable((By.ID, "t-dry"))).click()  # dry run off: a real clone
    browser.find_element(By.ID, "t-url").send_keys(relay["audio"].url_for("/my-voice.wav"))
    browser.find_element(By.ID, "t-name").send_keys("Clicked twice")
    fake.upload_delay = 1.0  # the page is still loading when the second click comes
    try:
        disabled = browser.execute_script(
            "var b = document.getElementById('try-submit'); b.click(); var d = b.disabled; b.click(); return d;"
        )
        words = wait_for(browser, EC.visibility_of_element_located((By.ID, "plain-words")))
    finally:
        fake.upload_delay = 0.0
    assert disabled is True and words.text
    assert fake.upload_count() == uploads + 1


def test_the_list_refresh_waits_while_someone_uses_the_page(browser, relay):
    base, fake = relay["base"], relay["fake"]
    fake.upload_delay = 15.0  # a clone that runs while the list is open
    try:
        body = {"audio_url": relay["audio"].url_for("/my-voice.wav"), "name": "Still running", "wait_seconds": 0}
        running = _clone(base, body)
        assert running["status"] in ("queued", "running"), running
        sign_in(browser, base)
        browser.get(base + "/console")
        wait_for(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "body[data-refresh]")))
        # Focus on a link (keyboard use): the 5 s refresh leaves the page alone.
        link = "main a[href^='/console/clones/']"
        browser.execute_script(f'window.marker = 1; document.querySelector("{link}").focus();')
        time.sleep(6.5)
        assert browser.execute_script("return window.marker") == 1
        # Nobody using it: it refreshes.
        browser.execute_script("document.activeElement.blur();")
        wait_for(browser, lambda driver: driver.execute_script("return window.marker") is None)
    finally:
        fake.upload_delay = 0.0


def test_the_voices_page_lists_and_deletes_after_confirmation(browser, relay):
    base = relay["base"]
    sign_in(browser, base)
    browser.get(base + "/console/voices")
    wait_for(browser, EC.visibility_of_element_located((By.ID, "voices-account")))  # the voices page, listed
    cell = wait_for(browser, EC.visibility_of_element_located((By.XPATH, "//td[contains(., 'Narrator (ready)')]")))
    assert cell.is_displayed()
    screenshot(browser, "voices")
    voice = relay["ready"]["cloned_voice_item_id"]
    row = browser.find_element(By.XPATH, f"//tr[contains(., '{voice}')]")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    confirm = wait_for(browser, EC.element_to_be_clickable((By.ID, "confirm-delete")))
    assert voice in browser.page_source and voice in relay["fake"].voices  # asked first, nothing deleted yet
    confirm.click()
    notice = wait_for(browser, EC.visibility_of_element_located((By.CSS_SELECTOR, "p.notice")))
    assert f"Deleted {voice}" in notice.text and voice not in relay["fake"].voices


def test_every_page_fits_a_phone_screen(browser, relay):
    base = relay["base"]
    sign_in(browser, base)
    pages = ("/", "/console", f"/console/clones/{relay['failed']['job_id']}", "/console/try", "/console/voices")
    browser.set_window_size(400, 850)
    try:
        for path in pages:
            browser.get(base + path)
            wait_for(browser, EC.presence_of_element_located((By.TAG_NAME, "footer")))
            assert browser.execute_script("return window.innerWidth") <= 420  # a phone's width, really
            width = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert width <= 0, f"{path} scrolls sideways by {width} px on a phone"
    finally:
        browser.set_window_size(1280, 900)


def test_sign_out_ends_the_session(browser, relay):
    base = relay["base"]
    sign_in(browser, base)
    browser.get(base + "/console")
    wait_for(browser, EC.element_to_be_clickable((By.ID, "logout"))).click()
    wait_for(browser, EC.url_contains("/console/login"))
    assert "You are signed out" in browser.page_source
    browser.get(base + "/console")
    try:
        wait_for(browser, EC.url_contains("/console/login"))
    except TimeoutException:  # pragma: no cover - the assertion below says what was shown instead
        pass
    assert "/console/login" in browser.current_url
