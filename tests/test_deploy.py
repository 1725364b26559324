"""Deployment: Procfile, app.json, render.yaml, Dockerfile, /readyz, `relay clone`, and the Procfile
processes run for real (honcho) against PostgreSQL through a SIGTERM mid-job."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml

from relay import create_app, db
from relay.settings import _SPECS, Settings, SettingsError

from .conftest import AUDIO, AUDIO_HOST, RELAY_KEY, TOKEN, serve_file
from .fake_useapi import FakeUseapi
from .processes import stop, wait_until_answering

ROOT = Path(__file__).parent.parent
PG_URL = os.environ.get("RELAY_TEST_DATABASE_URL")
HEROKU_SCHEMA = os.environ.get("RELAY_TEST_HEROKU_APP_JSON_SCHEMA")
KNOWN_SETTINGS = {spec.env for spec in _SPECS} | {"PYTHON_VERSION", "WEB_CONCURRENCY"}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_procfile_runs_gunicorn_threaded_a_worker_and_migrations():
    processes = procfile()
    assert set(processes) == {"web", "worker", "release"}
    assert processes["web"].startswith("gunicorn -c python:relay.gunicorn_conf 'relay:create_app()'")
    assert processes["worker"] == "relay worker"
    assert processes["release"] == "relay migrate"


def test_gunicorn_settings_outlast_the_longest_wait(monkeypatch):
    monkeypatch.setenv("RELAY_MAX_WAIT_SECONDS", "280")
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    import importlib

    import relay.gunicorn_conf as conf

    conf = importlib.reload(conf)
    assert conf.worker_class == "relay.server.RelayWorker"
    assert conf.workers == 3
    assert conf.timeout > 280
    assert conf.graceful_timeout < 30


@pytest.mark.skipif(not HEROKU_SCHEMA, reason="RELAY_TEST_HEROKU_APP_JSON_SCHEMA not set (.ci/run fetches it)")
def test_app_json_passes_herokus_schema():
    schema = json.loads(Path(HEROKU_SCHEMA).read_text())
    jsonschema.validate(json.loads((ROOT / "app.json").read_text()), schema)


def test_app_json_deploys_without_editing_a_file():
    manifest = json.loads((ROOT / "app.json").read_text())
    env = manifest["env"]
    for secret in ("RELAY_API_KEY", "RELAY_WEBHOOK_SECRET", "RELAY_SECRET_KEY"):
        assert env[secret]["generator"] == "secret"
    assert env["USEAPI_TOKEN"]["required"] is False
    assert set(env) <= KNOWN_SETTINGS
    assert any(
        str(a.get("plan", a) if isinstance(a, dict) else a).startswith("heroku-postgresql") for a in manifest["addons"]
    )
    assert set(manifest["formation"]) == {"web", "worker"}
    assert manifest["buildpacks"] == [{"url": "heroku/python"}]
    assert (ROOT / ".python-version").read_text().strip().startswith("3.")
    # The Python buildpack stops a build without one of its package manager files (pyproject.toml
    # alone is not one): requirements.txt installs this project, whose pyproject.toml lists the rest.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")] == ["."]
    assert not any((ROOT / name).exists() for name in ("Pipfile.lock", "poetry.lock", "uv.lock"))  # one only
    # After the build, Heroku's "View" opens the start page (it says what to copy where), not JSON.
    assert manifest["success_url"] == "/"


def test_render_blueprint_fields():
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    assert set(blueprint) <= {"services", "databases", "envVarGroups", "previews"}
    (database,) = blueprint["databases"]
    assert {"name", "databaseName", "user"} <= set(database)
    services = {service["type"]: service for service in blueprint["services"]}
    assert set(services) == {"web", "worker"}
    names = {service["name"] for service in blueprint["services"]}
    for service in services.values():
        assert service["runtime"] == "python"
        assert set(service) <= {
            "type",
            "name",
            "runtime",
            "plan",
            "buildCommand",
            "startCommand",
            "preDeployCommand",
            "healthCheckPath",
            "envVars",
            "region",
            "numInstances",
            "autoDeploy",
        }
        for var in service["envVars"]:
            assert var["key"] in KNOWN_SETTINGS
            sources = {"value", "generateValue", "fromDatabase", "fromService", "sync"} & set(var)
            assert len(sources) == 1, var
            if "fromDatabase" in var:
                assert var["fromDatabase"] == {"name": database["name"], "property": "connectionString"}
            if "fromService" in var:
                assert var["fromService"]["name"] in names and var["fromService"]["envVarKey"]
            if "sync" in var:
                assert var["sync"] is False
    web = services["web"]
    assert web["healthCheckPath"] == "/readyz/web"  # a worker outage must not take the API down
    assert web["startCommand"] == procfile()["web"]
    assert services["worker"]["startCommand"] == procfile()["worker"]
    assert web["preDeployCommand"] == procfile()["release"]
    generated = {v["key"] for v in web["envVars"] if v.get("generateValue") is True}
    assert {"RELAY_API_KEY", "RELAY_WEBHOOK_SECRET", "RELAY_SECRET_KEY"} <= generated


def docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.skipif(not docker_engine(), reason="no Docker engine on this machine")
def test_the_docker_image_builds():
    result = subprocess.run(["docker", "build", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr


def test_the_dockerfile_runs_as_non_root_gunicorn():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER relay" in text and "-slim" in text
    assert '"python:relay.gunicorn_conf"' in text


# --- readiness ------------------------------------------------------------------------------


def test_readyz_is_ready_once_a_worker_beats(app):
    client = app.test_client()
    deadline = time.monotonic() + 10
    while (response := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert response.status_code == 200
    body = response.json
    assert body["ok"] is True and body["schema_version"] == body["schema_latest"]
    assert body["worker_heartbeat_age_seconds"] < 30


def test_readyz_without_any_worker_says_what_to_do(make_app, settings):
    client = make_app(settings, workers=0).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["database"] is True
    assert any("relay worker" in problem for problem in response.json["problems"])
    # The web process alone still takes and queues clones: its own readiness does not need a worker.
    web = client.get("/readyz/web")
    assert web.status_code == 200 and web.json["ok"] is True and web.json["problems"] == []
    assert any("relay worker" in warning for warning in web.json["warnings"])


def test_a_schema_migrated_by_a_newer_release_keeps_this_instance_in_rotation(make_app, settings):
    # Render runs the new release's `relay migrate` while this instance still serves (and a rollback
    # runs older code on a newer schema): a warning, not a failed health check.
    app = make_app(settings)
    engine = app.extensions["relay.runtime"].engine
    with engine.begin() as conn:
        conn.execute(
            db.schema_migrations.insert().values(version=db.LATEST + 1, name="a newer release", applied_at=db.utcnow())
        )
    client = app.test_client()
    web = client.get("/readyz/web")
    assert web.status_code == 200 and web.json["problems"] == []
    assert any("newer than this code's" in warning for warning in web.json["warnings"])
    page = client.get("/", headers={"Accept": "text/html"}).text
    assert "run <code>relay migrate</code>" not in page and "a deploy or rollback is under way" in page
    with engine.begin() as conn:  # an older schema is still a problem
        conn.execute(db.schema_migrations.delete().where(db.schema_migrations.c.version >= db.LATEST))
    older = client.get("/readyz/web")
    assert older.status_code == 503 and any("run `relay migrate`" in problem for problem in older.json["problems"])


# --- relay clone ----------------------------------------------------------------------------


def run_relay(*args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_relay_clone_of_a_local_file_uploads_it_with_progress(tmp_path):
    fake = FakeUseapi(TOKEN).start()
    try:
        result = run_relay(
            "clone",
            str(AUDIO / "m4a_alac.m4a"),
            "--name",
            "From shell",
            env={"USEAPI_BASE_URL": fake.base_url, "USEAPI_TOKEN": TOKEN, "RELAY_API_KEY": RELAY_KEY},
        )
    finally:
        fake.stop()
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["ok"], answer["status"], answer["audio_format"]) == (True, "ready", "m4a")
    assert "upload" in result.stderr and "100%" in result.stderr
    assert fake.uploads[0]["bytes"] == (AUDIO / "m4a_alac.m4a").stat().st_size
    assert TOKEN not in result.stdout + result.stderr


def test_relay_clone_of_a_url_goes_through_the_url_guard(audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    allowed = run_relay("clone", url, "--name", "x", "--dry-run", env={"RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert json.loads(allowed.stdout)["status"] == "validated"
    assert "download" in allowed.stderr
    refused = run_relay("clone", url, "--name", "x", "--dry-run", env={"RELAY_ALLOWED_NETWORKS": ""})
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error_code"] == "url_not_allowed"


def test_relay_clone_without_a_token_says_which_token_is_missing(tmp_path):
    env = {"USEAPI_TOKEN": "", "RELAY_API_KEY": ""}
    result = run_relay("clone", str(AUDIO / "m4a_alac.m4a"), "--name", "x", env=env)
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["error_code"] == "missing_upstream_token" and "--token" in answer["error_message"]


def test_relay_clone_of_a_file_named_from_its_own_folder_is_decoded_there(tmp_path):
    # A relative path, in a format the decoder child reads: the child runs in the package's folder.
    shutil.copy(AUDIO.parent / "media" / "voice_note.opus", tmp_path / "voice note.opus")
    env = {"PYTHONPATH": str(Path(__file__).parent.parent)}
    result = run_relay("clone", "voice note.opus", "--name", "x", "--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert (answer["status"], answer["source_format"], answer["converted"]) == ("validated", "opus", True)


def test_relay_clone_of_a_missing_file_says_so():
    result = run_relay("clone", "no/such/voice.m4a", "--name", "x", "--dry-run", env={})
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["error_code"] == "invalid_request"
    assert "No file at 'no/such/voice.m4a'" in answer["error_message"]


def test_relay_clone_of_a_folder_says_so(tmp_path):
    result = run_relay("clone", str(tmp_path), "--name", "x", "--dry-run", env={})
    assert result.returncode == 1, result.stderr
    answer = json.loads(result.stdout)
    assert answer["error_code"] == "invalid_request" and "is a folder" in answer["error_message"]


def test_relay_clone_of_a_file_over_relay_max_bytes_is_refused_as_the_server_refuses_it():
    # wav_pcm16_mono.wav is 64 KB; the server answers 413 for the same file sent to it.
    result = run_relay(
        "clone", str(AUDIO / "wav_pcm16_mono.wav"), "--name", "x", "--dry-run", env={"RELAY_MAX_BYTES": "10000"}
    )
    assert result.returncode == 1, result.stderr
    answer = json.loads(result.stdout)
    assert answer["error_code"] == "request_too_large"
    assert "(RELAY_MAX_BYTES)" in answer["error_message"] and answer["status"] == "failed"


def test_relay_clone_refuses_what_the_api_refuses():
    result = run_relay("clone", str(AUDIO / "m4a_alac.m4a"), "--name", "\u200b", "--dry-run", env={})
    assert (result.returncode, json.loads(result.stdout)["error_code"]) == (1, "invalid_request")


def test_the_command_line_needs_no_server_only_settings():
    # A server token without RELAY_API_KEY would be an open relay: refused for `serve`, not for the shell.
    env = {"USEAPI_TOKEN": "server-token-0000000000", "RELAY_API_KEY": ""}
    result = run_relay("clone", str(AUDIO / "m4a_alac.m4a"), "--name", "x", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "validated"


def test_relay_clone_waits_until_useapi_has_finished(tmp_path):
    fake = FakeUseapi(TOKEN).start()
    fake.ready_after_polls = 2
    try:
        env = {"USEAPI_BASE_URL": fake.base_url, "USEAPI_TOKEN": TOKEN, "RELAY_POLL_INTERVAL_SECONDS": "0.05"}
        result = run_relay("clone", str(AUDIO / "m4a_alac.m4a"), "--name", "Slow", env=env)
    finally:
        fake.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["status"] == "ready"


def test_relay_clone_still_processing_exits_3_and_says_how_to_follow_it():
    fake = FakeUseapi(TOKEN).start()
    fake.ready_after_polls = 3
    try:
        env = {"USEAPI_BASE_URL": fake.base_url, "USEAPI_TOKEN": TOKEN, "RELAY_POLL_INTERVAL_SECONDS": "0.05"}
        result = run_relay("clone", str(AUDIO / "m4a_alac.m4a"), "--name", "Slow", "--wait", "0", env=env)
        assert result.returncode == 3, result.stdout + result.stderr
        answer = json.loads(result.stdout)
        assert (answer["ok"], answer["status"]) == (True, "processing")
        voice_id = answer["cloned_voice_item_id"]
        assert f"relay voice {voice_id}" in answer["message"]
        followed = run_relay("voice", voice_id, "--wait", "30", env=env)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        assert json.loads(followed.stdout)["status"] == "ready"
        gone = run_relay("voice", voice_id.replace("voice:", "voice:0"), env=env)
    finally:
        fake.stop()
    answer = json.loads(gone.stdout)
    assert (gone.returncode, answer["error_code"], answer["upstream_status"]) == (1, "voice_not_found", 404)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        # (gunicorn itself parses WEB_CONCURRENCY before it loads the relay: see the README's settings)
        ({"RELAY_THREADS": "0"}, "RELAY_THREADS must be at least 2"),
        ({"DATABASE_URL": "mysql://u@127.0.0.1/relay"}, "DATABASE_URL must start with"),
        ({"DATABASE_URL": "postgres://u@127.0.0.1:9/relay"}, "cannot reach the database at 127.0.0.1:9"),
    ],
)
def test_the_procfile_web_process_stops_with_one_line_before_listening(env, says, tmp_path):
    command = ["gunicorn", "-c", "python:relay.gunicorn_conf", "relay:create_app()"]
    env = {**os.environ, "PORT": str(free_port()), "RELAY_DATA_DIR": str(tmp_path), **env}
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    result = subprocess.run([gunicorn, *command[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "relay:" in line]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Listening" not in result.stderr


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"WEB_CONCURRENCY": "abc"}, "WEB_CONCURRENCY='abc' is invalid: expected a whole number"),
        ({"RELAY_THREADS": "0"}, "RELAY_THREADS must be at least 2"),
        ({"RELAY_MAX_BYTES": "abc"}, "RELAY_MAX_BYTES='abc' is invalid: expected a whole number"),
        ({"DATABASE_URL": "mysql://u@127.0.0.1/relay"}, "DATABASE_URL must start with"),
    ],
)
def test_relay_serve_stops_with_one_line_naming_the_setting(env, says):
    result = run_relay("serve", env={"PORT": str(free_port()), **env})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["serve"], ["migrate"], ["worker"]])
def test_an_unreachable_database_is_one_line_naming_the_host(command, tmp_path):
    env = {"DATABASE_URL": "postgres://relay@127.0.0.1:9/relay", "PORT": str(free_port())}
    result = run_relay(*command, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot reach the database at 127.0.0.1:9" in result.stderr and "DATABASE_URL" in result.stderr
    assert "listening" not in result.stderr


def test_a_database_server_that_answers_but_refuses_is_told_apart_from_one_not_reached():
    from relay.preflight import database_problem
    from relay.settings import Settings

    from . import servers
    from .conftest import PG_URL

    def web_server(conn, stop):  # DATABASE_URL pointed at a web server's port by mistake
        conn.sendall(servers.headers("400 Bad Request", Content_Length="0"))

    with servers.RawServer(web_server, host="127.0.0.1") as web:
        said = database_problem(Settings().replace(database_url=f"postgresql://u@127.0.0.1:{web.port}/db"))
    # The whole reason, not its last clause ("H", from psycopg's "…SSL negotiation: H").
    assert f"cannot reach the database at 127.0.0.1:{web.port}" in said and "SSL negotiation: H" in said
    if not PG_URL:
        pytest.skip("RELAY_TEST_DATABASE_URL is not set (.ci/run starts PostgreSQL and sets it)")
    missing = PG_URL.rsplit("/", 1)[0] + "/no_such_database_here"
    said = database_problem(Settings().replace(database_url=missing))
    assert said.startswith("the database server at ") and "refused the connection" in said
    assert 'database "no_such_database_here" does not exist' in said and "Start PostgreSQL" not in said


# --- the Procfile, for real -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Honcho:
    """`honcho start web worker` from the repository's Procfile."""

    def __init__(self, env: dict, log: Path):
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "start", "web", "worker"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def terminate(self, timeout: float = 40) -> None:
        try:
            stop(self.process, timeout, group=True)
        finally:
            self.log.close()


