"""Capacity: slow clients and waiting requests cannot take the threads that serve everyone else.

A real `relay serve` (gunicorn, the relay's worker class) on loopback with 4 threads and a waiter
budget of 2; no in-process workers, so every clone stays queued and every wait lasts its full time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from relay.api import BUSY_WARNING

from .conftest import AUDIO_HOST, JOBS_SECRET_KEY, RELAY_KEY, TOKEN, wait_until
from .test_serve import free_port, relay_command

HEADERS = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(preexec=None, **env_changes: str) -> str:
        port = free_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "RELAY_API_KEY": RELAY_KEY,
            "RELAY_SECRET_KEY": JOBS_SECRET_KEY,
            "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
            "RELAY_INPROCESS_WORKERS": "0",
            "RELAY_THREADS": "4",
            "RELAY_MAX_WAITERS": "2",
            "WEB_CONCURRENCY": "1",
            "RELAY_DATA_DIR": str(tmp_path / f"data-{port}"),
            **env_changes,
        }
        env.pop("DATABASE_URL", None)
        process = subprocess.Popen(
            relay_command("serve"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(base + "/healthz", timeout=5)
                return base
            except requests.ConnectionError:
                time.sleep(0.1)
        process.kill()
        pytest.fail("relay serve did not start: " + process.communicate()[0].decode())

    start.processes = started
    yield start
    for process in started:
        process.terminate()
        try:
            process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def slow_client(base: str) -> socket.socket:
    """A connection that has sent part of a request and stalls (a slowloris)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/voice-clones HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n")
    return sock


def slow_body(base: str) -> socket.socket:
    """A connection that has sent its headers and part of its body, and stalls."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b'POST /v1/voice-clones HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{"audio_url"')
    return sock


def non_reader(base: str) -> socket.socket:
    """A connection that sends whole requests and never reads the answers."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n" * 3)
    return sock


def clone_body(n: int, wait: float) -> dict:
    return {"audio_url": f"http://{AUDIO_HOST}/voice-{n}.wav", "name": f"Voice {n}", "wait_seconds": wait}


def test_slow_clients_and_waiters_past_the_budget_leave_health_checks_answered(serve):
    base = serve()
    stalled = [slow_client(base) for _ in range(6)]  # more than the 4 threads
    stalled += [slow_body(base) for _ in range(6)]  # whole heads, bodies that stall
    stalled += [non_reader(base) for _ in range(6)]  # whole requests whose answers are never read
    answers: dict[int, requests.Response] = {}

    def waiter(n: int) -> None:
        answers[n] = requests.post(base + "/v1/voice-clones", json=clone_body(n, 15), headers=HEADERS, timeout=60)

    waiters = [threading.Thread(target=waiter, args=(n,)) for n in range(4)]  # 2 past the budget of 2
    try:
        for thread in waiters:
            thread.start()
        # Two requests past the budget are answered at once, without waiting.
        deadline = time.monotonic() + 20
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Stalled connections and two waiting requests: a health check and a new clone still go through.
        assert requests.get(base + "/healthz", timeout=10).json()["ok"] is True
        accepted = requests.post(base + "/v1/voice-clones", json=clone_body(9, 0), headers=HEADERS, timeout=10)
        assert accepted.status_code == 202 and BUSY_WARNING not in accepted.json()["warnings"]
        for thread in waiters:
            thread.join(60)
        assert len(answers) == 4
        for response in answers.values():
            body = response.json()
            assert response.status_code == 202
            assert body["status"] == "queued" and body["status_url"].endswith(body["job_id"])
        busy = [n for n, response in answers.items() if BUSY_WARNING in response.json()["warnings"]]
        assert len(busy) == 2  # the two past the budget; the other two waited their 15 s
    finally:
        for sock in stalled:
            sock.close()


