"""Benchmarks: the relay measured side by side with the direct path, in one run, on loopback only.

    python bench/run.py                 # all four, writes bench/RESULTS.md
    python bench/run.py overhead memory # some of them

Everything listens on 127.0.0.0/8 and every loop is bounded. Each benchmark prints a ratio and its
target; RESULTS.md records the machine, versions and date of the run. The intake benchmark drives
the relay with wrk (Debian: apt-get install wrk), which needs little CPU of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
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

from relay.useapi import BlockAdapter

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

        def do_GET(self):  # the voice list, for if_exists and reconciliation; the bench's counter
            if self.path.endswith("/__uploads"):
                body = str(counter["n"]).encode()
            else:
                body = b'{"records": [], "hasNext": false, "cursor": ""}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return serve(Handler, "127.0.0.1")


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


def serve_part(config: dict) -> None:
    """In a part's process: start its servers, print their URLs, run until stdin closes."""
    if config["part"] == "audio":
        host, hook = file_host(Path(config["audio"]), config.get("mbps", 0)), receiver()
        urls = {"audio_url": url(host, "/audio.wav"), "hook": url(hook, "/hook")}
    else:
        upstream = useapi_stand_in(config.get("delay", 0.0), config.get("mbps", 0))
        urls = {"upstream": url(upstream, "/v1")}
    print(json.dumps(urls), flush=True)
    sys.stdin.read()


class Parts:
    """The audio host (with a callback receiver) and the useapi stand-in, each in a process of its own.

    Python threads share one interpreter lock: servers in the bench's own process would compete
    with its client (the direct path) but not with the relay, and one process serving both the
    download and the upload would serialize transfers that are, in real life, two other hosts."""

    def __init__(self, audio: Path, mbps: float = 0, delay: float = 0.0):
        self.processes, urls = [], {}
        for part in ("audio", "useapi"):
            config = json.dumps({"part": part, "audio": str(audio), "mbps": mbps, "delay": delay})
            process = subprocess.Popen(
                [sys.executable, __file__, "--part", config], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            self.processes.append(process)
            urls.update(json.loads(process.stdout.readline()))
        self.audio_url, self.upstream, self.hook = urls["audio_url"], urls["upstream"], urls["hook"]

    def uploads(self) -> int:
        return int(requests.get(self.upstream + "/__uploads", timeout=10).text)

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


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
            "RELAY_API_KEY": KEY,
            "USEAPI_TOKEN": TOKEN,
            "USEAPI_BASE_URL": upstream,
            "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
            "RELAY_DATA_DIR": data_dir,
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_MAX_BYTES": str(100 * 1024 * 1024),
            **settings,
        }
        if os.environ.get("BENCH_THREADS"):  # else relay/gunicorn_conf.py's production default
            env["RELAY_THREADS"] = os.environ["BENCH_THREADS"]
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


