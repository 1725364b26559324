"""Logs: one JSON line per request; no token, key or signed-URL query ever appears."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from relay.logs import DetachedStream, JsonFormatter

from .conftest import RELAY_KEY, TOKEN, clone, serve_file, wait_until
from .processes import stop
from .test_serve import free_port, relay_command


def test_a_clone_logs_one_line_without_secrets(make_app, settings, audio_host, useapi, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(settings.replace(useapi_token="server-token-zzzzzzzzzzzz"))
    serve_file(audio_host, "wav_pcm16_mono.wav", path="/v.wav")
    useapi.expect_request("/v1/tempolor/music/cloned-voices/").respond_with_json(
        {"error": f"Unauthorized {TOKEN}", "code": 401}, status=401
    )
    signed = audio_host.url_for("/v.wav") + "?X-Amz-Signature=sig-s3cr3t&X-Amz-Credential=cred-s3cr3t"
    clone(app.test_client(), {"audio_url": signed, "name": "x"})
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("relay")]
    access = [json.loads(line) for line in lines if '"relay.access"' in line]
    assert len(access) == 1
    assert access[0]["status"] == 401 and access[0]["error_code"] == "upstream_unauthorized"
    assert access[0]["audio_url"] == audio_host.url_for("/v.wav")
    text = "\n".join(lines)
    for secret in (TOKEN, RELAY_KEY, "server-token-zzzzzzzzzzzz", "sig-s3cr3t", "cred-s3cr3t"):
        assert secret not in text


def test_a_secret_in_a_links_path_is_not_logged_answered_or_kept(make_app, job_settings, audio_host, caplog):
    """A Telegram bot's file link carries the bot's token in its path: it reaches neither the
    access line, nor the error message (answered, stored, sent to the callback), nor the job row."""
    caplog.set_level(logging.DEBUG)
    app = make_app(job_settings)
    bot = "bot7712345678:AAHsEcReT-kQ9xZ_abcdefghijklmnopq"
    link = audio_host.url_for(f"/file/{bot}/voice/missing_9.oga")  # not served: the host answers 404
    response = clone(app.test_client(), {"audio_url": link, "name": "From a bot"})
    assert response.json["error_code"] == "download_failed", response.json
    assert "/file/…/voice/missing_9.oga" in response.json["error_message"]
    job = app.extensions["relay.runtime"].store.get(response.json["job_id"])
    formatter = JsonFormatter()
    lines = "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("relay"))
    for where in (lines, json.dumps(response.json), json.dumps(job.request), json.dumps(job.answer)):
        assert "AAHsEcReT" not in where


def test_a_stdout_nobody_reads_costs_log_lines_never_a_request(tmp_path):
    """A full stdout pipe (a log collector that stalled) must not stop the relay answering: lines
    wait in a bounded queue of their own, and past it they are dropped and counted."""
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "RELAY_API_KEY": RELAY_KEY,
        "RELAY_INPROCESS_WORKERS": "0",
        "WEB_CONCURRENCY": "1",
        "RELAY_LOG_LEVEL": "INFO",  # an access line per request: the pipe fills after a few hundred
        "RELAY_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("DATABASE_URL", None)
    process = subprocess.Popen(relay_command("serve"), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(line.decode() for line in process.stdout), daemon=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base + "/healthz"), timeout=30)
        with requests.Session() as session:
            for n in range(1500):  # ~400 bytes of access line each: 600 kB against a 64 kB pipe
                assert session.get(f"{base}/healthz?n={n}", timeout=10).status_code == 200
        # Once the pipe is read again, the waiting lines come out.
        reader.start()
        wait_until(lambda: sum('"relay.access"' in line for line in list(seen)) >= 1500, timeout=20)
    finally:
        stop(process)
        if reader.ident is not None:
            reader.join(10)
        process.stdout.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_lines_past_the_waiting_bound_are_dropped_and_counted():
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = DetachedStream(stream)
    handler.MAX_WAITING = 5
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("relay.test-detached")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for n in range(60):  # 20 kB each: the pipe (64 kB) takes three, the writer then waits on it
            logger.warning("line %d %s", n, "x" * 20_000)
        assert time.monotonic() - started < 5  # logging never waited for the pipe
        received = bytearray()
        with open(read_end, "rb") as pipe:
            reader = threading.Thread(target=lambda: received.extend(pipe.read()), daemon=True)
            reader.start()
            handler.flush()
            stream.close()
            reader.join(10)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in received.decode().splitlines()]
    written = [line for line in lines if line["msg"].startswith("line ")]
    dropped = [line for line in lines if "dropped_lines" in line]
    assert dropped and all(line["level"] == "warning" for line in dropped)
    assert len(written) + sum(line["dropped_lines"] for line in dropped) == 60  # each line written or counted
    assert len(written) < 60
    assert written[0]["msg"].startswith("line 0 ")  # the oldest lines are kept, in order
    assert [int(line["msg"].split()[1]) for line in written] == sorted(int(line["msg"].split()[1]) for line in written)


WRITER = """
import logging, sys, time
from relay.logs import DetachedStream, JsonFormatter
handler = DetachedStream(sys.stdout)
handler.setFormatter(JsonFormatter())
log = logging.getLogger("relay.test-shared")
log.addHandler(handler)
log.propagate = False
for n in range(3000):
    log.warning("process %s line %d %s", sys.argv[1], n, "x" * 300)
handler.FLUSH_SECONDS = 30
handler.flush()
"""


def test_processes_sharing_stdout_never_splice_each_others_lines():
    """gunicorn's processes share one stdout pipe: each write holds whole lines and at most what a
    pipe takes at once, so a slow reader never gets half a line of one process inside another's."""
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, name], stdout=write_end, cwd=Path(__file__).parent.parent)
        for name in ("a", "b", "c")
    ]
    os.close(write_end)
    received = bytearray()
    with open(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1024):  # a slow collector: the writers' queues fill meanwhile
            received += chunk
            time.sleep(0.0005)
    for writer in writers:
        assert writer.wait(30) == 0
    lines = received.decode().splitlines()
    assert len(lines) == 9000
    parsed = [json.loads(line) for line in lines]  # every line whole
    assert {line["msg"].split()[1] for line in parsed} == {"a", "b", "c"}
