"""Benchmarks: the relay measured side by side with its baselines, in one run, on loopback only.

    python bench/run.py                        # every part, writes bench/RESULTS.md
    python bench/run.py transfer concurrency   # some parts: transfer, link, concurrency, capacity, intake, drain
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python bench/run.py intake drain

How it keeps its figures honest:

- every process it starts (the relay under gunicorn, the audio host, the useapi stand-in, the
  direct-path clients, wrk) runs in a process group of its own and is killed, group and all, when
  the bench ends, also when it fails or is interrupted; each waits for readiness with a deadline and
  says which process did not come up, with the end of its output;
- the relay and its baselines run alternately, round by round (ABAB, the order rotating each
  round), after a warm-up round that is discarded, and each run starts only once the previous one's
  processes have gone quiet (their CPU counters stopped moving), so one's clean-up does not land in
  the other's time;
- ratios are of medians, with the min–max of the per-round ratios beside them;
- the direct baselines run in client processes of their own, started before the timing (a Python
  client in the bench's process would share its interpreter lock with the bench's own threads), and
  beside the ``requests`` baseline a raw-socket floor: the download read into a reused buffer and
  dropped, the upload sent from the file with ``socket.sendfile``;
- over a paced link both directions share one bottleneck (a time-slot reservation in a shared file),
  as they share the relay host's link;
- each part gets its own database: a SQLite file in its own directory (the relay's embedded
  default), and with ``BENCH_DATABASE_URL`` (a PostgreSQL server URL; the bench creates a database
  of its own per part on that server and drops it after) intake also runs on PostgreSQL with two web
  processes, and drain with four ``relay worker`` processes;
- intake and ``/healthz`` are measured with wrk (Debian: ``apt-get install wrk``) in alternating
  windows, so both see the same machine;
- every loop is bounded, and everything listens on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import fcntl
import json
import math
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

HERE = Path(__file__).parent
AUDIO_HOST = "127.0.0.2"
KEY = "bench-relay-key-0123456789abcdef"
TOKEN = "bench-useapi-token-0123456789"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
CHUNK = 256 * 1024
READY_TIMEOUT = 60.0  # seconds a started process has to answer


# --- processes: started in their own group, always cleaned up ---------------------------------------


class Processes:
    """Every process the bench starts. :meth:`kill_all` ends each one's whole process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def start(self, command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        with self.lock:
            self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 30.0) -> None:
        """SIGTERM to the group, SIGKILL if it is still there after ``timeout``."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers left in the group
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with self.lock:
            if process in self.started:
                self.started.remove(process)

    def kill_all(self) -> None:
        for process in list(self.started):
            self.stop(process, timeout=5)


PROCESSES = Processes()
atexit.register(PROCESSES.kill_all)


def _on_signal(signum, _frame):
    PROCESSES.kill_all()
    raise SystemExit(128 + signum)


def output_tail(process: subprocess.Popen, path: Path | None) -> str:
    if path is not None and path.exists():
        return path.read_text(errors="replace")[-3000:]
    return "(no output captured)"


def wait_ready(url: str, process: subprocess.Popen, what: str, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200, for at most :data:`READY_TIMEOUT` seconds."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = output_tail(process, log)
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready within {READY_TIMEOUT:g} s:\n{output_tail(process, log)}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (their threads included, also those that ended).

    Read from each process's CPU-time clock, in nanoseconds, as ``time.process_time()`` reads the
    direct clients' own: /proc's user and system times are whole 10 ms ticks, which made a batch
    of ten 35 ms clones ±10 % by rounding alone. /proc is the fallback where that clock is refused.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime_ns(_process_cpu_clock(pid)) / 1e9
            continue
        except OSError:
            pass
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            pass
    return total


def _process_cpu_clock(pid: int) -> int:
    """The clock id ``clock_getcpuclockid(pid)`` gives on Linux (Python does not wrap that call):
    the whole process's scheduler CPU time."""
    return (~pid << 3) | 2


def group_pids(leader: int) -> list[int]:
    """The leader and its descendants (gunicorn's master and workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
                pass
    found, frontier = [leader], [leader]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def settle(pids: list[int], quiet: float = 0.15, limit: float = 5.0) -> None:
    """Wait (at most ``limit`` s) until ``pids`` used under 5 % CPU for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pids)
        time.sleep(quiet)
        if cpu_seconds(pids) - before <= 0.05 * quiet:
            return


# --- audio, the paced link, the parts around the relay ------------------------------------------------


