"""The start page and the console over real HTTP (no browser): who gets in, what the headers and
cookies say, CSRF, the login rate limit, and what the console shows about jobs made via the API.

tests/test_console_browser.py drives the same pages in Chromium.
"""

from __future__ import annotations

import html
import re
import time
from datetime import timedelta
from pathlib import Path

import flask
import pytest
import requests
from werkzeug import Request, Response

from relay import db, events, history
from relay.errors import all_error_classes
from relay.jobs import JobStore
from relay.next_steps import NEXT_STEPS
from relay.web.security import LoginLimiter

from .conftest import (
    AUDIO,
    HEADERS,
    JOBS_SECRET_KEY,
    RELAY_KEY,
    TOKEN,
    fast_settings,
    over_http,
    serve_file,
    wait_until,
)

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
JOB_ID = "0" * 32
ROOT = Path(__file__).resolve().parent.parent
# Every console URL, with a method a client would use on it.
CONSOLE_URLS = [
    ("GET", "/console"),
    ("GET", "/console?status=failed&page=2"),
    ("GET", f"/console/clones/{JOB_ID}"),
    ("POST", f"/console/clones/{JOB_ID}/resend-callback"),
    ("GET", "/console/voices"),
    ("POST", "/console/voices"),
    ("GET", "/console/try"),
    ("POST", "/console/try"),
    ("POST", "/console/logout"),
]


class Console:
    """A browser-like client of the console: keeps cookies, reads CSRF tokens from the pages."""

    def __init__(self, base: str):
        self.base = base
        self.http = requests.Session()
        self.http.headers.update(BROWSER)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(self.base + path, timeout=30, **kwargs)

    def post(self, path: str, data: dict, csrf: bool = True, **kwargs) -> requests.Response:
        if csrf:
            data = {"csrf_token": self.csrf_token(), **data}
        return self.http.post(self.base + path, data=data, timeout=60, **kwargs)

    def csrf_token(self) -> str:
        page = self.get("/console/try")  # without a session this lands on the login form, which has one too
        return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)

    def job_path(self, name: str) -> str:
        """The console path of the newest job named ``name``, from the list."""
        page = self.get("/console", params={"name": name}).text
        return re.search(r'href="(/console/clones/[0-9a-f]{32})"', page).group(1)

    def login(self, key: str = RELAY_KEY) -> requests.Response:
        return self.post("/console/login", {"key": key, "next": "/console"})


@pytest.fixture
def served(make_app, job_settings):
    """The relay over HTTP, once per database (for what reads jobs)."""
    app = make_app(job_settings)
    with over_http(app) as base:
        yield app, base


@pytest.fixture
def web(make_app, fake, tmp_path):
    """The relay over HTTP on SQLite alone (for what does not depend on the database)."""
    settings = fast_settings(fake.base_url, tmp_path / "data", secret_key=JOBS_SECRET_KEY)
    with over_http(make_app(settings)) as base:
        yield base


@pytest.fixture
def console(served):
    client = Console(served[1])
    client.app = served[0]
    assert client.login().status_code == 200
    return client


@pytest.fixture
def web_console(web):
    client = Console(web)
    assert client.login().status_code == 200
    return client


def make_jobs(base: str, audio_host, **extra) -> dict[str, dict]:
    """One ready clone and one failed clone (a web page instead of audio), made through the API."""
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/voice.wav")
    audio_host.expect_request("/page.html").respond_with_data("<html>not audio</html>", content_type="text/html")
    ready = requests.post(
        f"{base}/v1/voice-clones", json={"audio_url": url, "name": "Ready voice", **extra}, headers=HEADERS, timeout=30
    ).json()
    failed = requests.post(
        f"{base}/v1/voice-clones",
        json={"audio_url": audio_host.url_for("/page.html"), "name": "Broken voice"},
        headers=HEADERS,
        timeout=30,
    ).json()
    assert ready["status"] == "ready" and failed["error_code"] == "not_audio"
    return {"ready": ready, "failed": failed}


# --- the start page -------------------------------------------------------------------------