def enough_files_for_a_thousand_connections() -> None:
    """This process opens about 1,050 sockets: raise its open-file limit to 1,400, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip("this test needs 1400 open files (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))


def test_clients_that_never_read_large_answers_hold_no_thread(serve):
    """Pipelined requests for a 70 KB answer, never read: the kernel takes a little of each answer,
    the relay keeps the rest for its event loop to send, and the threads serve everyone else."""
    base = serve(RELAY_LOG_LEVEL="WARNING")  # no access lines: nobody reads them
    host, port = base.removeprefix("http://").split(":")
    hogs = []
    try:
        for _ in range(8):  # twice the 4 threads
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
            sock.connect((host, int(port)))
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: relay\r\n\r\n" * 100)  # 7 MB of answers
            hogs.append(sock)
        time.sleep(1)  # every hog's first answers are written, or being written
        for _ in range(5):
            assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True
            time.sleep(0.2)
    finally:
        for sock in hogs:
            sock.close()


def test_pipelined_requests_read_late_all_get_their_answers(serve):
    """The rest of an answer sent by the event loop, a kept-alive connection goes on: every pipelined
    request is answered, in order, once the client reads."""
    base = serve(RELAY_LOG_LEVEL="WARNING")
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: relay\r\n\r\n" * 30)
        time.sleep(1)  # the answers pile up while the client reads nothing
        sock.settimeout(20)
        received, answers = b"", []
        while len(answers) < 30:
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended after {len(answers)} answers"
            received += chunk
            while (end := received.find(b"\r\n\r\n")) >= 0:
                head = received[:end]
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                if len(received) < end + 4 + length:
                    break
                body, received = received[end + 4 : end + 4 + length], received[end + 4 + length :]
                assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["openapi"]
                answers.append(head)
    finally:
        sock.close()


def test_closing_connections_do_not_hold_up_the_event_loop(serve):
    """Clients that ask for ``Connection: close`` and then neither read nor close: each connection is
    closed the graceful way (late bytes read and dropped for a moment) by the event loop, without
    waiting on it (gunicorn's own close waited up to 2 s per connection, the whole worker stalled)."""
    base = serve()
    host, port = base.removeprefix("http://").split(":")
    lingering = []
    try:
        for _ in range(10):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            lingering.append(sock)
        for _ in range(3):
            assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True
        answer = lingering[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and lingering[0].recv(65536) == b""  # answered, then closed
    finally:
        for sock in lingering:
            sock.close()


def test_a_thousand_clients_that_neither_read_nor_close_cannot_stop_the_relay_accepting(serve):
    """Whole requests answered, their connections then idle (kept alive) or still being answered: near
    worker_connections (1000) the oldest of those are closed, so new requests are accepted."""
    enough_files_for_a_thousand_connections()
    base = serve(RELAY_LOG_LEVEL="WARNING")
    host, port = base.removeprefix("http://").split(":")
    idle = []
    try:
        for _ in range(1050):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            idle.append(sock)
        for _ in range(3):  # (before, nothing was accepted until the first kept-alive ones timed out, 5 s)
            assert requests.get(base + "/healthz", timeout=2).json()["ok"] is True
    finally:
        for sock in idle:
            sock.close()


def test_making_room_near_the_limit_never_kills_the_worker(serve):
    """Near worker_connections the oldest idle kept-alive connections are closed; when those same
    connections send a request in the same round of events, the worker must not trip over a socket
    it already closed (it died: every request it served was cut)."""
    enough_files_for_a_thousand_connections()
    base = serve(RELAY_LOG_LEVEL="WARNING")
    host, port = base.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    idle, new = [], []
    try:
        for _ in range(948):  # just under worker_connections less its spare (1000 - 50)
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(request)
            idle.append(sock)
        for sock in idle:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        for burst in range(4):  # (a race: one burst tripped the old code about one time in three)
            arrivals = []
            for sock in idle[60 * burst : 60 * (burst + 1)]:  # the oldest ask again while new clients arrive
                with contextlib.suppress(OSError):  # closed to make room already
                    sock.sendall(request)
                late = socket.socket()
                late.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    late.connect((host, int(port)))
                arrivals.append(late)
            time.sleep(0.5)
            for late in arrivals:
                late.setblocking(True)
                late.settimeout(10)
                late.sendall(request)
                assert late.recv(65536).startswith(b"HTTP/1.1 200")
            new += arrivals
        assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True
    finally:
        for sock in idle + new:
            sock.close()
    process = serve.processes[-1]
    process.terminate()
    output = process.communicate(timeout=40)[0].decode(errors="replace")
    assert "Traceback" not in output and output.count("Booting worker") == 1, output[-3000:]


def test_a_thousand_unfinished_requests_cannot_stop_the_relay_accepting(serve):
    """Past 3/4 of gunicorn's worker_connections (1000), the oldest unfinished request is answered
    408, so whole requests are still accepted (at 1000 gthread stops accepting at all)."""
    enough_files_for_a_thousand_connections()
    # Warnings only: hundreds of 408 access lines would fill the output pipe this test does not read.
    base = serve(RELAY_LOG_LEVEL="WARNING")
    stalled = []
    try:
        for _ in range(1050):
            stalled.append(slow_client(base))
        for _ in range(3):
            assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True
        shed = stalled[0]  # the oldest
        shed.settimeout(10)
        answer = shed.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"too many unfinished requests" in answer
        assert stalled[-1].send(b"X") == 1  # the newest is still being read
    finally:
        for sock in stalled:
            sock.close()


def test_a_request_that_never_arrives_whole_is_answered_408_and_a_slow_one_is_served(serve):
    base = serve(RELAY_REQUEST_READ_TIMEOUT="1")
    stalled = slow_client(base)
    try:
        stalled.settimeout(20)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = stalled.recv(65536)
            if not chunk:
                break
            reply += chunk
    finally:
        stalled.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    import json

    answer = json.loads(body)
    assert answer["ok"] is False and answer["error_code"] == "request_timeout"

    # A request that arrives in pieces, each within the timeout, is served as usual.
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        for piece in (b"GET /heal", b"thz HTTP/1.1\r\n", b"Host: relay\r\n", b"Connection: close\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(0.1)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"ok":true' in reply


def test_a_json_body_sent_after_100_continue_is_served(serve):
    base = serve()
    body = b'{"audio_url": "http://127.0.0.2/x.wav", "name": "Continued", "wait_seconds": 0}'
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            b"POST /v1/voice-clones HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {RELAY_KEY}\r\nX-Useapi-Token: {TOKEN}\r\n".encode()
            + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        reply = interim.partition(b"\r\n\r\n")[2]
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 202")
    assert reply.count(b"HTTP/1.1 100") == 0


@pytest.mark.parametrize(
    ("buffer", "state"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: relay\r\n", "partial"),
        (b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n", "complete"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", "partial"),
        (b"POST / HTTP/1.1\r\ncontent-length:5\r\n\r\nabcde", "complete"),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", "too_large"),
        (b"POST / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", "spool"),  # a file: received into a file
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "partial"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "complete"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "complete"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11000\r\n" + b"a" * 70000, "spool"),
        (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (70 * 1024), "too_large"),
        # A chunk extension and a trailer end a chunked body too.
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0;done=1\r\nX-Sum: 9\r\n\r\n",
            "complete",
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n", "partial"),
        # Not chunked framing: answered 400 by the event loop (gunicorn's parser would wait on a thread).
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\n\n", "bad"),  # bare LF
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", "bad"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"a" * 5000, "bad"),
        # More digits than any length has (int() of thousands of them raises): too large, not a crash.
        (b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "too_large"),
    ],
)
def test_the_event_loop_knows_when_a_request_is_whole(buffer, state):
    from relay.server import request_state

    assert request_state(buffer, body_limit=64 * 1024, upload_limit=50 * 1024 * 1024) == state


def test_the_waiter_budget_leaves_threads_for_new_requests():
    from relay.settings import Settings, SettingsError

    assert Settings().waiter_budget == 48  # of 64 threads
    assert Settings(threads=8, max_waiters=2).waiter_budget == 2
    with pytest.raises(SettingsError, match="RELAY_MAX_WAITERS"):
        Settings(threads=8, max_waiters=8).validated()


def test_on_sigterm_a_waiting_request_is_answered_at_once_and_the_server_stops(serve):
    from relay.api import STOPPING_WARNING

    base = serve()
    headers = {**HEADERS, "Idempotency-Key": "sigterm-wait"}
    answer: dict = {}

    def waiter() -> None:
        response = requests.post(base + "/v1/voice-clones", json=clone_body(1, 60), headers=headers, timeout=60)
        answer.update(status=response.status_code, body=response.json(), at=time.monotonic())

    thread = threading.Thread(target=waiter)
    thread.start()
    # The same key without waiting answers once the job exists (or creates it, which the waiter then waits on).
    probe = requests.post(base + "/v1/voice-clones", json=clone_body(1, 0), headers=headers, timeout=20)
    assert probe.status_code == 202
    process = serve.processes[-1]
    process.terminate()
    thread.join(30)
    assert answer["status"] == 202 and answer["body"]["status"] == "queued"
    assert STOPPING_WARNING in answer["body"]["warnings"]
    assert process.wait(30) == 0


def upload_head(length: int, key: str = RELAY_KEY, extra: str = "") -> bytes:
    """The head of a recording sent as the raw body, ``length`` bytes long."""
    return (
        "POST /v1/voice-clones?name=Upload&wait_seconds=0 HTTP/1.1\r\nHost: relay\r\nContent-Type: audio/wav\r\n"
        f"Authorization: Bearer {key}\r\nX-Useapi-Token: {TOKEN}\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


def slow_upload(base: str, length: int = 1_000_000, key: str = RELAY_KEY) -> socket.socket:
    """A connection that has sent the head of a large upload and its first bytes, and stalls."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(upload_head(length, key) + b"RIFF" + bytes(996))
    return sock


def answer_of(sock: socket.socket) -> tuple[bytes, dict]:
    """The whole answer on ``sock`` (the relay closes the connection after it): head and JSON body."""
    import json

    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_slow_uploads_hold_no_thread_and_whole_ones_are_served(serve):
    from .conftest import audio_bytes

    # Bodies over 4 KiB are files to the event loop: received into a file, not by a thread.
    base = serve(RELAY_MAX_JSON_BYTES="4096")
    stalled = [slow_upload(base) for _ in range(8)]  # twice the 4 threads
    try:
        assert requests.get(base + "/healthz", timeout=10).json()["ok"] is True
        wav = audio_bytes("wav_pcm16_mono.wav")
        headers = {**HEADERS, "Content-Type": "audio/wav"}
        params = {"name": "Whole", "wait_seconds": "0"}
        sent = requests.post(base + "/v1/voice-clones", params=params, data=wav, headers=headers, timeout=10)
        assert sent.status_code == 202 and sent.json()["status"] == "queued"
        assert sent.headers["Connection"] == "close"

        # The same file in chunks of unknown length (a tool streaming what it downloads).
        def pieces():
            for start in range(0, len(wav), 10_000):
                yield wav[start : start + 10_000]

        chunked = requests.post(
            base + "/v1/voice-clones", params={**params, "name": "Chunked"}, data=pieces(), headers=headers, timeout=10
        )
        assert chunked.status_code == 202, chunked.text
        assert requests.get(base + "/healthz", timeout=10).json()["ok"] is True
    finally:
        for sock in stalled:
            sock.close()


def test_running_out_of_file_descriptors_pauses_accepting_and_never_kills_the_worker(serve):
    """Every slow upload holds a socket and its spool file. With a low open-file limit (the worker
    cannot raise it here: soft and hard are both 256), accept() ran out of descriptors and raised
    out of the event loop: the worker died, and every request it served with it."""

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    base = serve(preexec=few_files, RELAY_LOG_LEVEL="WARNING")
    held = []
    try:
        # Uploads take two files each (a socket and a spool file; past the limit the spool is refused
        # 503), then stalled requests take the last ones: the next accept() finds none.
        held += [slow_upload(base, length=200_000) for _ in range(130)]
        held += [slow_client(base) for _ in range(80)]
        time.sleep(1)
    finally:
        for sock in held:
            sock.close()
    # Once the files are free again, the same worker answers.
    answer = wait_until(lambda: _healthz(base), timeout=15)
    assert answer["ok"] is True
    process = serve.processes[-1]
    process.terminate()
    output = process.communicate(timeout=40)[0].decode(errors="replace")
    assert "out of file descriptors" in output
    assert "Traceback" not in output and output.count("Booting worker") == 1, output[-3000:]


def test_a_worker_raises_its_open_file_limit_to_the_hard_one(serve):
    """1024 open files is a common soft limit (systemd services, containers): the worker takes what
    the hard limit allows (up to 65536), as every connection and upload being received holds one."""

    def soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    serve(preexec=soft_limit)
    master = serve.processes[-1].pid
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    limits = Path(f"/proc/{worker}/limits").read_text()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()
    assert (soft, hard) == ("4096", "4096")


def _healthz(base: str):
    try:
        return requests.get(base + "/healthz", timeout=2).json()
    except requests.RequestException:
        return None


def test_a_large_upload_is_refused_at_once_when_it_cannot_be_taken(serve):
    base = serve(RELAY_MAX_BYTES="100000", RELAY_UPLOAD_STORE_BYTES="1500000", RELAY_MAX_JSON_BYTES="4096")
    host, port = base.removeprefix("http://").split(":")
    cases = [
        (upload_head(1_000_000, key="wrong-key"), b"HTTP/1.1 401", "unauthorized"),  # no key: nothing read
        (upload_head(5_000_000), b"HTTP/1.1 413", "request_too_large"),  # over RELAY_MAX_BYTES and a form
    ]
    for head, status, code in cases:
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(head)
            seen, answer = answer_of(sock)
        assert seen.startswith(status) and answer["error_code"] == code and answer["ok"] is False
    # What this process receives at once is bounded: a second file past RELAY_UPLOAD_STORE_BYTES waits.
    first = slow_upload(base, 1_000_000)
    try:
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(upload_head(1_000_000))
            seen, answer = answer_of(sock)
        assert seen.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 10\r\n" in seen
        assert answer["error_code"] == "upload_storage_full" and "receiving" in answer["error_message"]
    finally:
        first.close()


def test_an_upload_that_stalls_past_its_time_is_answered_408(serve):
    # 1 s, plus 1 s per 64 KiB it declares: 70 000 bytes have about 2.1 s.
    base = serve(RELAY_REQUEST_READ_TIMEOUT="1", RELAY_MAX_JSON_BYTES="4096")
    sock = slow_upload(base, 70_000)
    try:
        started = time.monotonic()
        seen, answer = answer_of(sock)
    finally:
        sock.close()
    assert seen.startswith(b"HTTP/1.1 408") and answer["error_code"] == "request_timeout"
    assert time.monotonic() - started < 15


def test_a_relay_that_stops_while_an_upload_arrives_says_it_is_restarting_and_logs_each_refusal(serve):
    # A deploy's SIGTERM cuts an arriving upload after a short grace: 503 relay_restarting (retry it),
    # not 408 "a slow or stalled connection" (which Make takes as the caller's own error).
    base = serve(RELAY_MAX_JSON_BYTES="4096")
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(upload_head(5_000_000_000))  # refused by the event loop at once: 413
        _, too_large = answer_of(sock)
    sock = slow_upload(base, 1_000_000)
    try:
        process = serve.processes[-1]
        process.terminate()
        seen, answer = answer_of(sock)
    finally:
        sock.close()
    assert seen.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 10\r\n" in seen
    assert answer["error_code"] == "relay_restarting" and answer["ok"] is False
    output = process.communicate(timeout=30)[0].decode()
    # One access line per answer, as the app writes for the requests it serves (request_id, code).
    for refused in (too_large, answer):
        [line] = [line for line in output.splitlines() if refused["request_id"] in line]
        logged = json.loads(line)
        assert logged["logger"] == "relay.access" and logged["error_code"] == refused["error_code"]
        assert logged["path"] == "/v1/voice-clones" and "name=" not in line  # never the query


def test_a_request_target_that_is_no_url_is_refused_and_logged_without_harm(serve):
    # "http://[/" makes urlsplit raise: logging its refusal killed the worker (a stalled one) or
    # left its connection counted for ever (a refused one; a thousand of them and it took no more).
    base = serve(RELAY_REQUEST_READ_TIMEOUT="1", RELAY_MAX_JSON_BYTES="4096")
    host, port = base.removeprefix("http://").split(":")
    head = b"POST http://[/v1/voice-clones HTTP/1.1\r\nHost: relay\r\n"
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + b"Content-Length: 999999999999\r\n\r\n")
        refused, _ = answer_of(sock)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + b"Content-Type: application/json\r\n")  # and stalls
        stalled, _ = answer_of(sock)
    assert refused.startswith(b"HTTP/1.1 413") and stalled.startswith(b"HTTP/1.1 408")
    assert requests.get(base + "/healthz", timeout=10).ok
    process = serve.processes[-1]
    process.terminate()
    output = process.communicate(timeout=30)[0].decode()
    assert "Exception in worker process" not in output and "exited with code" not in output
    assert output.count('"path": "http://[/v1/voice-clones"') == 2


def test_a_large_upload_sent_after_100_continue_is_served(serve):
    from .conftest import audio_bytes

    base = serve(RELAY_MAX_JSON_BYTES="4096")
    wav = audio_bytes("wav_pcm16_mono.wav")
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(upload_head(len(wav), extra="Expect: 100-continue\r\n"))
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(wav)
        seen, answer = answer_of(sock)
    assert seen.startswith(b"HTTP/1.1 202") and answer["status"] == "queued"


def test_a_content_length_of_thousands_of_digits_is_refused_and_the_worker_lives_on(serve):
    base = serve()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /v1/voice-clones HTTP/1.1\r\nHost: relay\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        seen, answer = answer_of(sock)
    assert seen.startswith(b"HTTP/1.1 413") and answer["error_code"] == "request_too_large"
    assert requests.get(base + "/healthz", timeout=10).json()["ok"] is True
    assert serve.processes[-1].poll() is None


def test_chunked_uploads_are_counted_as_they_arrive_and_may_end_with_trailers(serve):
    from .conftest import audio_bytes

    # A budget far below RELAY_MAX_BYTES: a small chunked file still fits; a declared one that
    # never could is 413 at once (retrying would not help), not 503.
    base = serve(RELAY_MAX_JSON_BYTES="4096", RELAY_UPLOAD_STORE_BYTES="200000")
    wav = audio_bytes("wav_pcm16_mono.wav")
    host, port = base.removeprefix("http://").split(":")
    head = upload_head(0).replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    body = b"".join(
        b"%x;piece=%d\r\n%s\r\n" % (len(wav[n : n + 9000]), n, wav[n : n + 9000]) for n in range(0, len(wav), 9000)
    )
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + body + b"0\r\nX-Checksum: none\r\n\r\n")
        seen, answer = answer_of(sock)
    assert seen.startswith(b"HTTP/1.1 202") and answer["status"] == "queued", answer
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(upload_head(300_000))
        seen, answer = answer_of(sock)
    assert seen.startswith(b"HTTP/1.1 413") and "RELAY_UPLOAD_STORE_BYTES" in answer["error_message"]


def test_an_upload_the_disk_cannot_hold_is_503_and_the_worker_lives_on(serve):
    import resource

    def small_files() -> None:  # every file the relay writes stops at 1 MiB, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))

    base = serve(preexec=small_files, RELAY_MAX_JSON_BYTES="4096")
    response = requests.post(  # requests reads an answer that comes while it still sends
        base + "/v1/voice-clones",
        params={"name": "Big", "wait_seconds": "0"},
        data=b"RIFF" + bytes(2_999_996),
        headers={**HEADERS, "Content-Type": "audio/wav"},
        timeout=30,
    )
    assert response.status_code == 503 and response.json()["error_code"] == "upload_storage_full"
    assert response.headers["Retry-After"] == "10" and "temporary disk" in response.json()["error_message"]
    assert requests.get(base + "/healthz", timeout=10).json()["ok"] is True
    assert serve.processes[-1].poll() is None


def test_a_malformed_chunked_body_is_answered_400_and_holds_no_thread(serve):
    # More such connections than threads, with the key, both small and past the buffer (a file).
    base = serve(RELAY_MAX_JSON_BYTES="4096")
    host, port = base.removeprefix("http://").split(":")
    head = upload_head(0).replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    bodies = [b"0\n\n", b"zz\r\n", b"1000\r\n" + b"R" * 4096 + b"\r\n" + b"1" * 17 + b"\r\n"] * 3
    for body in bodies:
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(head + body)
            seen, answer = answer_of(sock)
        assert seen.startswith(b"HTTP/1.1 400") and answer["error_code"] == "invalid_request", body[:20]
    assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True


def test_the_chunk_parser_finds_the_end_wherever_the_reads_split_the_body():
    from relay.server import Chunks

    body = b"4;ext=1\r\nabcd\r\n5\r\n0\r\n\r\n\r\n0\r\nX-Sum: 1\r\n\r\n"  # a payload holding "0\r\n\r\n"
    for split in range(1, len(body)):
        chunks = Chunks()
        chunks.feed(body[:split])
        assert not chunks.done or split == len(body), split
        chunks.feed(body[split:])
        assert chunks.done and not chunks.bad, split
