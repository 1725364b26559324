"""Shared fixtures: a real audio host on 127.0.0.2, a useapi stand-in on 127.0.0.1, the app."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import threading
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from sqlalchemy import text
from werkzeug.serving import make_server

from relay import create_app, db
from relay.settings import Settings

from .fake_useapi import FakeUseapi

AUDIO = Path(__file__).parent / "fixtures" / "audio"
RELAY_KEY = "relay-key-for-tests-0123456789abcdef"
TOKEN = "useapi-token-for-tests-9876543210"
AUDIO_HOST = "127.0.0.2"


def audio_bytes(name: str) -> bytes:
    return (AUDIO / name).read_bytes()


@contextlib.contextmanager
def allowed_host_server():
    """A threaded pytest-httpserver on 127.0.0.2, the one address the test settings allow."""
    server = HTTPServer(host=AUDIO_HOST, port=0, threaded=True)
    server.start()
    try:
        yield server
    finally:
        server.clear()
        if server.is_running():
            server.stop()


@pytest.fixture(scope="session")
def audio_server():
    with allowed_host_server() as server:
        yield server


@pytest.fixture
def audio_host(audio_server):
    """Serves files to the relay from 127.0.0.2, the one address the test settings allow."""
    audio_server.clear()
    yield audio_server
    audio_server.clear()


@pytest.fixture
def useapi(httpserver):
    """The useapi.net stand-in (127.0.0.1, which the URL guard forbids for audio URLs)."""
    return httpserver


def fast_settings(useapi_base: str, data_dir, **changes) -> Settings:
    """Settings for tests: loopback audio host allowed, short timeouts, quick retries and polls.

    Spool files go to a folder of the test's own (beside ``data_dir``), never the machine's
    temporary folder, so a test can count what it left behind without seeing other processes'."""
    spool_dir = Path(data_dir).parent / "spools"
    spool_dir.mkdir(parents=True, exist_ok=True)
    values = dict(
        relay_api_key=RELAY_KEY,
        useapi_base_url=useapi_base,
        allowed_networks=(ipaddress.ip_network(f"{AUDIO_HOST}/32"),),
        connect_timeout=2,
        read_timeout=2,
        download_timeout=5,
        upload_timeout=3,
        data_dir=str(data_dir),
        spool_dir=str(spool_dir),
        default_wait_seconds=10,
        max_wait_seconds=20,
        lease_seconds=3,
        retry_base_seconds=0.05,
        poll_interval_seconds=0.05,
        idle_poll_seconds=0.05,
        reconcile_grace_seconds=0.2,
        max_attempts=3,
        callback_schedule=(0.1, 0.2, 0.3),
        callback_first_delay_seconds=0,
        callback_timeout=2,
        inprocess_workers=2,  # tests that need more say so
    )
    values.update(changes)
    return Settings(**values)


@pytest.fixture
def settings(useapi, tmp_path):
    return fast_settings(useapi.url_for("/v1"), tmp_path / "data")


@pytest.fixture
def make_app():
    """Build apps that are closed (worker pool stopped, database released) when the test ends."""
    made = []

    def build(settings: Settings, **kwargs):
        app = create_app(settings, **kwargs)
        made.append(app)
        return app

    yield build
    for app in made:
        app.extensions["relay.runtime"].close(timeout=5)


@pytest.fixture
def app(settings, make_app):
    return make_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def serve_file(server: HTTPServer, name: str, path: str | None = None, content_type="application/octet-stream") -> str:
    """Serve fixture ``name`` at ``path`` (default ``/<name>``); return its URL."""
    path = path or f"/{name}"
    server.expect_request(path).respond_with_data(audio_bytes(name), content_type=content_type)
    return server.url_for(path)


def clone(client, body: dict, *, key: str | None = RELAY_KEY, token: str | None = TOKEN, headers=None):
    """POST /v1/voice-clones the way a no-code tool does."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if token is not None:
        sent["X-Useapi-Token"] = token
    return client.post("/v1/voice-clones", json=body, headers=sent)


# --- durable jobs: both databases, the stateful useapi stand-in, a callback receiver -------------

PG_URL = os.environ.get("RELAY_TEST_DATABASE_URL")
JOBS_SECRET_KEY = "a-long-random-secret-key-for-tests-0123456789"
JOBS_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-secret-for-the-tests-0123").decode()
HEADERS = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    if not PG_URL:
        pytest.skip("RELAY_TEST_DATABASE_URL is not set (.ci/run starts PostgreSQL and sets it)")
    engine = db.connect(db.database_url(PG_URL, ""))
    db.migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, heartbeats, accounts, job_events, uploads, upload_chunks"))
    engine.dispose()
    return PG_URL


@pytest.fixture
def fake():
    server = FakeUseapi(TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def receiver():
    """A callback receiver on 127.0.0.2 (allowed), threaded so slow answers do not block others."""
    with allowed_host_server() as server:
        yield server


@pytest.fixture
def job_settings(fake, database_url, tmp_path):
    return fast_settings(
        fake.base_url,
        tmp_path / "data",
        database_url=database_url,
        secret_key=JOBS_SECRET_KEY,
        webhook_secret=JOBS_WEBHOOK_SECRET,
    )


def post(client, body: dict, headers=None):
    return client.post("/v1/voice-clones", json=body, headers={**HEADERS, **(headers or {})})


def in_threads(target, count: int, args=lambda n: (), timeout: float = 30.0) -> None:
    """Run ``target(*args(n))`` in ``count`` threads at once; return once all ended (each joined
    within ``timeout``)."""
    threads = [threading.Thread(target=target, args=args(n)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.contextmanager
def over_http(app):
    """Serve ``app`` over real HTTP on 127.0.0.1 (a threaded werkzeug server); yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