def test_the_start_page_is_html_for_browsers_and_json_for_api_clients(web):
    base = web
    page = requests.get(base + "/", headers=BROWSER, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert f"{base}/v1/voice-clones" in page.text  # the setup guide names this relay's own address
    assert "Make" in page.text and "Zapier" in page.text and "n8n" in page.text
    assert RELAY_KEY not in page.text and TOKEN not in page.text
    assert "waits up to 20 s" in page.text  # this relay's RELAY_MAX_WAIT_SECONDS, not Make's 280
    # Every connector file the guide names exists, each path a newcomer needs is named, and the second
    # module holding the blueprint's key placeholder is named as the blueprint names it.
    named = set(re.findall(r"<code>((?:make|zapier|n8n)/[\w/.-]+\.json)</code>", page.text))
    assert all((ROOT / "connector_spec" / path).is_file() for path in named), named
    assert {"make/blueprints/drive-file-to-cloned-voice.json", "n8n/clone-voice-from-binary.json"} <= named
    blueprint = (ROOT / "connector_spec/make/blueprints/drive-folder-to-cloned-voice.json").read_text()
    assert '"name": "Read the clone job again' in blueprint and "<em>Read the clone job again</em>" in page.text
    for accept in ("*/*", "application/json", None):
        answer = requests.get(base + "/", headers={"Accept": accept} if accept else {}, timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
        assert answer.json()["ok"] is True and answer.json()["clone_url"] == f"{base}/v1/voice-clones"


def test_every_page_and_asset_carries_the_content_security_policy(web_console):
    for path in ("/", "/assets/relay.css", "/assets/relay.js", "/console/login", "/console", "/console/try"):
        response = web_console.get(path)
        assert response.status_code == 200, path
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = web_console.get("/console").text
    assert "<script>" not in page and " style=" not in page  # no inline code for the policy to block
    assert "http://" not in re.sub(r"http://127\.0\.0\.1:\d+", "", page) and "https://" not in page


# --- who gets in ----------------------------------------------------------------------------


def test_without_a_session_browsers_go_to_the_login_and_api_clients_get_401(web):
    for method, path in CONSOLE_URLS:
        browser = requests.request(method, web + path, headers=BROWSER, allow_redirects=False, timeout=10)
        assert browser.status_code == 303, path
        assert browser.headers["Location"].startswith("/console/login?next="), path
        api = requests.request(method, web + path, headers=HEADERS, allow_redirects=False, timeout=10)
        assert api.status_code == 401 and api.json()["error_code"] == "unauthorized", path
        forged = requests.request(
            method, web + path, headers=HEADERS, cookies={"relay_console": "eyJhdCI6MX0.forged.sig"}, timeout=10
        )
        assert forged.status_code == 401, path


def test_a_wrong_key_is_refused_and_the_right_key_opens_a_session(web):
    base = web
    client = Console(base)
    wrong = client.login("not-the-key")
    assert wrong.status_code == 401 and "not this relay" in wrong.text
    assert client.get("/console", allow_redirects=False).status_code == 303
    right = client.login()
    assert right.status_code == 200 and right.url == base + "/console"
    assert "Recent clones" in right.text


def test_the_session_cookie_is_httponly_samesite_and_secure_behind_https(web):
    base = web
    client = Console(base)
    response = client.post("/console/login", {"key": RELAY_KEY}, allow_redirects=False)
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain HTTP on loopback
    # Behind Heroku's or Render's TLS proxy (X-Forwarded-Proto: https) the cookie is Secure.
    response = requests.get(base + "/console/login", headers={**BROWSER, "X-Forwarded-Proto": "https"}, timeout=10)
    assert "Secure" in response.headers["Set-Cookie"] and "HttpOnly" in response.headers["Set-Cookie"]


def test_forms_without_the_csrf_token_are_refused(web_console):
    for path in ("/console/logout", "/console/try", f"/console/clones/{JOB_ID}/resend-callback"):
        for token in (None, "wrong-token"):
            data = {"csrf_token": token} if token else {}
            response = web_console.post(path, data, csrf=False, headers={"Accept": "application/json"})
            assert response.status_code == 403 and response.json()["error_code"] == "csrf_failed", path
    assert web_console.get("/console").status_code == 200  # still signed in: the refused logout did nothing
    fresh = Console(web_console.base)
    fresh.get("/console/login")
    refused = fresh.post("/console/login", {"key": RELAY_KEY}, csrf=False)
    assert refused.status_code == 403 and "csrf_failed" in refused.text


def test_failed_logins_are_rate_limited_per_client(web):
    base = web
    client = Console(base)
    for _ in range(LoginLimiter.MAX_FAILURES):
        assert client.login("wrong").status_code == 401
    limited = client.post("/console/login", {"key": RELAY_KEY}, headers={"Accept": "application/json"})
    assert limited.status_code == 429 and limited.json()["error_code"] == "login_rate_limited"
    as_page = client.post("/console/login", {"key": RELAY_KEY})  # a browser sees no Retry-After header
    assert as_page.status_code == 429 and re.search(r"Try again in (about \d+ minutes|\d+ seconds)", as_page.text)
    assert 0 < int(limited.headers["Retry-After"]) <= LoginLimiter.WINDOW_SECONDS + 1
    other = Console(base)  # another client behind the same proxy
    other.http.headers["X-Forwarded-For"] = "203.0.113.9"
    assert other.login().status_code == 200


def test_a_pasted_key_with_spaces_around_it_signs_in_as_the_api_takes_it(web):
    client = Console(web)
    assert client.login(f"  {RELAY_KEY} ").status_code == 200 and client.get("/console").status_code == 200
    assert requests.get(f"{web}/v1/auth", headers={"Authorization": f"Bearer {RELAY_KEY} "}, timeout=10).ok


def test_a_client_inventing_x_forwarded_for_is_still_limited_per_connecting_address(web):
    # Straight to the relay (relay serve, a container, a VM): the header is the client's own words.
    guesser = Console(web)
    answers = []
    for n in range(LoginLimiter.MAX_PER_ADDRESS + 5):
        guesser.http.headers["X-Forwarded-For"] = f"198.51.100.{n}"
        answers.append(guesser.login(f"wrong-{n}").status_code)
    assert answers[: LoginLimiter.MAX_PER_ADDRESS] == [401] * LoginLimiter.MAX_PER_ADDRESS
    assert set(answers[LoginLimiter.MAX_PER_ADDRESS :]) == {429}
    guesser.http.headers["X-Forwarded-For"] = "198.51.100.250"
    assert guesser.login().status_code == 429  # the right key waits too: no guessing past the limit


def test_behind_heroku_or_renders_router_strangers_cannot_lock_the_owner_out():
    """There every request connects from the router: 25 wrong keys from anyone would have locked
    everyone out for 5 minutes. Each client is counted on its own there."""
    app = flask.Flask(__name__)
    routed, direct = LoginLimiter(behind_router=True), LoginLimiter()
    for n in range(LoginLimiter.MAX_PER_ADDRESS + 5):
        stranger = {"X-Forwarded-For": f"198.51.100.{n}"}
        with app.test_request_context(headers=stranger, environ_base={"REMOTE_ADDR": "10.1.2.3"}):
            routed.failed()
            direct.failed()
    owner = {"X-Forwarded-For": "203.0.113.7"}
    with app.test_request_context(headers=owner, environ_base={"REMOTE_ADDR": "10.1.2.3"}):
        assert routed.retry_after() == 0
        assert direct.retry_after() > 0  # straight to the relay: the header is the client's own words


def test_logout_ends_the_session(web_console):
    response = web_console.post("/console/logout", {})
    assert response.status_code == 200 and response.url.endswith("/console/login?notice=signed_out")
    assert web_console.get("/console", allow_redirects=False).status_code == 303


def test_without_a_relay_key_the_console_is_off(make_app, fake, tmp_path):
    app = make_app(fast_settings(fake.base_url, tmp_path / "data", relay_api_key=None))
    with over_http(app) as base:
        for path in ("/console", "/console/login", f"/console/clones/{JOB_ID}"):
            page = requests.get(base + path, headers=BROWSER, timeout=10)
            assert page.status_code == 403 and "The console is off" in page.text
            api = requests.get(base + path, timeout=10)
            assert api.status_code == 401 and api.json()["error_code"] == "unauthorized"
        assert requests.post(base + "/console/login", data={"key": ""}, timeout=10).status_code == 401


# --- what the console shows -----------------------------------------------------------------


def test_the_list_shows_jobs_made_through_the_api_and_filters_them(console, audio_host):
    made = make_jobs(console.base, audio_host)
    page = console.get("/console").text
    assert "Ready voice" in page and "Broken voice" in page and "not_audio" in page
    assert page.index("Broken voice") < page.index("Ready voice")  # newest first
    assert "127.0.0.2" in page and "…" + TOKEN[-4:] in page  # source host, token fingerprint
    failed_only = console.get("/console?status=failed").text
    assert "Broken voice" in failed_only and "Ready voice" not in failed_only
    by_code = console.get("/console?error_code=not_audio").text
    assert "Broken voice" in by_code and "Ready voice" not in by_code
    by_name = console.get("/console?name=READY").text
    assert "Ready voice" in by_name and "Broken voice" not in by_name
    assert made["ready"]["job_id"] in page


def test_the_list_refreshes_itself_while_a_clone_runs(web_console, audio_host, fake):
    fake.ready_after_polls = 10_000  # useapi keeps "processing" for the whole test
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/slow.wav")
    body = {"audio_url": url, "name": "Still cloning", "wait_seconds": 0}
    requests.post(f"{web_console.base}/v1/voice-clones", json=body, headers=HEADERS, timeout=30)
    assert 'data-refresh="5"' in web_console.get("/console").text
    page = wait_until(
        lambda: "Readiness poll" in (p := web_console.get(web_console.job_path("Still cloning"))).text and p
    )
    assert "processing" in page.text
    assert 'data-refresh="5"' not in web_console.get("/console?status=failed").text


def test_history_pages_newest_first(job_settings, console, audio_host):
    make_jobs(console.base, audio_host)
    make_jobs(console.base, audio_host)
    engine = db.connect(db.database_url(job_settings.database_url, job_settings.data_dir))
    try:
        first = history.recent(engine, per_page=3)
        second = history.recent(engine, per_page=3, page=2)
        assert len(first.jobs) == 3 and first.has_next and len(second.jobs) == 1 and not second.has_next
        assert [j.created_at for j in first.jobs + second.jobs] == sorted(
            (j.created_at for j in first.jobs + second.jobs), reverse=True
        )
        assert history.error_codes(engine) == ["not_audio"]
        assert {j.request["name"] for j in history.recent(engine, name="50%_voice").jobs} == set()
    finally:
        engine.dispose()


@pytest.mark.parametrize("page", ["9223372036854775807", "99999999999999999999999", "-3", "two"])
def test_any_page_number_is_a_page_never_a_server_error(web_console, page):
    response = web_console.get(f"/console?page={page}")
    assert response.status_code == 200 and "text/html" in response.headers["Content-Type"]


def test_a_failed_job_page_shows_the_error_the_next_step_and_the_timeline(console, audio_host):
    made = make_jobs(console.base, audio_host)
    failed = console.get(f"/console/clones/{made['failed']['job_id']}").text
    assert "not_audio" in failed and "What to do" in failed
    assert "The link gave a web page" in failed  # the README's next step for not_audio
    for label in ("Received", "Download started", "Failed"):
        assert label in failed
    ready = console.get(f"/console/clones/{made['ready']['job_id']}").text
    for label in ("Received", "Download started", "Downloaded", "Audio validated", "Upload started", "Upload answered"):
        assert label in ready, label
    assert made["ready"]["cloned_voice_item_id"] in ready  # the full answer, as JSON
    assert "$RELAY_API_KEY" in ready and RELAY_KEY not in ready and TOKEN not in ready


def test_a_lost_upload_answer_and_its_reconciliation_are_on_the_timeline(make_app, fake, audio_host, tmp_path):
    fake.upload_delay = 1.0  # useapi takes the file, but its answer comes after the relay gave up
    settings = fast_settings(fake.base_url, tmp_path / "data", secret_key=JOBS_SECRET_KEY, upload_timeout=0.3)
    with over_http(make_app(settings)) as base:
        url = serve_file(audio_host, "wav_pcm16_mono.wav", "/lost.wav")
        body = {"audio_url": url, "name": "Lost answer"}
        answer = requests.post(f"{base}/v1/voice-clones", json=body, headers=HEADERS, timeout=30).json()
        assert answer["status"] == "ready" and fake.upload_count() == 1
        client = Console(base)
        client.login()
        page = client.get(f"/console/clones/{answer['job_id']}").text
    for seen in ("Upload started", "Upload failed", "answer lost", "Reconciliation", "found and adopted", "Ready"):
        assert seen in page, seen


def test_events_and_the_curl_never_carry_secrets_from_urls(web_console, audio_host):
    serve_file(audio_host, "wav_pcm16_mono.wav", "/signed.wav")
    audio_host.expect_request("/hook", method="POST").respond_with_data("", status=200)
    url = audio_host.url_for("/signed.wav") + "?dl=0&X-Amz-Signature=s3cr3tsig&token=t0ken"
    answer = requests.post(
        f"{web_console.base}/v1/voice-clones",
        json={"audio_url": url, "name": "Signed", "callback_url": audio_host.url_for("/hook") + "?signature=abc123"},
        headers=HEADERS,
        timeout=30,
    ).json()
    page = web_console.get(f"/console/clones/{answer['job_id']}").text
    assert "dl=0" in page
    for secret in ("s3cr3tsig", "t0ken", "abc123"):
        assert secret not in page
    assert events.scrub("GET https://h.example/a?sig=x failed") == "GET https://h.example/a failed"


def _curl_of(console: Console, job_id: str) -> tuple[str, str]:
    page = console.get(f"/console/clones/{job_id}").text
    return html.unescape(re.search(r'<pre id="curl">(.*?)</pre>', page, re.DOTALL).group(1)), page


@pytest.mark.parametrize("sealed", [True, False], ids=["secret_key", "no_secret_key"])
def test_the_curl_of_an_ended_job_repeats_its_links_whole_or_says_what_was_not_kept(
    make_app, fake, audio_host, tmp_path, sealed
):
    # A share link's query is the link (Drive's id, Dropbox's rlkey): the repeat needs it, masked
    # only where a parameter looks secret; kept sealed (RELAY_SECRET_KEY) once the job is done.
    settings = fast_settings(fake.base_url, tmp_path / "data", secret_key=JOBS_SECRET_KEY if sealed else None)
    serve_file(audio_host, "wav_pcm16_mono.wav", "/share")
    audio_host.expect_request("/hook", method="POST").respond_with_data("", status=200)
    link = audio_host.url_for("/share") + "?id=1AbCdEf&rlkey=k9x8&X-Amz-Signature=s3cr3t"
    hook = audio_host.url_for("/hook") + "?signature=abc123&row=7&code=AzFuncKey9s3cr3t&hm=9f3cdead"
    body = {"audio_url": link, "name": "Shared", "convert": "never", "callback_url": hook, "wait_seconds": 20}
    with over_http(make_app(settings)) as base:
        answer = requests.post(f"{base}/v1/voice-clones", json=body, headers=HEADERS, timeout=30).json()
        assert answer["status"] == "ready", answer
        console = Console(base)
        console.login()
        wait_until(lambda: "delivered" in console.get(f"/console/clones/{answer['job_id']}").text)
        curl, page = _curl_of(console, answer["job_id"])
    assert '"convert": "never"' in curl
    for secret in ("s3cr3t", "abc123", "9f3cdead"):
        assert secret not in page
    if sealed:
        assert "id=1AbCdEf&rlkey=****&X-Amz-Signature=****" in curl
        assert "signature=****&row=7&code=****&hm=****" in curl
        assert "?…" not in curl
    else:
        assert audio_host.url_for("/share") + "?…" in curl and audio_host.url_for("/hook") + "?…" in curl
        assert "lost its query" in page


def test_the_curl_of_a_job_that_received_a_file_sends_a_file_again(web_console):
    with open(AUDIO / "wav_pcm16_mono.wav", "rb") as recording:
        answer = requests.post(
            f"{web_console.base}/v1/voice-clones",
            files={"file": ("voice.wav", recording)},
            data={"name": "From a form", "dry_run": "true", "metadata": '{"row": 7}'},
            headers=HEADERS,
            timeout=30,
        ).json()
    assert answer["status"] == "validated", answer
    page = web_console.get(f"/console/clones/{answer['job_id']}").text
    curl = html.unescape(re.search(r'<pre id="curl">(.*?)</pre>', page, re.DOTALL).group(1))
    # The fields as strings: a name such as "@/etc/passwd" must not make curl read a file.
    assert '-F "file=@$RECORDING"' in curl and "--form-string 'name=From a form'" in curl
    assert "--form-string dry_run=true" in curl and """--form-string 'metadata={"row": 7}'""" in curl
    assert "application/json" not in curl and "-d " not in curl


def test_the_callback_can_be_sent_again_from_the_job_page(console, audio_host, receiver):
    seen: list[Request] = []

    def hook(request: Request) -> Response:
        seen.append(request)
        return Response("", status=200)

    receiver.expect_request("/hook", method="POST").respond_with_handler(hook)
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/voice.wav")
    # A receiver that authenticates by query (n8n's ?signature=, a ?token= endpoint).
    callback = receiver.url_for("/hook") + "?token=receiver-s3cret"
    job_id = requests.post(
        f"{console.base}/v1/voice-clones",
        json={"audio_url": url, "name": "Hooked", "callback_url": callback},
        headers=HEADERS,
        timeout=30,
    ).json()["job_id"]
    wait_until(lambda: len(seen) == 1)
    status = f"{console.base}/v1/voice-clones/{job_id}"
    wait_until(lambda: requests.get(status, headers=HEADERS, timeout=10).json()["callback_status"] == "delivered")
    stored = console.app.extensions["relay.runtime"].store.get(job_id)
    assert stored.callback_url == receiver.url_for("/hook")  # no query kept in clear once settled
    assert stored.callback_sealed and "receiver-s3cret" not in stored.callback_sealed
    page = console.post(f"/console/clones/{job_id}/resend-callback", {})
    assert page.status_code == 200 and "will be sent again" in page.text
    wait_until(lambda: len(seen) == 2)
    assert seen[0].headers["webhook-id"] == seen[1].headers["webhook-id"]
    assert [request.args.get("token") for request in seen] == ["receiver-s3cret", "receiver-s3cret"]
    page = wait_until(lambda: (p := console.get(f"/console/clones/{job_id}").text).count("Callback attempt") == 2 and p)
    assert "Callback re-send asked" in page


def test_a_callback_whose_key_is_its_path_is_sent_again_to_the_whole_address(console, audio_host, receiver):
    # A Make webhook's key is its path (hook.eu1.make.com/<32 letters and digits>): masked once the
    # callback settled, sealed whole, and a re-send goes to the whole address, not the masked one.
    seen: list[str] = []
    key = "k7x2m9q4w1e8r5t3y6u0i2o9p4a7s1d8"
    receiver.expect_request(f"/{key}", method="POST").respond_with_handler(
        lambda request: seen.append(request.path) or Response("", status=200)
    )
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/voice.wav")
    body = {"audio_url": url, "name": "Make hook", "callback_url": receiver.url_for(f"/{key}")}
    job_id = requests.post(f"{console.base}/v1/voice-clones", json=body, headers=HEADERS, timeout=30).json()["job_id"]
    status = f"{console.base}/v1/voice-clones/{job_id}"
    wait_until(lambda: requests.get(status, headers=HEADERS, timeout=10).json()["callback_status"] == "delivered")
    stored = console.app.extensions["relay.runtime"].store.get(job_id)
    assert key not in stored.callback_url and stored.callback_sealed
    page = console.post(f"/console/clones/{job_id}/resend-callback", {})
    assert page.status_code == 200 and "will be sent again" in page.text
    wait_until(lambda: len(seen) == 2)
    assert seen == [f"/{key}", f"/{key}"]


def test_a_callback_whose_query_was_not_kept_is_not_sent_again_without_it(make_app, job_settings, audio_host, receiver):
    # No RELAY_SECRET_KEY: the relay cannot keep the URL's token once the callback settled.
    receiver.expect_request("/hook", method="POST").respond_with_data("")
    app = make_app(job_settings.replace(secret_key=None))
    with over_http(app) as base:
        console = Console(base)
        assert console.login().status_code == 200
        url = serve_file(audio_host, "wav_pcm16_mono.wav", "/voice.wav")

        def delivered_then_resent(name: str, callback: str) -> requests.Response:
            body = {"audio_url": url, "name": name, "callback_url": callback}
            job_id = requests.post(f"{base}/v1/voice-clones", json=body, headers=HEADERS, timeout=30).json()["job_id"]
            status = f"{base}/v1/voice-clones/{job_id}"
            wait_until(
                lambda: requests.get(status, headers=HEADERS, timeout=10).json()["callback_status"] == "delivered"
            )
            return console.post(f"/console/clones/{job_id}/resend-callback", {})

        page = delivered_then_resent("Hooked", receiver.url_for("/hook") + "?token=t0ken")
        assert page.status_code == 200 and "had a query string" in page.text
        assert len(receiver.log) == 1  # sent once, never again to the address without its token
        # A URL without a query (a fragment does not count: it is never sent) loses nothing: sent again.
        page = delivered_then_resent("Plain", receiver.url_for("/hook") + "#part")
        assert page.status_code == 200 and "will be sent again" in page.text
        wait_until(lambda: len(receiver.log) == 3)


def test_only_a_finished_job_with_a_callback_is_sent_again(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path}/resend.db")
    db.migrate(engine)
    store = JobStore(engine)
    request = {"audio_url": "https://x.example/a.wav", "name": "n"}
    hook = "https://x.example/hook"
    try:
        store.create("a" * 32, request=request, token_kind="none", callback_url=hook)  # still running
        store.create("b" * 32, request=request, token_kind="none", phase="failed")  # no callback
        store.create(
            "c" * 32,
            request=request,
            token_kind="none",
            phase="failed",
            callback_url=hook,
            callback_status="given_up",
            callback_attempts=8,
            callback_last_error="HTTP 503",
        )
        assert [store.resend_callback(i * 32) for i in "abcd"] == [False, False, True, False]
        job = store.get("c" * 32)
        assert (job.callback_status, job.callback_attempts, job.callback_last_error) == ("pending", 0, None)
        assert job.next_run_at is not None and job.callback_next_at is not None
    finally:
        db.dispose(engine)


def test_events_are_deleted_with_their_job(job_settings, console, audio_host):
    made = make_jobs(console.base, audio_host)
    engine = db.connect(db.database_url(job_settings.database_url, job_settings.data_dir))
    try:
        job_id = made["ready"]["job_id"]
        assert events.for_job(engine, job_id)
        JobStore(engine).purge(db.utcnow() + timedelta(hours=1))
        assert events.for_job(engine, job_id) == [] and events.for_job(engine, made["failed"]["job_id"]) == []
    finally:
        engine.dispose()


def test_an_unknown_console_url_is_the_consoles_own_page_and_the_api_keeps_its_shape(web_console):
    page = web_console.get("/console/nope")
    assert page.status_code == 404 and "text/html" in page.headers["Content-Type"] and "not_found" in page.text
    assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Frame-Options"] == "DENY"
    api = requests.get(f"{web_console.base}/v1/nope", headers=HEADERS, timeout=10)
    assert api.status_code == 404 and api.json()["error_code"] == "not_found"


def test_pages_over_plain_http_from_afar_say_so_and_https_pages_ask_browsers_to_keep_to_it(web):
    remote = {**BROWSER, "Host": "my-relay.herokuapp.com", "X-Forwarded-Proto": "http"}
    login = requests.get(f"{web}/console/login", headers=remote, timeout=10)
    assert 'id="plain-http"' in login.text and "https://my-relay.herokuapp.com/console/login" in login.text
    assert "Strict-Transport-Security" not in login.headers
    home = requests.get(web + "/", headers=remote, timeout=10)
    assert 'id="plain-http"' in home.text
    secure = requests.get(f"{web}/console/login", headers={**remote, "X-Forwarded-Proto": "https"}, timeout=10)
    assert 'id="plain-http"' not in secure.text and "max-age" in secure.headers["Strict-Transport-Security"]
    local = requests.get(f"{web}/console/login", headers=BROWSER, timeout=10)  # 127.0.0.1: a developer's own
    assert 'id="plain-http"' not in local.text


def test_behind_a_proxy_that_says_nothing_an_https_public_url_is_https(make_app, fake, tmp_path):
    # nginx's default passes no X-Forwarded-Proto: RELAY_PUBLIC_URL says how callers reach the relay.
    settings = fast_settings(fake.base_url, tmp_path / "data", public_url="https://relay.example.com")
    with over_http(make_app(settings)) as base:
        page = requests.get(f"{base}/console/login", headers={**BROWSER, "Host": "relay.example.com"}, timeout=10)
    assert 'id="plain-http"' not in page.text and "max-age" in page.headers["Strict-Transport-Security"]


def test_a_page_past_the_last_says_so_and_links_the_first(web_console):
    page = web_console.get("/console?page=999").text
    assert "No clones on this page" in page and "No clones yet" not in page


def test_an_unknown_job_is_404_in_the_one_error_shape(web_console):
    page = web_console.get(f"/console/clones/{JOB_ID}")
    assert page.status_code == 404 and "job_not_found" in page.text
    api = web_console.get("/console/clones/nope", headers={"Accept": "application/json"})
    assert api.status_code == 404 and api.json()["error_code"] == "job_not_found"


def test_try_a_clone_runs_a_dry_run_through_the_api(console, audio_host, fake):
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/try.wav")
    page = console.post("/console/try", {"audio_url": url, "name": "Tried", "dry_run": "yes"})
    assert page.status_code == 200
    assert "HTTP 200" in page.text and "validated" in page.text and "Nothing was uploaded" in page.text
    assert fake.upload_count() == 0
    assert "Tried" in console.get("/console?status=validated").text


def test_try_a_clone_sent_twice_from_one_page_makes_one_clone(console, audio_host, fake):
    # A double click while the page loads, or a reload that sends the form again: one paid clone.
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/twice.wav")
    form_page = console.get("/console/try").text
    try_key = re.search(r'name="try_key" value="([0-9a-f]{32})"', form_page).group(1)
    form = {"audio_url": url, "name": "Sent twice", "token": TOKEN, "try_key": try_key}
    first, second = console.post("/console/try", form), console.post("/console/try", form)
    jobs = [re.search(r'href="(/console/clones/[0-9a-f]{32})"', page.text).group(1) for page in (first, second)]
    assert first.status_code == second.status_code == 200 and jobs[0] == jobs[1]
    assert fake.upload_count() == 1
    # The result page's form has a new key: sending it again on purpose is a new clone.
    assert try_key not in re.findall(r'name="try_key" value="([0-9a-f]{32})"', second.text)


def test_voices_are_listed_and_deleted_with_a_token_typed_for_that_page_only(web, fake, audio_host):
    base = web
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/v.wav")
    voice = requests.post(
        f"{base}/v1/voice-clones", json={"audio_url": url, "name": "Keep me?"}, headers=HEADERS, timeout=30
    ).json()["cloned_voice_item_id"]
    client = Console(base)
    client.login()
    assert "Show voices" in client.get("/console/voices").text  # no server token: ask for one
    listed = client.post("/console/voices", {"action": "list", "token": TOKEN})
    assert "Keep me?" in listed.text and voice in listed.text
    assert 'id="voices-incomplete"' not in listed.text  # the whole listing was read: no "stopped" hint
    assert listed.text.count(TOKEN) == 1  # one form for the table: the typed token once, not once per row
    confirm = client.post("/console/voices", {"action": "delete", "voice": f"{voice} Keep me?", "token": TOKEN})
    assert "Delete permanently" in confirm.text and voice in fake.voices  # asked, not yet done
    assert "Keep me? — <code>" in confirm.text and f'name="voice_id" value="{voice}"' in confirm.text
    done = client.post("/console/voices", {"action": "delete", "voice_id": voice, "token": TOKEN, "confirm": "yes"})
    assert f"Deleted {voice}" in done.text and voice not in fake.voices
    assert TOKEN not in "".join(client.http.cookies.values())
    wrong = client.post("/console/voices", {"action": "list", "token": "wrong-token-123456"})
    assert "upstream_unauthorized" in wrong.text


def test_the_voices_page_says_why_a_listing_stopped_short(console, fake):
    fake.list_answer = (200, '{"records": [], "hasNext": true, "cursor": ""}', "application/json")
    listed = console.post("/console/voices", {"action": "list", "token": TOKEN})
    assert 'id="voices-incomplete"' in listed.text and "a cursor missing or repeated" in listed.text


@pytest.mark.parametrize("pasted", [TOKEN + "\u2019", "\u200b" + TOKEN, TOKEN[:8] + "\r\n" + TOKEN[8:]])
def test_a_token_pasted_with_a_character_no_token_has_is_refused_before_any_job(console, audio_host, fake, pasted):
    """A curly quote, a zero-width space or a line break from a paste: before, a job was made whose
    upload crashed at every retry (no header can carry them), and the voices page was a 500."""
    url = serve_file(audio_host, "wav_pcm16_mono.wav", "/pasted.wav")
    tried = console.post("/console/try", {"audio_url": url, "name": "Pasted", "token": pasted})
    assert tried.status_code == 200 and "invalid_request" in tried.text and "plain text" in tried.text
    assert "Pasted" not in console.get("/console").text and fake.upload_count() == 0  # no job
    listed = console.post("/console/voices", {"action": "list", "token": pasted})
    assert listed.status_code == 200 and "invalid_request" in listed.text and "plain text" in listed.text


def test_an_api_call_whose_token_no_header_may_carry_is_400(client):
    response = client.get("/v1/voices", headers={**HEADERS, "X-Useapi-Token": TOKEN + "\u00e9"})
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")


def test_a_next_target_with_a_line_break_goes_to_the_list(console):
    page = console.get("/console/login", params={"next": "/console\r\nX-Evil: 1"}, allow_redirects=False)
    assert page.status_code in (302, 303) and page.headers["Location"].endswith("/console")
    assert "X-Evil" not in page.headers


def test_the_voices_page_names_its_account_keeps_it_on_cancel_and_ends_within_the_lookup_timeout(
    make_app, fake, tmp_path
):
    settings = fast_settings(fake.base_url, tmp_path / "data", useapi_token=None, read_timeout=30, lookup_timeout=1.0)
    with over_http(make_app(settings)) as base:
        client = Console(base)
        client.login()
        listed = client.post("/console/voices", {"action": "list", "token": TOKEN, "user_id": "u-7"})
        assert f"u-7 · token …{TOKEN[-4:]}" in html.unescape(listed.text)
        voice = "user:1-tempolor:2-voice:3"
        asked = {"action": "delete", "voice_id": voice, "token": TOKEN, "user_id": "u-7"}
        confirm = client.post("/console/voices", asked)
        assert f"u-7 · token …{TOKEN[-4:]}" in html.unescape(confirm.text)
        # Cancel goes back to the same account's list (it dropped the typed token and user_id).
        form = r'<form[^>]*>((?:(?!</form>).)*id="cancel-delete".*?)</form>'
        cancel = re.search(form, confirm.text, re.DOTALL).group(1)
        fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', cancel))
        assert fields["action"] == "list" and fields["user_id"] == "u-7" and fields["token"] == TOKEN
        fake.lookup_delay = 4.0  # a slow useapi: the page answers before the host's 30 s
        started = time.monotonic()
        slow = client.post("/console/voices", {"action": "list", "token": TOKEN})
        assert time.monotonic() - started < 3 and "upstream_timeout" in slow.text


# --- one table of next steps ----------------------------------------------------------------

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_next_steps_are_the_readme_error_table():
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| \d{3} \| (.+) \|$", README, re.M))
    assert rows == NEXT_STEPS
    assert set(NEXT_STEPS) == {cls.error_code for cls in all_error_classes()}


def test_pip_install_ships_every_template_and_static_file():
    import fnmatch
    import tomllib

    root = Path(__file__).parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "relay.web" in config["packages"]
    patterns = config["package-data"]["relay.web"]
    web = root / "relay" / "web"
    shipped = [p for p in web.rglob("*") if p.is_file() and p.parent != web and "__pycache__" not in p.parts]
    assert shipped
    for path in shipped:
        assert any(fnmatch.fnmatch(path.relative_to(web).as_posix(), pattern) for pattern in patterns), path
