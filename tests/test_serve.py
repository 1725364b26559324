"""`relay serve` as a real process: gunicorn on loopback, answering over real HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import requests

from .conftest import AUDIO_HOST, RELAY_KEY, serve_file
from .processes import stop, wait_until_answering


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", *args]


@pytest.fixture
def served(useapi, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "RELAY_API_KEY": RELAY_KEY,
        "USEAPI_BASE_URL": useapi.url_for("/v1"),
        "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
        "WEB_CONCURRENCY": "1",
        "RELAY_DATA_DIR": str(tmp_path / "data"),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(relay_command("serve"), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_answering(base + "/healthz", process, log_path)
            yield base
        finally:
            stop(process)
    said = log_path.read_text()
    assert RELAY_KEY not in said
    # Where the jobs are: ./data is relative to where the relay was started.
    assert f"listening on http://127.0.0.1:{port} (jobs in SQLite at {tmp_path / 'data'}" in said


def test_relay_serve_answers_a_dry_run_over_http(served, audio_host):
    assert requests.get(served + "/healthz", timeout=5).json()["ok"] is True
    url = serve_file(audio_host, "mp3_vbr_id3v2.mp3")
    response = requests.post(
        served + "/v1/voice-clones",
        json={"audio_url": url, "name": "Over HTTP", "dry_run": True},
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["audio_format"] == "mp3"


def test_requests_gunicorn_cannot_parse_get_the_relays_json_answer(served):
    """A raw-body clone whose metadata, URL-encoded, passes gunicorn's 4094-byte request line (a
    4 KB object of non-ASCII text does), or a header over its limit: the answer is the relay's one
    JSON shape with an error_code and the way out, not gunicorn's HTML page."""
    metadata = json.dumps({"customer": "Ж" * 1500})
    long_line = requests.post(
        served + "/v1/voice-clones",
        params={"name": "x", "metadata": metadata},
        data=b"RIFF",
        headers={"Authorization": f"Bearer {RELAY_KEY}", "Content-Type": "audio/wav"},
        timeout=10,
    )
    assert long_line.headers["Content-Type"] == "application/json", long_line.text[:200]
    assert (long_line.status_code, long_line.json()["error_code"]) == (400, "invalid_request")
    assert "query string" in long_line.json()["error_message"] and long_line.json()["ok"] is False
    big_header = requests.get(served + "/healthz", headers={"Idempotency-Key": "k" * 9000}, timeout=10)
    assert (big_header.status_code, big_header.json()["error_code"]) == (400, "invalid_request")
    assert "headers are too large" in big_header.json()["error_message"]


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("relay.example.com", None, True), ("::", None, True), ("0.0.0.0", RELAY_KEY, False)]
    + [("0.0.0.0", "secret", True), ("127.0.0.1", "secret", False)]  # a short key: guessable
    + [(host, None, False) for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")],
)
def test_an_open_relay_listening_beyond_this_machine_is_warned_about(host, key, warned):
    from relay.preflight import open_relay_warning
    from relay.settings import Settings

    warning = open_relay_warning(Settings().replace(relay_api_key=key), host)
    assert (warning is not None) == warned
    if warned:
        assert ("only 6 characters" if key else "no RELAY_API_KEY") in warning and host in warning


def test_the_procfile_web_process_warns_for_each_open_address_gunicorn_bound(monkeypatch, capsys):
    import importlib
    from types import SimpleNamespace

    monkeypatch.delenv("RELAY_API_KEY", raising=False)
    monkeypatch.delenv("USEAPI_TOKEN", raising=False)
    conf = importlib.reload(importlib.import_module("relay.gunicorn_conf"))
    bound = [("0.0.0.0", 8000), ("127.0.0.1", 8001), "/tmp/relay.sock"]  # what -b gave, not RELAY_BIND_HOST
    conf.when_ready(SimpleNamespace(cfg=SimpleNamespace(address=bound)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no RELAY_API_KEY" in line]
    assert len(warnings) == 1 and "listening on 0.0.0.0" in warnings[0]


def test_relay_serve_refuses_to_start_open_with_a_server_token():
    env = {**os.environ, "USEAPI_TOKEN": "server-token-0000000000", "PORT": str(free_port())}
    env.pop("RELAY_API_KEY", None)
    result = subprocess.run(relay_command("serve"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "RELAY_API_KEY" in result.stderr


def test_relay_config_masks_secrets():
    env = {**os.environ, "RELAY_API_KEY": RELAY_KEY, "USEAPI_TOKEN": "server-token-0000000000abcd"}
    result = subprocess.run(relay_command("config"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert RELAY_KEY not in result.stdout and "server-token" not in result.stdout
    assert '"USEAPI_TOKEN": "****abcd"' in result.stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["worker", "--concurrency", "-3"], "--concurrency: -3 is out of range"),
        (["worker", "--concurrency", "0"], "--concurrency: 0 is out of range"),  # was: the default, silently
        (["serve", "--workers", "0"], "--workers: 0 is out of range"),
        (["serve", "--port", "99999"], "--port: 99999 is out of range"),  # was: gunicorn's traceback
        (["serve", "--threads", "lots"], "--threads: 'lots' is not a whole number"),
        (["serve", "--workers", "99999"], "--workers: 99999 is out of range: from 1 to 64"),  # as WEB_CONCURRENCY
        (["worker", "--concurrency", "99999"], "--concurrency: 99999 is out of range: from 1 to 256"),
    ],
)
def test_bad_command_line_numbers_stop_with_one_line(argv, says):
    result = subprocess.run(relay_command(*argv), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


def test_openapi_to_a_folder_that_does_not_exist_is_one_line(tmp_path):
    command = relay_command("openapi", "--output", str(tmp_path / "no" / "x.yaml"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_relay_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    with socket.socket() as other:  # another program already listens there (a dev server on 8000)
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        env = {**os.environ, "PORT": str(port), "RELAY_DATA_DIR": str(tmp_path)}
        env.pop("USEAPI_TOKEN", None)
        result = subprocess.run(relay_command("serve"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr and f"--port {port + 1}" in result.stderr
    assert "listening on" not in result.stderr  # it says it listens only once it does


def test_relay_serve_on_port_0_says_which_port_it_got(tmp_path):
    env = {**os.environ, "PORT": "0", "RELAY_DATA_DIR": str(tmp_path)}
    env.pop("USEAPI_TOKEN", None)
    process = subprocess.Popen(relay_command("serve"), env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        for _ in range(50):
            line = process.stderr.readline()
            if "listening on" in line:
                break
        port = int(line.split("listening on http://127.0.0.1:")[1].split()[0])
        assert port > 0 and requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).ok
    finally:
        process.terminate()
        process.communicate(timeout=30)