def make_wav(path: Path, megabytes: int) -> Path:
    """A real PCM WAV of about ``megabytes`` MB (a quiet tone), written with the stdlib encoder."""
    if path.exists():
        return path
    rate, seconds = 44100, max(1, megabytes * 1_000_000 // (44100 * 4))
    one_second = b"".join(
        int(3000 * math.sin(2 * math.pi * 440 * n / rate)).to_bytes(2, "little", signed=True) * 2 for n in range(rate)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        for _ in range(seconds):
            out.writeframes(one_second)
    return path


class SharedLink:
    """One paced bottleneck shared by every process that opens the same file.

    Each block reserves the next free slot of ``len / rate`` seconds on the link (the slot's end is
    kept in the file, under ``flock``), and its sender sleeps until that slot ends: the download
    and the upload of a clone, in two processes, share the link as they would a host's one link."""

    def __init__(self, path: str, mbps: float):
        self.bytes_per_s = mbps * 1e6 / 8
        self.handle = open(path, "r+b")  # noqa: SIM115 - lives as long as the server process
        self.map = mmap.mmap(self.handle.fileno(), 8)

    @staticmethod
    def create(path: Path) -> str:
        path.write_bytes(struct.pack("d", 0.0))
        return str(path)

    def pace(self, amount: int) -> None:
        if not self.bytes_per_s:
            return
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        try:
            now = time.time()
            (free_at,) = struct.unpack("d", self.map[:8])
            ends = max(now, free_at) + amount / self.bytes_per_s
            self.map[:8] = struct.pack("d", ends)
        finally:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
        delay = ends - time.time()
        if delay > 0:
            time.sleep(delay)


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections, as useapi's edge keeps them
    # Headers and body go out in separate writes: without this, a kept-alive connection waits for
    # the client's delayed ACK (40 ms) between them, which no real server makes anyone wait.
    disable_nagle_algorithm = True

    def handle(self):
        with contextlib.suppress(ConnectionError):  # a relay stopped mid-request
            super().handle()

    def log_message(self, *args):
        pass


def serve(handler: type[BaseHTTPRequestHandler], host: str) -> ThreadingHTTPServer:
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url(server: ThreadingHTTPServer, path: str) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def run_part(config: dict) -> None:
    """In a part's own process: serve, print the URLs as one JSON line, run until stdin closes."""
    link = SharedLink(config["link"], config["mbps"]) if config.get("link") else None
    pace = link.pace if link else (lambda amount: None)
    if config["part"] == "audio":
        path = Path(config["audio"])
        size = path.stat().st_size

        class Audio(_Quiet):
            def do_GET(self):
                if self.path == "/ok":
                    return self._small(200, b"ok")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with open(path, "rb") as source:
                    while chunk := source.read(CHUNK):
                        pace(len(chunk))
                        self.wfile.write(chunk)

            def do_POST(self):  # the callback receiver
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._small(204, b"")

            def _small(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = serve(Audio, AUDIO_HOST)
        print(json.dumps({"audio_url": url(server, "/audio.wav"), "hook": url(server, "/hook")}), flush=True)
    else:
        delay, counter, lock = config.get("delay", 0.0), {"n": 0}, threading.Lock()

        class Useapi(_Quiet):
            def do_POST(self):
                remaining = int(self.headers.get("Content-Length", "0"))
                while remaining:
                    got = len(self.rfile.read(min(CHUNK, remaining)))
                    if not got:
                        return
                    pace(got)
                    remaining -= got
                time.sleep(delay)
                with lock:
                    counter["n"] += 1
                    counter["last"] = time.time()  # when the last clone was answered (drain's clock)
                    item = f"{counter['n']:015d}"
                body = json.dumps(
                    {"result": True, "itemId": item, "clonedVoiceItemId": f"user:1-tempolor:bench-voice:{item}"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # the voice list (if_exists, reconciliation) and the bench's counter
                body = (
                    json.dumps(counter).encode()
                    if self.path.endswith("/__uploads")
                    else (b'{"records": [], "hasNext": false, "cursor": ""}')
                )
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = serve(Useapi, "127.0.0.1")
        print(json.dumps({"upstream": url(server, "/v1")}), flush=True)
    sys.stdin.read()


class Parts:
    """The audio host (and callback receiver) and the useapi stand-in, each in a process of its own,
    so neither competes for an interpreter lock with the other, the clients or the relay."""

    def __init__(self, work: Path, audio: Path, mbps: float = 0, delay: float = 0.0, shared_link: bool = True):
        self.processes: list[subprocess.Popen] = []
        links = {}
        if mbps:
            one = SharedLink.create(work / f"link-{uuid.uuid4().hex[:8]}")
            links = {"audio": one, "useapi": one if shared_link else SharedLink.create(work / "link-up")}
        urls: dict[str, str] = {}
        try:
            for part in ("audio", "useapi"):
                config = {"part": part, "audio": str(audio), "mbps": mbps, "delay": delay, "link": links.get(part)}
                process = PROCESSES.start(
                    [sys.executable, __file__, "--part", json.dumps(config)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                self.processes.append(process)
                line = _readline(process, READY_TIMEOUT, f"the {part} server")
                urls.update(json.loads(line))
        except BaseException:
            self.close()
            raise
        self.audio_url, self.upstream, self.hook = urls["audio_url"], urls["upstream"], urls["hook"]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def uploads(self) -> int:
        return self.counter()["n"]

    def counter(self) -> dict:
        """``n``: clones answered; ``last``: when the last one was (time.time())."""
        return requests.get(self.upstream + "/__uploads", timeout=10).json()

    def close(self) -> None:
        for process in self.processes:
            PROCESSES.stop(process, timeout=5)

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _readline(process: subprocess.Popen, timeout: float, what: str) -> str:
    """One line of ``process``'s stdout within ``timeout`` seconds (its readiness signal)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got or not got[0]:
        raise RuntimeError(f"{what} did not start within {timeout:g} s (exit code {process.poll()})")
    return got[0]


# --- databases: one per part --------------------------------------------------------------------------


@contextlib.contextmanager
def part_database(work: Path, name: str, postgres: bool = False) -> Iterator[dict[str, str]]:
    """Environment for a part's relay: its own SQLite file, or (``postgres``) its own database
    created on the ``BENCH_DATABASE_URL`` server and dropped afterwards."""
    server = os.environ.get("BENCH_DATABASE_URL")
    data_dir = work / f"data-{name}"
    if not postgres:
        yield {"RELAY_DATA_DIR": str(data_dir)}
        return
    import psycopg

    database = f"relay_bench_{name}_{os.getpid()}"
    base = server.replace("postgres://", "postgresql://", 1)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {"RELAY_DATA_DIR": str(data_dir), "DATABASE_URL": urlsplit(base)._replace(path=f"/{database}").geturl()}
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# --- the relay ----------------------------------------------------------------------------------------


class Relay:
    """The relay under gunicorn, configured by environment variables as in production."""

    def __init__(
        self, work: Path, upstream: str, database: dict[str, str], gunicorn_args: tuple[str, ...] = (), **settings: str
    ):
        self.port = free_port()
        self.log = work / f"relay-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(
            {
                "PORT": str(self.port),
                "RELAY_BIND_HOST": "127.0.0.1",
                "RELAY_API_KEY": KEY,
                "USEAPI_TOKEN": TOKEN,
                "RELAY_SECRET_KEY": SECRET_KEY,
                "USEAPI_BASE_URL": upstream,
                "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
                "RELAY_LOG_LEVEL": "WARNING",
                "RELAY_MAX_BYTES": str(100 * 1024 * 1024),
                # Spool files in the bench's own folder: a relay stopped mid-clone leaves none in /tmp.
                "TMPDIR": str(work),
                **database,
                **settings,
            }
        )
        if "WEB_CONCURRENCY" not in settings:
            env["WEB_CONCURRENCY"] = os.environ.get("BENCH_WEB_CONCURRENCY", "2" if "DATABASE_URL" in env else "1")
        self.processes = int(env["WEB_CONCURRENCY"])
        self.env = env
        self.workers: list[subprocess.Popen] = []
        with open(self.log, "wb") as log:
            self.process = PROCESSES.start(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:relay.gunicorn_conf",
                    *gunicorn_args,
                    *os.environ.get("BENCH_GUNICORN_ARGS", "").split(),
                    "relay:create_app()",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_ready(self.base + "/healthz", self.process, "the relay (gunicorn)", self.log)
            # gunicorn answers from its first worker; wait until every worker process is up.
            deadline = time.monotonic() + READY_TIMEOUT
            while len(group_pids(self.process.pid)) < 1 + self.processes and time.monotonic() < deadline:
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return group_pids(self.process.pid)

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def clone(self, audio_url: str, timeout: float = 180, **extra) -> requests.Response:
        return requests.post(
            self.base + "/v1/voice-clones",
            json={"audio_url": audio_url, "name": "bench", **extra},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=timeout,
        )

    def status(self, job_id: str) -> dict:
        return requests.get(
            f"{self.base}/v1/voice-clones/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        ).json()

    def start_workers(self, processes: int, concurrency: int) -> None:
        """``processes`` × ``relay worker`` (the Procfile's worker), each ready once its heartbeat is in."""
        for n in range(processes):
            log = self.log.with_suffix(f".worker{n}.log")
            with open(log, "wb") as out:
                process = PROCESSES.start(
                    [sys.executable, "-m", "relay.cli", "worker"],
                    env={**self.env, "RELAY_WORKER_CONCURRENCY": str(concurrency)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.workers.append(process)
            self._wait_heartbeats(n + 1, process, log)

    def _wait_heartbeats(self, count: int, process: subprocess.Popen, log: Path) -> None:
        """Until ``count`` worker processes beat in the database (``/readyz`` is ready with one)."""
        import psycopg

        deadline = time.monotonic() + READY_TIMEOUT
        with psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as conn:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"a relay worker exited with {process.returncode}:\n{output_tail(process, log)}")
                if conn.execute("SELECT count(*) FROM heartbeats").fetchone()[0] >= count:
                    return
                time.sleep(0.05)
        raise RuntimeError(f"a relay worker was not ready within {READY_TIMEOUT:g} s:\n{output_tail(process, log)}")

    def stop(self) -> None:
        for process in self.workers:
            PROCESSES.stop(process, timeout=30)
        PROCESSES.stop(self.process, timeout=30)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the direct baselines, in client processes of their own --------------------------------------------


def direct_requests(audio_url: str, upstream: str, spool_dir: str) -> None:
    """The baseline: the same download to a spool file, then the same upload, with plain requests
    (given the relay's 256 KiB upload block, so block size is not what the ratio shows)."""
    from relay.useapi import BlockAdapter

    with requests.Session() as session, tempfile.NamedTemporaryFile(dir=spool_dir) as spool:
        session.mount("http://", BlockAdapter())
        with session.get(audio_url, stream=True, timeout=120) as response:
            response.raise_for_status()
            for chunk in response.iter_content(CHUNK):
                spool.write(chunk)
        spool.flush()
        size = spool.tell()
        spool.seek(0)
        session.post(
            upstream + "/tempolor/music/cloned-voices/",
            params={"name": "bench"},
            data=spool,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "audio/wav", "Content-Length": str(size)},
            timeout=300,
        ).raise_for_status()


def _http_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the answer's head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError("no Content-Length")


def direct_floor(audio_url: str, upstream: str, local_copy: str) -> None:
    """The raw-socket floor: the download read into one reused buffer and dropped (/dev/null), the
    upload sent from a local copy of the same file with ``socket.sendfile`` (zero-copy)."""
    source = urlsplit(audio_url)
    with socket.create_connection((source.hostname, source.port), timeout=120) as sock:
        sock.sendall(f"GET {source.path} HTTP/1.1\r\nHost: {source.netloc}\r\nConnection: close\r\n\r\n".encode())
        head, rest = _http_head(sock)
        remaining = _content_length(head) - len(rest)
        buffer = memoryview(bytearray(CHUNK))
        while remaining > 0:
            got = sock.recv_into(buffer, min(CHUNK, remaining))
            if not got:
                raise RuntimeError("download cut short")
            remaining -= got
    target = urlsplit(upstream + "/tempolor/music/cloned-voices/?name=bench")
    size = os.path.getsize(local_copy)
    with socket.create_connection((target.hostname, target.port), timeout=300) as sock, open(local_copy, "rb") as body:
        sock.sendall(
            (
                f"POST {target.path}?{target.query} HTTP/1.1\r\nHost: {target.netloc}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: audio/wav\r\nContent-Length: {size}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        sock.sendfile(body)
        head, _ = _http_head(sock)
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(head.decode(errors="replace"))


def run_client() -> None:
    """A direct-path client process: one JSON command per stdin line, one JSON answer per stdout line."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        cpu, started = time.process_time(), time.perf_counter()
        error = None
        try:
            if command["op"] == "requests":
                direct_requests(command["audio_url"], command["upstream"], command["spool_dir"])
            else:
                direct_floor(command["audio_url"], command["upstream"], command["local_copy"])
        except Exception as err:  # reported to the bench, which stops
            error = repr(err)
        print(
            json.dumps({"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "error": error}),
            flush=True,
        )


class Clients:
    """``n`` direct-path client processes, started (and their imports done) before any timing."""

    def __init__(self, n: int):
        self.processes = []
        try:
            for _ in range(n):
                process = PROCESSES.start(
                    [sys.executable, __file__, "--client"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                self.processes.append(process)
            for process in self.processes:
                _readline(process, READY_TIMEOUT, "a direct-path client")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def run(self, commands: list[dict]) -> tuple[float, list[dict]]:
        """Send one command to each of the first ``len(commands)`` clients at once; wall time and answers."""
        started = time.perf_counter()
        for process, command in zip(self.processes, commands, strict=False):
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
        used = self.processes[: len(commands)]
        answers = [json.loads(_readline(process, 600, "a direct-path run")) for process in used]
        elapsed = time.perf_counter() - started
        for answer in answers:
            if answer["error"]:
                raise RuntimeError(f"direct path failed: {answer['error']}")
        return elapsed, answers

    def close(self) -> None:
        for process in self.processes:
            PROCESSES.stop(process, timeout=5)


# --- measuring ------------------------------------------------------------------------------------------


def alternate(variants: dict[str, Callable[[], dict]], runs: int, quiet: Callable[[], None]) -> dict[str, list[dict]]:
    """Run each variant once per round, ``runs`` rounds after one warm-up round (discarded); the
    order rotates each round (ABAB…, BA…), and each run starts once everything has gone quiet."""
    names = list(variants)
    kept: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(runs + 1):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            quiet()
            result = variants[name]()
            if round_number:  # round 0 warms imports, connections, caches and the database
                kept[name].append(result)
    return kept


def compare(relay: list[float], baseline: list[float]) -> dict:
    """Ratio of medians, with the min–max of the per-round ratios."""
    per_round = [a / b for a, b in zip(relay, baseline, strict=True)]
    return {
        "ratio": round(statistics.median(relay) / statistics.median(baseline), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
    }


class PeakRss:
    """Samples the relay's resident memory every 10 ms while the block runs; ``bytes`` is the peak."""

    def __init__(self, relay: Relay):
        self.relay, self.bytes = relay, relay.rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.bytes = max(self.bytes, self.relay.rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)


def _ready(response: requests.Response) -> None:
    if response.status_code != 200 or response.json().get("status") != "ready":
        raise RuntimeError(f"the relay did not end the clone ready: {response.status_code} {response.text[:500]}")


# --- the parts of the bench ----------------------------------------------------------------------------------


def bench_transfer(work: Path, runs: int, mbps: float = 0, shared_link: bool = True) -> dict:
    """One 40 MB clone: the relay against the direct requests path and the raw-socket floor; CPU per clone."""
    audio = make_wav(work / "voice-40mb.wav", 40)
    clients = Clients(1)
    name = "link" if mbps else "transfer"
    try:
        with part_database(work, name) as database, Parts(work, audio, mbps, shared_link=shared_link) as parts:
            with Relay(work, parts.upstream, database) as relay:
                pids = parts.pids + clients.pids

                def quiet():
                    settle(relay.pids + pids)

                def via_relay(clones: int = 1):
                    cpu_before = cpu_seconds(relay.pids)
                    started = time.perf_counter()
                    for _ in range(clones):
                        _ready(relay.clone(parts.audio_url, wait_seconds=120))
                    elapsed = time.perf_counter() - started
                    settle(relay.pids)  # the clones' last writes belong to their CPU cost
                    return {"seconds": elapsed / clones, "cpu": (cpu_seconds(relay.pids) - cpu_before) / clones}

                def direct(op: str, clones: int = 1):
                    command = {"op": op, "audio_url": parts.audio_url, "upstream": parts.upstream}
                    command.update(spool_dir=str(work), local_copy=str(audio))
                    answers = [clients.run([command])[1][0] for _ in range(clones)]
                    return {key: sum(a[key] for a in answers) / clones for key in ("seconds", "cpu")}

                kept = alternate(
                    {"relay": via_relay, "requests": lambda: direct("requests"), "floor": lambda: direct("floor")},
                    runs,
                    quiet,
                )
                if not mbps:
                    # CPU in batches of 10 clones: the kernel counts a process's CPU in 10 ms ticks.
                    cpu = alternate(
                        {"relay": lambda: via_relay(10), "requests": lambda: direct("requests", 10)},
                        max(3, runs // 2),
                        quiet,
                    )
    finally:
        clients.close()
    relay_s = [r["seconds"] for r in kept["relay"]]
    requests_s = [r["seconds"] for r in kept["requests"]]
    floor_s = [r["seconds"] for r in kept["floor"]]
    result = {
        "file_mb": round(audio.stat().st_size / 1e6, 1),
        "link": (f"{mbps:g} Mbit/s, " + ("one bottleneck for both directions" if shared_link else "each direction"))
        if mbps
        else "loopback, unpaced",
        "rounds": runs,
        "relay_median_s": round(statistics.median(relay_s), 3),
        "requests_median_s": round(statistics.median(requests_s), 3),
        "floor_median_s": round(statistics.median(floor_s), 3),
        "relay_vs_requests": compare(relay_s, requests_s),
        "relay_vs_floor": compare(relay_s, floor_s),
        "relay_extra_ms": round((statistics.median(relay_s) - statistics.median(requests_s)) * 1000, 1),
    }
    if not mbps:
        relay_cpu = [r["cpu"] for r in cpu["relay"]]
        requests_cpu = [r["cpu"] for r in cpu["requests"]]
        result.update(
            relay_cpu_per_clone_s=round(statistics.median(relay_cpu), 3),
            requests_cpu_per_clone_s=round(statistics.median(requests_cpu), 3),
            floor_cpu_per_clone_s=round(statistics.median(r["cpu"] for r in kept["floor"]), 3),
            cpu_relay_vs_requests=compare(relay_cpu, requests_cpu),
        )
    return result


def bench_concurrency(work: Path, runs: int, n: int = 8) -> dict:
    """``n`` 40 MB clones at once through the relay, against ``n`` direct clients in ``n`` processes;
    then, untimed, the relay's memory growth while ``n`` clones run."""
    audio = make_wav(work / "voice-40mb.wav", 40)
    clients = Clients(n)
    try:
        with part_database(work, "concurrency") as database, Parts(work, audio) as parts:
            with Relay(work, parts.upstream, database) as relay:

                def quiet():
                    settle(relay.pids + parts.pids + clients.pids)

                def burst() -> float:
                    responses: list[requests.Response | BaseException] = []

                    def one():
                        try:
                            responses.append(relay.clone(parts.audio_url, wait_seconds=240, timeout=300))
                        except BaseException as err:  # reported below
                            responses.append(err)

                    threads = [threading.Thread(target=one) for _ in range(n)]
                    started = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join(300)
                    elapsed = time.perf_counter() - started
                    if len(responses) != n:
                        raise RuntimeError("a concurrent clone did not answer within 300 s")
                    for response in responses:
                        if isinstance(response, BaseException):
                            raise RuntimeError(f"a concurrent clone failed: {response!r}")
                        _ready(response)
                    return elapsed

                def direct():
                    command = {"op": "requests", "audio_url": parts.audio_url, "upstream": parts.upstream}
                    command["spool_dir"] = str(work)
                    return {"seconds": clients.run([command] * n)[0]}

                kept = alternate({"relay": lambda: {"seconds": burst()}, "direct": direct}, runs, quiet)
                growth = []
                for _ in range(2):
                    quiet()
                    idle = relay.rss_bytes()
                    with PeakRss(relay) as peak:
                        burst()
                    growth.append(peak.bytes - idle)
    finally:
        clients.close()
    relay_s = [r["seconds"] for r in kept["relay"]]
    direct_s = [r["seconds"] for r in kept["direct"]]
    return {
        "clones_at_once": n,
        "rounds": runs,
        "relay_median_s": round(statistics.median(relay_s), 3),
        "direct_median_s": round(statistics.median(direct_s), 3),
        "relay_vs_direct": compare(relay_s, direct_s),
        "memory_growth_mb": round(max(growth) / 2**20, 1),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# The web server as it was before the relay's worker class and waiter budget: gunicorn's stock
# gthread worker with 32 threads, every request allowed to wait.
STOCK_GTHREAD = {"gunicorn_args": ("--worker-class", "gthread", "--threads", "32")}
STOCK_SETTINGS = {"RELAY_THREADS": "1024", "RELAY_MAX_WAITERS": "1023"}


def bench_capacity(work: Path, waiters: int, slow: int, upstream_seconds: float, wait: float) -> dict:
    """The relay as configured, then the stock gthread server (the baseline), each under the same load."""
    result = _capacity(work, "capacity", waiters, slow, upstream_seconds, wait, {}, {})
    baseline = _capacity(work, "capacity_stock", waiters, slow, upstream_seconds, wait, STOCK_GTHREAD, STOCK_SETTINGS)
    result = {"database": "SQLite, 1 web process", **result}
    for key in ("healthz_failures", "healthz_p99_s", "accept_failures", "accept_p99_s", "waited_clones_not_ready"):
        result[f"stock_gthread_{key}"] = baseline[key]
    return result


def _capacity(
    work: Path,
    name: str,
    waiters: int,
    slow: int,
    upstream_seconds: float,
    wait: float,
    server: dict,
    env: dict,
    postgres: bool = False,
) -> dict:
    """``slow`` slow senders (half slowloris heads, half uploads dripping their bodies) and ``waiters``
    clones waiting ``wait`` s on an upstream that
    takes ``upstream_seconds`` per upload, all at once; meanwhile /healthz and new clones are probed.
    Afterwards every waited clone must end ready."""
    audio = make_wav(work / "voice-short.wav", 1)
    accounts = 10
    with part_database(work, name, postgres) as database, Parts(work, audio, delay=upstream_seconds) as parts:
        # Enough clone workers that the slow upstream, not the queue, is what the requests wait on.
        settings = {"RELAY_INPROCESS_WORKERS": "50", "RELAY_UPLOAD_TIMEOUT": "120", **env}
        with Relay(work, parts.upstream, database, **server, **settings) as relay:
            settle(relay.pids)
            host, port = "127.0.0.1", relay.port
            stop = threading.Event()
            slow_socks: list[socket.socket] = []
            upload = (  # a recording sent as the body, whose bytes then come one every 2 s
                "POST /v1/voice-clones?name=Slow&dry_run=true HTTP/1.1\r\nHost: relay\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: audio/wav\r\nContent-Length: 1000000\r\n\r\nRIFF"
            ).encode()
            for n in range(slow):
                sock = socket.create_connection((host, port), timeout=10)
                # Half send their head slowly (a slowloris), half their body (a slow upload).
                sock.sendall(b"POST /v1/voice-clones HTTP/1.1\r\nHost: relay\r\n" if n % 2 == 0 else upload)
                slow_socks.append(sock)

            def drip():  # one more byte every 2 s on each, as a slowloris does (bounded by stop)
                while not stop.wait(2):
                    for sock in slow_socks:
                        with contextlib.suppress(OSError):
                            sock.sendall(b"X")

            answers: list[dict] = []
            lock = threading.Lock()

            def waiter(n: int):
                try:
                    account = f"bench{n % accounts}"
                    response = relay.clone(parts.audio_url, wait_seconds=wait, user_id=account, timeout=wait + 30)
                    item = {"status": response.status_code, "body": response.json()}
                except requests.RequestException as err:
                    item = {"status": None, "body": {"error": repr(err)}}
                with lock:
                    answers.append(item)

            health: list[float | None] = []
            accepted: list[float | None] = []

            def probe(kind: str):
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        if kind == "health":
                            ok = requests.get(relay.base + "/healthz", timeout=30).status_code == 200
                        else:
                            response = relay.clone(parts.audio_url, wait_seconds=0, timeout=30, dry_run=True)
                            ok = response.status_code == 202
                    except requests.RequestException:
                        ok = False
                    elapsed = time.perf_counter() - started
                    (health if kind == "health" else accepted).append(elapsed if ok else None)
                    stop.wait(0.1 if kind == "health" else 0.25)

            threads = [threading.Thread(target=drip, daemon=True)]
            threads += [threading.Thread(target=probe, args=("health",), daemon=True)]
            threads += [threading.Thread(target=probe, args=("accept",), daemon=True)]
            waiting = [threading.Thread(target=waiter, args=(n,), daemon=True) for n in range(waiters)]
            for thread in threads + waiting:
                thread.start()
            for thread in waiting:
                thread.join(wait + 60)
            stop.set()
            for thread in threads:
                thread.join(15)
            for sock in slow_socks:
                sock.close()
            # Every waited clone ends ready (polled, at most 5 minutes).
            ids = {a["body"].get("job_id") for a in answers if a["body"].get("job_id")}
            pending, deadline = set(ids), time.monotonic() + 300
            failed = []
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    status = relay.status(job_id)["status"]
                    if status in ("ready", "failed"):
                        pending.discard(job_id)
                        if status == "failed":
                            failed.append(job_id)
                time.sleep(0.5)
    got_health = [v for v in health if v is not None]
    got_accept = [v for v in accepted if v is not None]
    answered_at_once = sum(1 for a in answers if any("RELAY_MAX_WAITERS" in w for w in a["body"].get("warnings") or []))
    return {
        "slow_connections": slow,
        "waiting_clones": waiters,
        "upstream_s_each": upstream_seconds,
        "wait_seconds": wait,
        "healthz_probes": len(health),
        "healthz_failures": len(health) - len(got_health),
        "healthz_p99_s": round(_percentile(got_health, 0.99), 3) if got_health else None,
        "accept_probes": len(accepted),
        "accept_failures": len(accepted) - len(got_accept),
        "accept_p99_s": round(_percentile(got_accept, 0.99), 3) if got_accept else None,
        "waiters_answered": len(answers),
        "waiters_answered_at_once_past_budget": answered_at_once,
        "waited_clones_ready": len(ids) - len(pending) - len(failed),
        "waited_clones_not_ready": len(pending) + len(failed) + (waiters - len(ids)),
    }


# wrk's script: every request is the same; done() prints one JSON line of what wrk saw.
WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = %(authorization)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) wrong = 0 end
function response(status, headers, body) if status ~= %(expect)d then wrong = wrong + 1 end end
function done(summary, latency, requests)
  local w = 0
  for _, thread in ipairs(threads) do w = w + thread:get("wrong") end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "seconds": %%f, "unexpected_status": %%d, "socket_errors": %%d, ' ..
    '"p50_ms": %%f, "p99_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6, w, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def wrk(target: str, clients: int, seconds: float, work: Path, expect: int, body: dict | None = None) -> dict:
    """``clients`` keep-alive connections for ``seconds`` (bounded) with wrk, which is written in C
    and leaves the CPU to the relay."""
    if shutil.which("wrk") is None:
        raise SystemExit("the intake part needs wrk (Debian: apt-get install wrk)")
    script = work / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    script.write_text(
        WRK_SCRIPT
        % {
            "method": json.dumps("POST" if body is not None else "GET"),
            "body": json.dumps(json.dumps(body)) if body is not None else "nil",
            "authorization": json.dumps(f"Bearer {KEY}"),
            "expect": expect,
        }
    )
    command = ["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(script)]
    command.append(target)
    process = PROCESSES.start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=seconds + 60)
    finally:
        PROCESSES.stop(process, timeout=5)
    if process.returncode:
        raise RuntimeError(f"wrk failed: {err[-2000:]}")
    seen = json.loads(out.strip().splitlines()[-1])
    if seen["unexpected_status"] or seen["socket_errors"]:
        raise RuntimeError(f"wrk saw failures: {seen}")
    return seen


def bench_intake(work: Path, clients: int, windows: int, window_seconds: float, postgres: bool = False) -> dict:
    """Jobs accepted per second against a bare /healthz, in alternating windows of the same run."""
    audio = make_wav(work / "voice-short.wav", 1)
    name = "intake_pg" if postgres else "intake"
    with part_database(work, name, postgres) as database, Parts(work, audio) as parts:
        # Clone workers off: only acceptance (validate, store, answer) is measured.
        with Relay(work, parts.upstream, database, RELAY_INPROCESS_WORKERS="0") as relay:
            job = {"audio_url": parts.audio_url, "name": "bench", "callback_url": parts.hook}
            wrk(relay.base + "/healthz", clients, 1, work, 200)  # warm-up, discarded
            wrk(relay.base + "/v1/voice-clones", clients, 1, work, 202, job)
            health, intake = [], []
            for window in range(windows):
                order = [("health", None), ("intake", job)] if window % 2 == 0 else [("intake", job), ("health", None)]
                for kind, body in order:
                    settle(relay.pids)
                    if kind == "health":
                        health.append(wrk(relay.base + "/healthz", clients, window_seconds, work, 200))
                    else:
                        intake.append(wrk(relay.base + "/v1/voice-clones", clients, window_seconds, work, 202, body))
            processes = relay.processes
    health_rates = [w["requests"] / w["seconds"] for w in health]
    intake_rates = [w["requests"] / w["seconds"] for w in intake]
    per_window = [i / h for i, h in zip(intake_rates, health_rates, strict=True)]
    return {
        "database": "PostgreSQL" if "DATABASE_URL" in database else "SQLite",
        "web_processes": processes,
        "connections": clients,
        "windows_each": f"{windows} × {window_seconds:g} s, alternating",
        "healthz_per_s": round(statistics.median(health_rates), 1),
        "accepted_per_s": round(statistics.median(intake_rates), 1),
        "jobs_accepted": sum(w["requests"] for w in intake),
        "intake_vs_healthz": {
            "ratio": round(statistics.median(intake_rates) / statistics.median(health_rates), 3),
            "min": round(min(per_window), 3),
            "max": round(max(per_window), 3),
        },
        "accept_p99_ms": round(statistics.median(w["p99_ms"] for w in intake), 1),
        "accept_p99_ms_max": round(max(w["p99_ms"] for w in intake), 1),
        "healthz_p99_ms": round(statistics.median(w["p99_ms"] for w in health), 1),
    }


def submit_backlog(relay: Relay, audio_url: str, jobs: int, clients: int = 8) -> list[str]:
    """``jobs`` clones sent by ``clients`` kept-alive connections at once, as a bulk scenario does."""
    local = threading.local()

    def one(_: int) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(
            relay.base + "/v1/voice-clones",
            json={"audio_url": audio_url, "name": "bench", "wait_seconds": 0},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        return response.json()["job_id"]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(jobs)))


def bench_drain(work: Path, jobs: int, upstream_seconds: float, concurrency: int, worker_processes: int = 0) -> dict:
    """``jobs`` clones against an upstream taking ``upstream_seconds`` each: the in-process pool
    (``worker_processes=0``, SQLite), or that many ``relay worker`` processes on PostgreSQL."""
    audio = make_wav(work / "voice-short.wav", 1)
    postgres = worker_processes > 0
    total = concurrency * max(worker_processes, 1)
    name = "drain_pg" if postgres else "drain"
    with part_database(work, name, postgres) as database, Parts(work, audio, delay=upstream_seconds) as parts:
        with Relay(
            work,
            parts.upstream,
            database,
            RELAY_INPROCESS_WORKERS="0" if postgres else str(concurrency),
            RELAY_ACCOUNT_CONCURRENCY=str(total),
            WEB_CONCURRENCY="2" if postgres else "1",
        ) as relay:
            if postgres:
                relay.start_workers(worker_processes, concurrency)
            started = time.time()
            ids = submit_backlog(relay, parts.audio_url, jobs)
            # Watch the stand-in's count (one cheap request), not 200 status pages: polling them
            # would load the 2 cores the workers run on. Its clock ends the figure, so how often
            # this loop looks does not count (the relay's final write after it takes about 1 ms).
            deadline = time.monotonic() + 10 * jobs * upstream_seconds / total + 60
            while parts.counter()["n"] < jobs and time.monotonic() < deadline:
                time.sleep(0.2)
            counter = parts.counter()
            elapsed, uploads = counter.get("last", time.time()) - started, counter["n"]
            statuses: list[str] = []
            with requests.Session() as session:  # then every job must have ended ready
                while time.monotonic() < deadline:
                    statuses = [
                        session.get(
                            f"{relay.base}/v1/voice-clones/{job_id}",
                            headers={"Authorization": f"Bearer {KEY}"},
                            timeout=10,
                        ).json()["status"]
                        for job_id in ids
                    ]
                    if all(status in ("ready", "failed") for status in statuses):
                        break
                    time.sleep(0.2)
            not_ready = len(ids) - statuses.count("ready")
            if not_ready or uploads != jobs:
                raise RuntimeError(f"{not_ready} jobs did not end ready; {uploads} uploads for {jobs} jobs")
    ideal = jobs * upstream_seconds / total
    return {
        "database": "PostgreSQL" if postgres else "SQLite",
        "jobs": jobs,
        "upstream_s_each": upstream_seconds,
        "worker_processes": worker_processes or "in the web process",
        "clone_workers": total,
        "uploads": uploads,
        "elapsed_s": round(elapsed, 1),
        "ideal_s": round(ideal, 1),
        "drain_ratio": round(elapsed / ideal, 3),
    }


# --- targets and the report -------------------------------------------------------------------------------

TARGETS = {
    "relay_vs_requests": ("≤", 1.00),
    "relay_vs_floor": ("≤", 1.20),
    "cpu_relay_vs_requests": ("≤", 1.10),
    "relay_vs_direct": ("≤", 1.10),
    "memory_growth_mb": ("≤", 64.0),
    "healthz_p99_s": ("≤", 1.0),
    "healthz_failures": ("≤", 0),
    "accept_p99_s": ("≤", 2.0),
    "accept_failures": ("≤", 0),
    "waited_clones_not_ready": ("≤", 0),
    "intake_vs_healthz": ("≥", 0.6),
    "accept_p99_ms": ("≤", 100.0),
    "drain_ratio": ("≤", 1.2),
}
LINK_TARGET = ("≤", 0.55)  # over a link: the relay against the sequential direct path


def verdict(name: str, value, section: str = "") -> str | None:
    if name == "relay_vs_requests" and "shared by both directions" in section:
        # Both transfers cross one wire: overlapping them cannot beat their sum, so ≈ 1.0 is the
        # physical floor and the 0.55 target belongs to the full-duplex figure; judged by the floor.
        return "(no target: one shared wire; see relay_vs_floor and the full-duplex figure)"
    sign, target = LINK_TARGET if (name == "relay_vs_requests" and "Mbit/s" in section) else TARGETS[name]
    figure = value["ratio"] if isinstance(value, dict) else value
    if figure is None:
        return f"MISS ({name}: no value)"
    ok = figure <= target if sign == "≤" else figure >= target
    return f"{'PASS' if ok else 'MISS'} (target {sign} {target})"


def shown(value) -> str:
    if isinstance(value, dict) and "ratio" in value:
        return f"{value['ratio']} (per round {value['min']}–{value['max']})"
    return str(value)


def versions() -> dict:
    import importlib.metadata

    import gunicorn
    import sqlalchemy

    import relay

    found = {
        "python": platform.python_version(),
        "relay": relay.__version__,
        "flask": importlib.metadata.version("flask"),
        "gunicorn": gunicorn.__version__,
        "requests": requests.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }
    if shutil.which("wrk"):
        found["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1:2][0]
    return found


def load_note() -> str:
    load1, load5, load15 = os.getloadavg()
    return f"load average at the end {load1:.2f} / {load5:.2f} / {load15:.2f} (1 / 5 / 15 min)"


def report(results: dict, started: datetime, elapsed: float, note: str) -> list[str]:
    lines = [
        "# Benchmark results",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC with `python bench/run.py` ({elapsed / 60:.1f} min) "
        f"on {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.platform()}; {load_note()}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
        "",
    ]
    if note:
        lines += [note, ""]
    for section, values in results.items():
        lines += [f"## {section}", "", "| figure | value | target |", "|---|---|---|"]
        for key, value in values.items():
            mark = verdict(key, value, section) if key in TARGETS else ""
            lines.append(f"| `{key}` | {shown(value)} | {mark or ''} |")
        lines.append("")
    return lines


PARTS = ("transfer", "link", "concurrency", "capacity", "intake", "drain")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--part"]:  # a server's own process (see Parts)
        run_part(json.loads(argv[1]))
        return 0
    if argv[:1] == ["--client"]:  # a direct-path client's own process (see Clients)
        run_client()
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=list(PARTS), help=", ".join(PARTS))
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per comparison (after one warm-up round)")
    parser.add_argument("--link-mbps", type=float, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--waiters", type=int, default=100)
    parser.add_argument("--slow-connections", type=int, default=64)
    parser.add_argument("--slow-upstream-seconds", type=float, default=25.0)
    parser.add_argument("--clients", type=int, default=50, help="intake: wrk connections")
    parser.add_argument("--windows", type=int, default=4, help="intake: windows of each kind")
    parser.add_argument("--window-seconds", type=float, default=3.0)
    parser.add_argument("--drain-jobs", type=int, default=200)
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--drain-concurrency", type=int, default=10)
    parser.add_argument("--note", default="", help="a line for RESULTS.md (e.g. what else loaded the machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    unknown = set(args.which) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, _on_signal)
    started_at, started = datetime.now(UTC), time.perf_counter()
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            work = Path(tmp)
            steps: list[tuple[str, Callable[[], dict]]] = []
            if "transfer" in args.which:
                steps.append(("one 40 MB clone, loopback", lambda: bench_transfer(work, args.runs)))
            if "link" in args.which and args.link_mbps:
                steps.append(
                    (
                        f"one 40 MB clone, {args.link_mbps:g} Mbit/s link shared by both directions",
                        lambda: bench_transfer(work, args.runs, args.link_mbps),
                    )
                )
                steps.append(
                    (
                        f"one 40 MB clone, {args.link_mbps:g} Mbit/s each direction (full duplex)",
                        lambda: bench_transfer(work, args.runs, args.link_mbps, shared_link=False),
                    )
                )
            if "concurrency" in args.which:
                steps.append(
                    (f"{args.concurrency} clones at once", lambda: bench_concurrency(work, args.runs, args.concurrency))
                )
            if "capacity" in args.which:
                steps.append(
                    (
                        "capacity: slow clients and waiting clones at once",
                        lambda: bench_capacity(
                            work, args.waiters, args.slow_connections, args.slow_upstream_seconds, 25.0
                        ),
                    )
                )
            postgres = bool(os.environ.get("BENCH_DATABASE_URL"))
            if "capacity" in args.which and postgres:
                steps.append(
                    (
                        "capacity on PostgreSQL, 2 web processes",
                        lambda: {
                            "database": "PostgreSQL, 2 web processes",
                            **_capacity(
                                work,
                                "capacity_pg",
                                args.waiters,
                                args.slow_connections,
                                args.slow_upstream_seconds,
                                25.0,
                                {},
                                {"RELAY_INPROCESS_WORKERS": "25"},  # 50 clone workers in all, as on SQLite
                                postgres=True,
                            ),
                        },
                    )
                )
            if not postgres and ("intake" in args.which or "drain" in args.which):
                print("(BENCH_DATABASE_URL not set: intake and drain on SQLite only)", flush=True)
            if "intake" in args.which:
                steps.append(
                    ("intake, SQLite", lambda: bench_intake(work, args.clients, args.windows, args.window_seconds))
                )
                if postgres:
                    steps.append(
                        (
                            "intake, PostgreSQL",
                            lambda: bench_intake(work, args.clients, args.windows, args.window_seconds, True),
                        )
                    )
            if "drain" in args.which:
                steps.append(
                    (
                        "drain, in-process workers, SQLite",
                        lambda: bench_drain(work, args.drain_jobs, args.drain_seconds, args.drain_concurrency),
                    )
                )
                if postgres:
                    steps.append(
                        (
                            "drain, 4 worker processes, PostgreSQL",
                            lambda: bench_drain(work, args.drain_jobs, args.drain_seconds, args.drain_concurrency, 4),
                        )
                    )
            for name, step in steps:
                print(f"== {name}", flush=True)
                results[name] = step()
                for key, value in results[name].items():
                    mark = verdict(key, value, name) if key in TARGETS else ""
                    print(f"   {key}: {shown(value)}{'  ' + mark if mark else ''}", flush=True)
    finally:
        PROCESSES.kill_all()
    if not args.no_write and results:
        lines = report(results, started_at, time.perf_counter() - started, args.note)
        (HERE / "RESULTS.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
