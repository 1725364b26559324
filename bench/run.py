"""Benchmarks: the relay measured side by side with the direct path, in one run, on loopback only.

    python bench/run.py                 # all four, writes bench/RESULTS.md
    python bench/run.py overhead memory # some of them

Everything listens on 127.0.0.0/8 and every loop is bounded. Each benchmark prints a ratio and its
target; RESULTS.md records the machine, versions and date of the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

HERE = Path(__file__).parent
AUDIO_HOST = "127.0.0.2"
KEY = "bench-relay-key-0123456789abcdef"
TOKEN = "bench-useapi-token-0123456789"
CHUNK = 256 * 1024


# --- the parts around the relay ---------------------------------------------------------------


def make_wav(path: Path, megabytes: int) -> Path:
    """A real PCM WAV of about ``megabytes`` MB (a quiet tone), written with the stdlib encoder."""
    frames_per_second, seconds = 44100, megabytes * 1_000_000 // (44100 * 4)
    one_second = b"".join(
        int(3000 * math.sin(2 * math.pi * 440 * n / frames_per_second)).to_bytes(2, "little", signed=True) * 2
        for n in range(frames_per_second)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(frames_per_second)
        for _ in range(seconds):
            out.writeframes(one_second)
    return path


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # noqa: D401 - silence
        pass


def serve(handler: type[BaseHTTPRequestHandler], host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Link:
    """Paces a transfer to ``mbps`` megabits per second (0: as fast as loopback goes)."""

    def __init__(self, mbps: float):
        self.bytes_per_s = mbps * 1e6 / 8
        self.started = time.perf_counter()
        self.moved = 0

    def pace(self, amount: int) -> None:
        self.moved += amount
        if self.bytes_per_s:
            ahead = self.moved / self.bytes_per_s - (time.perf_counter() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def file_host(path: Path, mbps: float = 0) -> ThreadingHTTPServer:
    """Serves one file at /audio.wav, streamed from disk (paced to ``mbps`` when given)."""
    size = path.stat().st_size

    class Handler(_Quiet):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            link = _Link(mbps)
            with open(path, "rb") as source:
                while chunk := source.read(CHUNK):
                    self.wfile.write(chunk)
                    link.pace(len(chunk))

    return serve(Handler, AUDIO_HOST)


def useapi_stand_in(delay: float = 0.0, mbps: float = 0) -> ThreadingHTTPServer:
    """Reads the whole upload (paced to ``mbps`` when given), waits ``delay`` s, answers like useapi (200)."""
    counter = {"n": 0}
    lock = threading.Lock()

    class Handler(_Quiet):
        def do_POST(self):
            remaining = int(self.headers.get("Content-Length", "0"))
            link = _Link(mbps)
            while remaining:
                got = len(self.rfile.read(min(CHUNK, remaining)))
                remaining -= got
                link.pace(got)
            time.sleep(delay)
            with lock:
                counter["n"] += 1
                item = f"{counter['n']:015d}"
            body = json.dumps(
                {"result": True, "itemId": item, "clonedVoiceItemId": f"user:1-tempolor:bench-voice:{item}"}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # the voice list, for if_exists and reconciliation
            body = b'{"records": [], "hasNext": false, "cursor": ""}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = serve(Handler, "127.0.0.1")
    server.uploads = counter  # type: ignore[attr-defined]
    return server


def receiver() -> ThreadingHTTPServer:
    class Handler(_Quiet):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return serve(Handler, AUDIO_HOST)


def url(server: ThreadingHTTPServer, path: str) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Relay:
    """The relay under gunicorn, configured by environment variables as in production."""

    def __init__(self, upstream: str, data_dir: str, **settings: str):
        self.port = free_port()
        env = {
            **os.environ,
            "PORT": str(self.port),
            "RELAY_BIND_HOST": "127.0.0.1",
            "WEB_CONCURRENCY": os.environ.get("BENCH_WEB_CONCURRENCY", "1"),
            "RELAY_THREADS": os.environ.get("BENCH_THREADS", "8"),  # the production default
            "RELAY_API_KEY": KEY,
            "USEAPI_TOKEN": TOKEN,
            "USEAPI_BASE_URL": upstream,
            "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
            "RELAY_DATA_DIR": data_dir,
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_MAX_BYTES": str(100 * 1024 * 1024),
            "RELAY_IDLE_POLL_SECONDS": "0.05",
            **settings,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:relay.gunicorn_conf", "relay:create_app()"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(self.base + "/healthz", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("the relay did not start")

    def rss_bytes(self) -> int:
        """Resident memory of gunicorn and its workers, summed."""
        total = 0
        pids = [self.process.pid, *self._children(self.process.pid)]
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except FileNotFoundError:
                pass
        return total

    @staticmethod
    def _children(pid: int) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().split(") ", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
                except (FileNotFoundError, IndexError, ValueError):
                    pass
        return found

    def clone(self, audio_url: str, **extra) -> requests.Response:
        return requests.post(
            self.base + "/v1/voice-clones",
            json={"audio_url": audio_url, "name": "bench", **extra},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


# --- the benchmarks -------------------------------------------------------------------------------


def direct(audio_url: str, upstream: str, spool_dir: str) -> None:
    """The floor: the same download, then the same upload, done with plain requests."""
    with tempfile.NamedTemporaryFile(dir=spool_dir) as spool:
        with requests.get(audio_url, stream=True, timeout=60) as response:
            for chunk in response.iter_content(CHUNK):
                spool.write(chunk)
        spool.flush()
        spool.seek(0)
        size = os.path.getsize(spool.name)
        requests.post(
            upstream + "/tempolor/music/cloned-voices/",
            params={"name": "bench"},
            data=spool,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "audio/wav", "Content-Length": str(size)},
            timeout=120,
        ).raise_for_status()


class PeakRss:
    """Samples the relay's resident memory every 5 ms while the block runs; ``bytes`` is the peak."""

    def __init__(self, relay: Relay):
        self.relay, self.bytes = relay, relay.rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.bytes = max(self.bytes, self.relay.rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def bench_overhead_and_memory(work: Path, runs: int, mbps: float = 0) -> dict:
    audio = work / "voice-40mb.wav"
    if not audio.exists():
        make_wav(audio, 40)
    host, upstream = file_host(audio, mbps), useapi_stand_in(mbps=mbps)
    base = url(upstream, "/v1")
    relay = Relay(base, str(work / "data-overhead"))
    try:
        relay.clone(url(host, "/audio.wav"), dry_run=True)  # warm-up: imports, database, connections
        relay_times, direct_times, peaks = [], [], []
        for _ in range(runs):
            started = time.perf_counter()
            direct(url(host, "/audio.wav"), base, str(work))
            direct_times.append(time.perf_counter() - started)

            idle = relay.rss_bytes()
            with PeakRss(relay) as peak:
                started = time.perf_counter()
                response = relay.clone(url(host, "/audio.wav"), wait_seconds=60)
                relay_times.append(time.perf_counter() - started)
            assert response.status_code == 200 and response.json()["status"] == "ready", response.text
            peaks.append(peak.bytes - idle)
    finally:
        relay.stop()
        host.shutdown()
        upstream.shutdown()
    relay_median, direct_median = statistics.median(relay_times), statistics.median(direct_times)
    return {
        "file_mb": round(audio.stat().st_size / 1e6, 1),
        "link": f"{mbps:g} Mbit/s each way" if mbps else "loopback, unpaced",
        "runs": runs,
        "relay_median_s": round(relay_median, 3),
        "direct_median_s": round(direct_median, 3),
        "overhead_ratio": round(relay_median / direct_median, 3),
        "memory_growth_mb": round(max(peaks) / 2**20, 1),
    }


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(share * len(ordered))) - 1)]