def direct(audio_url: str, upstream: str, spool_dir: str, same_blocks: bool = True) -> None:
    """The floor: the same download, then the same upload, done with plain requests.

    With ``same_blocks`` both transfers move 256 KiB per read and send, as the relay's do, so the
    ratio shows the relay's own cost and not a block-size difference; without it the upload uses
    requests' defaults (16 KiB blocks)."""
    session = requests.Session()
    if same_blocks:
        session.mount("http://", BlockAdapter())  # plain requests, given the relay's upload block size
    with session, tempfile.NamedTemporaryFile(dir=spool_dir) as spool:
        with session.get(audio_url, stream=True, timeout=60) as response:
            for chunk in response.iter_content(CHUNK):
                spool.write(chunk)
        spool.flush()
        spool.seek(0)
        size = os.path.getsize(spool.name)
        session.post(
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
    with Parts(audio, mbps) as parts:
        relay = Relay(parts.upstream, str(work / "data-overhead"))
        try:
            relay.clone(parts.audio_url, dry_run=True)  # warm-up: imports, database, connections
            relay_times, direct_times, default_times, peaks = [], [], [], []
            for _ in range(runs):  # timed runs, interleaved; nothing else runs meanwhile
                started = time.perf_counter()
                direct(parts.audio_url, parts.upstream, str(work))
                direct_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                direct(parts.audio_url, parts.upstream, str(work), same_blocks=False)
                default_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                response = relay.clone(parts.audio_url, wait_seconds=60)
                relay_times.append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["status"] == "ready", response.text
            for _ in range(runs):  # memory runs: sampling /proc every 5 ms costs CPU, so not timed
                idle = relay.rss_bytes()
                with PeakRss(relay) as peak:
                    response = relay.clone(parts.audio_url, wait_seconds=60)
                assert response.status_code == 200 and response.json()["status"] == "ready", response.text
                peaks.append(peak.bytes - idle)
        finally:
            relay.stop()
    relay_median, direct_median = statistics.median(relay_times), statistics.median(direct_times)
    return {
        "file_mb": round(audio.stat().st_size / 1e6, 1),
        "link": f"{mbps:g} Mbit/s each way" if mbps else "loopback, unpaced",
        "runs": runs,
        "relay_median_s": round(relay_median, 3),
        "direct_median_s": round(direct_median, 3),
        "direct_default_blocks_median_s": round(statistics.median(default_times), 3),
        "overhead_ratio": round(relay_median / direct_median, 3),
        "relay_extra_ms": round((relay_median - direct_median) * 1000, 1),
        "memory_growth_mb": round(max(peaks) / 2**20, 1),
    }


# wrk's script: every request is the same POST; done() prints one JSON line of what wrk saw.
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
    """``clients`` keep-alive connections sending for ``seconds`` (a bounded run) with wrk.

    wrk is written in C and needs a fraction of a core: a Python client on the same two cores
    would take much of the CPU the relay is being measured with."""
    if shutil.which("wrk") is None:
        raise SystemExit("the intake benchmark needs wrk (Debian: apt-get install wrk)")
    script = work / "wrk.lua"
    script.write_text(
        WRK_SCRIPT
        % {
            "method": json.dumps("POST" if body is not None else "GET"),
            "body": json.dumps(json.dumps(body)) if body is not None else "nil",
            "authorization": json.dumps(f"Bearer {KEY}"),
            "expect": expect,
        }
    )
    command = ["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "30s", "-s", str(script)]
    output = subprocess.run([*command, target], capture_output=True, text=True, timeout=seconds + 60, check=True)
    seen = json.loads(output.stdout.strip().splitlines()[-1])
    assert seen["unexpected_status"] == 0 and seen["socket_errors"] == 0, seen
    return seen


def bench_intake(work: Path, clients: int, seconds: float) -> dict:
    audio = make_wav(work / "voice-short.wav", 1)
    with Parts(audio) as parts:
        # Workers off: this measures how fast jobs are accepted (validated, stored, answered).
        relay = Relay(parts.upstream, str(work / "data-intake"), RELAY_INPROCESS_WORKERS="0")
        job = {"audio_url": parts.audio_url, "name": "bench", "callback_url": parts.hook}
        try:
            wrk(relay.base + "/healthz", clients, 2, work, 200)  # warm-up
            health = wrk(relay.base + "/healthz", clients, seconds, work, 200)
            accepted = wrk(relay.base + "/v1/voice-clones", clients, seconds, work, 202, job)
        finally:
            relay.stop()
    health_rate = health["requests"] / health["seconds"]
    accept_rate = accepted["requests"] / accepted["seconds"]
    return {
        "clients": clients,
        "seconds_each": seconds,
        "healthz_per_s": round(health_rate, 1),
        "accepted_per_s": round(accept_rate, 1),
        "jobs_accepted": accepted["requests"],
        "intake_ratio": round(accept_rate / health_rate, 3),
        "accept_p50_ms": round(accepted["p50_ms"], 1),
        "accept_p99_ms": round(accepted["p99_ms"], 1),
    }


def bench_drain(work: Path, jobs: int, upstream_seconds: float, concurrency: int) -> dict:
    audio = make_wav(work / "voice-drain.wav", 1)
    with Parts(audio, delay=upstream_seconds) as parts:
        relay = Relay(
            parts.upstream,
            str(work / "data-drain"),
            RELAY_INPROCESS_WORKERS=str(concurrency),
            RELAY_ACCOUNT_CONCURRENCY=str(concurrency),
        )
        try:
            started = time.perf_counter()
            ids = [relay.clone(parts.audio_url, wait_seconds=0).json()["job_id"] for _ in range(jobs)]
            deadline = time.monotonic() + 10 * jobs * upstream_seconds / concurrency
            pending = set(ids)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending)[:50]:
                    answer = requests.get(
                        f"{relay.base}/v1/voice-clones/{job_id}",
                        headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10,
                    ).json()
                    if answer["status"] in ("ready", "failed"):
                        assert answer["status"] == "ready", answer
                        pending.discard(job_id)
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            assert not pending, f"{len(pending)} jobs did not finish"
            uploads = parts.uploads()
        finally:
            relay.stop()
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
        "Everything on loopback: the relay under gunicorn with its production defaults (1 process, SQLite job",
        "store), and, each in a process of its own, a file server for the audio and a useapi.net stand-in that",
        "reads the whole upload. Ratios are relay ÷ baseline, measured side by side in the same run.",
        "Overhead: the baseline downloads and uploads with plain requests, moving 256 KiB per read and send",
        "as the relay does (`direct_default_blocks_median_s`: the same with requests' 16 KiB upload blocks).",
        "The relay uploads a file of 8 MiB or more while it downloads (its last 64 KiB after validation):",
        "over a link, where the transfers wait on the network, a clone takes about the longer transfer",
        "instead of their sum. On unpaced loopback the transfers wait on the 2 CPU cores instead (four",
        "processes copying 40 MB), so overlapping them gains little, and `relay_extra_ms` is mostly what",
        "the relay adds per clone whatever the file's size: the HTTP hop to it and the durable job",
        "(insert, claim, the write before the upload, the final write, the wake-up).",
        "Intake: wrk, 50 keep-alive connections on the same machine, in-process workers off, so only",
        "acceptance (validate, store, answer) is measured.",
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--part"]:  # a server's own process (see Parts)
        serve_part(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "which", nargs="*", default=["overhead", "intake", "drain"], help="overhead (includes memory), intake, drain"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each intake run")
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
            results["intake (callback_url jobs vs /healthz)"] = bench_intake(work, args.clients, args.seconds)
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