@pytest.mark.skipif(not PG_URL, reason="RELAY_TEST_DATABASE_URL is not set (.ci/run starts PostgreSQL)")
def test_procfile_processes_survive_sigterm_mid_job_and_finish_it_once(audio_host, tmp_path):
    from sqlalchemy import text

    from relay import db

    engine = db.connect(db.database_url(PG_URL, ""))
    db.migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, heartbeats, accounts, job_events"))
    engine.dispose()
    fake = FakeUseapi(TOKEN).start()
    fake.upload_delay = 4  # SIGTERM arrives while the upload is in flight
    port = free_port()
    secret_key, webhook_secret = "procfile-secret-key-0123456789abcdef", "procfile-webhook-secret-0123456789"
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PORT": str(port),
        "RELAY_BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": PG_URL,
        "USEAPI_BASE_URL": fake.base_url,
        "RELAY_API_KEY": RELAY_KEY,
        "RELAY_SECRET_KEY": secret_key,
        "RELAY_WEBHOOK_SECRET": webhook_secret,
        "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
        "RELAY_INPROCESS_WORKERS": "0",
        "RELAY_LEASE_SECONDS": "2",
        "RELAY_IDLE_POLL_SECONDS": "0.2",
        "RELAY_RECONCILE_GRACE_SECONDS": "1",
    }
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "honcho.log"
    signed_url = serve_file(audio_host, "wav_pcm16_mono.wav", path="/v.wav") + "?X-Amz-Signature=sig-s3cr3t"
    first = Honcho(env, log)
    try:
        wait_until_answering(base + "/readyz", first.process, log, ready=lambda r: r.status_code == 200)
        response = requests.post(
            base + "/v1/voice-clones",
            json={"audio_url": signed_url, "name": "Procfile", "wait_seconds": 0},
            headers={"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN, "X-Request-Id": "req-procfile"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        assert response.headers["X-Request-Id"] == "req-procfile"
        status_url = response.json()["status_url"]
        deadline = time.monotonic() + 20
        while fake.upload_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        first.terminate()
    second = Honcho(env, log)
    try:
        deadline = time.monotonic() + 40
        answer = {}
        while time.monotonic() < deadline:
            try:
                answer = requests.get(status_url, headers={"Authorization": f"Bearer {RELAY_KEY}"}, timeout=2).json()
                if answer["status"] in ("ready", "failed"):
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
    finally:
        second.terminate()
        fake.stop()
    assert answer.get("status") == "ready", answer
    assert fake.upload_count() == 1
    logs = log.read_text()
    assert '"job_id"' in logs and "req-procfile" in logs
    for secret in (RELAY_KEY, TOKEN, secret_key, webhook_secret, "sig-s3cr3t"):
        assert secret not in logs


def test_a_worker_dyno_without_a_shared_database_refuses_to_start(tmp_path):
    """On Heroku each dyno has its own disk: without DATABASE_URL the worker and the web process
    would keep jobs in separate SQLite files, and every clone would wait an hour for a worker that runs."""
    env = {"DYNO": "worker.1", "DATABASE_URL": "", "RELAY_DATA_DIR": str(tmp_path / "data")}
    result = run_relay("worker", env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "DATABASE_URL is not set" in result.stderr and "heroku addons:create heroku-postgresql" in result.stderr


def test_a_render_web_service_that_leaves_jobs_to_a_worker_needs_a_shared_database(monkeypatch, tmp_path):
    monkeypatch.setenv("RENDER", "true")
    monkeypatch.delenv("DYNO", raising=False)
    with pytest.raises(SettingsError, match="on Render each web process has a disk of its own"):
        create_app(Settings(data_dir=str(tmp_path / "a"), inprocess_workers=0))
    # One web service that works its own jobs needs no other process: SQLite is its choice to make.
    app = create_app(Settings(data_dir=str(tmp_path / "b")), workers=0)
    app.extensions["relay.runtime"].close()