def hammer(call, clients: int, total: int) -> tuple[float, list[float]]:
    """``total`` calls from ``clients`` threads; (calls per second, latencies in seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(_):
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(total)))
    return total / (time.perf_counter() - started), latencies


def bench_intake(work: Path, clients: int, total: int) -> dict:
    audio = make_wav(work / "voice-short.wav", 1)
    host, upstream, hook = file_host(audio), useapi_stand_in(), receiver()
    # Workers off: this measures how fast jobs are accepted (validated, stored, answered).
    relay = Relay(url(upstream, "/v1"), str(work / "data-intake"), RELAY_INPROCESS_WORKERS="0")
    session_local = threading.local()

    def session() -> requests.Session:
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
        return session_local.s

    def healthz():
        session().get(relay.base + "/healthz", timeout=30).raise_for_status()

    def accept():
        response = session().post(
            relay.base + "/v1/voice-clones",
            json={"audio_url": url(host, "/audio.wav"), "name": "bench", "callback_url": url(hook, "/hook")},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert response.status_code == 202, response.text

    try:
        hammer(healthz, clients, clients * 4)  # warm-up
        health_rate, _ = hammer(healthz, clients, total)
        accept_rate, latencies = hammer(accept, clients, total)
    finally:
        relay.stop()
        for server in (host, upstream, hook):
            server.shutdown()
    return {
        "clients": clients,
        "requests": total,
        "healthz_per_s": round(health_rate, 1),
        "accepted_per_s": round(accept_rate, 1),
        "intake_ratio": round(accept_rate / health_rate, 3),
        "accept_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "accept_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


def bench_drain(work: Path, jobs: int, upstream_seconds: float, concurrency: int) -> dict:
    audio = make_wav(work / "voice-drain.wav", 1)
    host, upstream = file_host(audio), useapi_stand_in(delay=upstream_seconds)
    relay = Relay(
        url(upstream, "/v1"),
        str(work / "data-drain"),
        RELAY_INPROCESS_WORKERS=str(concurrency),
        RELAY_ACCOUNT_CONCURRENCY=str(concurrency),
    )
    try:
        started = time.perf_counter()
        ids = [relay.clone(url(host, "/audio.wav"), wait_seconds=0).json()["job_id"] for _ in range(jobs)]
        deadline = time.monotonic() + 10 * jobs * upstream_seconds / concurrency
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending)[:50]:
                answer = requests.get(
                    f"{relay.base}/v1/voice-clones/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
                ).json()
                if answer["status"] in ("ready", "failed"):
                    assert answer["status"] == "ready", answer
                    pending.discard(job_id)
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        assert not pending, f"{len(pending)} jobs did not finish"
        uploads = upstream.uploads["n"]  # type: ignore[attr-defined]
    finally:
        relay.stop()
        host.shutdown()
        upstream.shutdown()
    ideal = jobs * upstream_seconds / concurrency
    return {
        "jobs": jobs,
        "upstream_s_each": upstream_seconds,
        "worker_concurrency": concurrency,
        "uploads": uploads,
        "elapsed_s": round(elapsed, 1),
        "ideal_s": round(ideal, 1),
        "drain_ratio": round(elapsed / ideal, 3),
    }


TARGETS = {
    "overhead_ratio": ("≤", 1.10),
    "memory_growth_mb": ("≤", 16.0),
    "intake_ratio": ("≥", 0.5),
    "accept_p99_ms": ("≤", 100.0),
    "drain_ratio": ("≤", 1.2),
}


def verdict(name: str, value: float) -> str:
    sign, target = TARGETS[name]
    ok = value <= target if sign == "≤" else value >= target
    return f"{'PASS' if ok else 'MISS'} ({name} = {value}, target {sign} {target})"


def versions() -> dict:
    import importlib.metadata

    import gunicorn
    import sqlalchemy

    import relay

    return {
        "python": platform.python_version(),
        "relay": relay.__version__,
        "flask": importlib.metadata.version("flask"),
        "gunicorn": gunicorn.__version__,
        "requests": requests.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }


def write_results(results: dict) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python bench/run.py` on {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.platform()}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
        "Everything on loopback: the relay under gunicorn (1 process, SQLite job store), a file server for",
        "the audio, a useapi.net stand-in that reads the whole upload. Ratios are relay ÷ baseline, measured",
        "side by side in the same run. Intake: 50 closed-loop client threads (Python `requests`) on the same",
        "machine as the relay, in-process workers off, so only acceptance (validate, store, answer) is measured.",
        "Drain: the relay's in-process worker pool against a stand-in that takes the given seconds per upload.",
        "",
    ]
    for name, values in results.items():
        lines.append(f"## {name}")
        lines.append("")
        for key, value in values.items():
            marker = f" — {verdict(key, value)}" if key in TARGETS else ""
            lines.append(f"- `{key}`: {value}{marker}")
        lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "which", nargs="*", default=["overhead", "intake", "drain"], help="overhead (includes memory), intake, drain"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--drain-jobs", type=int, default=200)
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--drain-concurrency", type=int, default=10)
    parser.add_argument(
        "--link-mbps",
        type=float,
        default=1000,
        help="also measure the overhead over a link paced to this many Mbit/s (0: skip)",
    )
    args = parser.parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        if "overhead" in args.which or "memory" in args.which:
            results["overhead and memory (40 MB WAV, loopback)"] = bench_overhead_and_memory(work, args.runs)
            if args.link_mbps:
                results[f"overhead and memory (40 MB WAV, {args.link_mbps:g} Mbit/s link)"] = bench_overhead_and_memory(
                    work, args.runs, args.link_mbps
                )
        if "intake" in args.which:
            results["intake (callback_url jobs vs /healthz)"] = bench_intake(work, args.clients, args.requests)
        if "drain" in args.which:
            results["drain"] = bench_drain(work, args.drain_jobs, args.drain_seconds, args.drain_concurrency)
    for name, values in results.items():
        print(f"{name}: {json.dumps(values)}")
        for key, value in values.items():
            if key in TARGETS:
                print("   ", verdict(key, value))
    write_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
