"""Durable jobs on SQLite and PostgreSQL: waiting, callbacks, idempotency, leases, crashes.

Every test here runs once per database. PostgreSQL runs where RELAY_TEST_DATABASE_URL names a
server (`.ci/run` starts one); elsewhere those cases are skipped, visibly.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import text
from standardwebhooks import Webhook
from werkzeug import Request, Response

from relay import answers, db
from relay.jobs import Claim, JobStore
from relay.runner import Spot
from relay.worker import Notifier

from . import processes, servers
from .conftest import (
    AUDIO_HOST,
    HEADERS,
    JOBS_SECRET_KEY,
    JOBS_WEBHOOK_SECRET,
    RELAY_KEY,
    TOKEN,
    audio_bytes,
    in_threads,
    post,
    serve_file,
    wait_until,
)

PG_URL = os.environ.get("RELAY_TEST_DATABASE_URL")
WEBHOOK_SECRET = JOBS_WEBHOOK_SECRET
SECRET_KEY = JOBS_SECRET_KEY


def store_for(settings, kind: type[JobStore] = JobStore) -> JobStore:
    return kind(db.connect(db.database_url(settings.database_url, settings.data_dir)))


BARE = {"request": {"audio_url": "x", "name": "x"}, "token_kind": "server", "answer": {}}


def add_job(store: JobStore, job_id: str, **values) -> None:
    """A bare job, due at once (what the queue tests need of one)."""
    store.create(job_id, **BARE, **values)


# --- waiting --------------------------------------------------------------------------------


def test_a_change_between_reading_a_job_and_waiting_is_not_missed():
    notifier = Notifier()
    seen = notifier.generation  # a request reads its job here...
    notifier.job_changed()  # ...a worker finishes it before the request starts to wait
    started = time.monotonic()
    notifier.wait_for_change(5, since=seen)
    assert time.monotonic() - started < 1
    started = time.monotonic()
    notifier.wait_for_change(0.2, since=notifier.generation)  # nothing new: it does wait
    assert time.monotonic() - started >= 0.2


def test_a_short_wait_answers_202_and_the_job_finishes_anyway(make_app, job_settings, fake, audio_host):
    fake.ready_after_polls = 4
    client = make_app(job_settings.replace(poll_interval_seconds=0.2)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    started = time.monotonic()
    response = post(client, {"audio_url": url, "name": "Slow", "wait_seconds": 0.3})
    assert time.monotonic() - started < 3
    assert response.status_code == 202
    body = response.json
    assert body["ok"] is True and body["status"] in ("queued", "running", "processing")
    assert body["job_id"] and body["status_url"].endswith(f"/v1/voice-clones/{body['job_id']}")
    path = "/v1/voice-clones/" + body["job_id"]
    final = wait_until(lambda: (r := client.get(path, headers=HEADERS)).json["status"] == "ready" and r)
    assert final.status_code == 200
    assert final.json["cloned_voice_item_id"] and final.json["completed_at"]
    assert fake.upload_count() == 1


def test_a_wait_that_sees_the_end_answers_like_the_synchronous_relay(make_app, job_settings, fake, audio_host):
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "flac_mono.flac")
    response = post(client, {"audio_url": url, "name": "Quick", "wait_seconds": 10})
    assert response.status_code == 200
    assert (response.json["status"], response.json["audio_format"]) == ("ready", "flac")
    assert fake.uploads[0]["bytes"] == len(audio_bytes("flac_mono.flac"))


def test_429_before_acceptance_is_retried_honouring_retry_after(make_app, job_settings, fake, audio_host):
    fake.refusals = [(429, {"Retry-After": "1"}), (503, {"Retry-After": "1"})]
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = post(client, {"audio_url": url, "name": "Patient", "wait_seconds": 15})
    assert response.status_code == 200, response.json
    times = [upload["at"] for upload in fake.uploads]
    assert len(times) == 3 and fake.upload_count() == 1
    assert times[1] - times[0] >= 1.0  # Retry-After: 1 was honoured
    assert any("HTTP 429" in w for w in response.json["warnings"])


def test_wait_seconds_above_the_maximum_waits_the_maximum_and_says_so(make_app, job_settings, fake, audio_host):
    fake.ready_after_polls = 10_000
    client = make_app(job_settings.replace(max_wait_seconds=0.5, default_wait_seconds=0.2)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    started = time.monotonic()
    response = post(client, {"audio_url": url, "name": "x", "wait_seconds": 280})
    assert time.monotonic() - started < 3
    assert response.status_code == 202
    assert "it waits at most 0.5 s" in " ".join(response.json["warnings"])


def test_empty_optional_fields_mean_not_given(make_app, job_settings, audio_host):
    client = make_app(job_settings).test_client()
    body = {
        "audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"),
        "name": "x",
        "dry_run": True,
        "user_id": "",
        "content_type": " ",
        "callback_url": "",
        "if_exists": "",
        "wait_seconds": "",
        "metadata": None,
    }
    response = post(client, body)
    assert response.status_code == 200, response.json
    assert response.json["user_id"] is None and response.json["warnings"] == []


def test_checks_that_need_no_download_fail_before_a_job_exists(make_app, job_settings):
    app = make_app(job_settings)
    response = post(app.test_client(), {"audio_url": "http://169.254.169.254/x", "name": "x"})
    assert response.json["error_code"] == "url_not_allowed" and response.json["job_id"] is None
    bad_callback = {"audio_url": "https://example.com/a.wav", "name": "x", "callback_url": "http://127.0.0.1/hook"}
    response = post(app.test_client(), bad_callback)
    assert response.json["error_code"] == "url_not_allowed"
    assert response.json["error_message"].startswith("callback_url:")
    with app.extensions["relay.runtime"].engine.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM jobs")) == 0


def test_an_unknown_job_is_404(make_app, job_settings):
    client = make_app(job_settings).test_client()
    for job_id in ("0" * 32, "not-a-job"):
        response = client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS)
        assert (response.status_code, response.json["error_code"]) == (404, "job_not_found")


# --- idempotency ----------------------------------------------------------------------------


def test_twenty_concurrent_identical_requests_make_one_job_and_one_upload(make_app, job_settings, fake, audio_host):
    fake.upload_delay = 0.3
    app = make_app(job_settings)
    url = serve_file(audio_host, "mp3_vbr_id3v2.mp3")
    results: list = []

    def send():
        response = post(app.test_client(), {"audio_url": url, "name": "Once"}, {"Idempotency-Key": "order-42"})
        results.append((response.status_code, response.json))

    in_threads(send, 20)
    assert len(results) == 20
    assert {body["job_id"] for _, body in results} != {None}
    assert len({body["job_id"] for _, body in results}) == 1
    wait_until(lambda: app.extensions["relay.runtime"].store.get(results[0][1]["job_id"]).terminal)
    assert fake.upload_count() == 1
    assert len(audio_host.log) == 1


def test_the_same_key_with_another_body_is_422(make_app, job_settings, audio_host):
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "A", "dry_run": True}, {"Idempotency-Key": "k1"})
    assert first.status_code == 200
    again = post(client, {"audio_url": url, "name": "A", "dry_run": True}, {"Idempotency-Key": "k1"})
    assert again.json["job_id"] == first.json["job_id"]
    other = post(client, {"audio_url": url, "name": "B", "dry_run": True}, {"Idempotency-Key": "k1"})
    assert (other.status_code, other.json["error_code"]) == (422, "idempotency_key_reused")


def test_a_blank_idempotency_key_counts_as_none(make_app, job_settings, audio_host):
    """A no-code tool's header template sends the header even when its field is left empty."""
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "A", "dry_run": True}, {"Idempotency-Key": ""})
    other = post(client, {"audio_url": url, "name": "B", "dry_run": True}, {"Idempotency-Key": "  "})
    assert (first.status_code, other.status_code) == (200, 200), (first.json, other.json)
    assert first.json["job_id"] != other.json["job_id"]


def test_an_overlong_idempotency_key_is_400(make_app, job_settings):
    client = make_app(job_settings).test_client()
    response = post(client, {"audio_url": "https://example.com/a.wav", "name": "x"}, {"Idempotency-Key": "k" * 256})
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")


# --- callbacks ------------------------------------------------------------------------------


def test_a_callback_is_retried_until_the_receiver_is_up_and_verifies(
    make_app, job_settings, fake, audio_host, receiver
):
    seen: list[Request] = []
    answers = iter([503, 500, 200])

    def hook(request: Request) -> Response:
        seen.append(request)
        return Response("", status=next(answers, 200))

    receiver.expect_request("/hook", method="POST").respond_with_handler(hook)
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = post(client, {"audio_url": url, "name": "Hooked", "callback_url": receiver.url_for("/hook")})
    # a callback_url means "do not wait": 202, unless the job was already done when it answered
    assert response.status_code in (200, 202)
    job_id = response.json["job_id"]
    path = f"/v1/voice-clones/{job_id}"
    final = wait_until(lambda: (r := client.get(path, headers=HEADERS)).json["callback_status"] == "delivered" and r)
    assert len(seen) == 3
    assert len({r.headers["webhook-id"] for r in seen}) == 1
    verifier = Webhook(WEBHOOK_SECRET)
    for request in seen:
        payload = verifier.verify(request.get_data(), dict(request.headers))
        assert payload["job_id"] == job_id and payload["status"] == "ready"
    assert json.loads(seen[-1].get_data())["cloned_voice_item_id"] == final.json["cloned_voice_item_id"]


def test_a_callback_is_pending_while_the_job_runs(make_app, job_settings, fake, audio_host, receiver):
    receiver.expect_request("/hook", method="POST").respond_with_data("", status=200)
    fake.upload_delay = 0.5
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = post(client, {"audio_url": url, "name": "Hooked", "callback_url": receiver.url_for("/hook")})
    # answered at once, from the job as it was created: not ended, its callback still to come
    assert (response.status_code, response.json["callback_status"]) == (202, "pending")
    path = f"/v1/voice-clones/{response.json['job_id']}"
    wait_until(lambda: client.get(path, headers=HEADERS).json["callback_status"] == "delivered")


def test_the_first_callback_waits_the_first_delay_after_the_job_was_created(
    make_app, job_settings, fake, audio_host, receiver
):
    """A caller that has just got its 202 (n8n saving its waiting execution) must be ready before the callback."""
    arrived: list[float] = []

    def hook(request: Request) -> Response:
        arrived.append(time.time())
        return Response("", status=200)

    receiver.expect_request("/hook", method="POST").respond_with_handler(hook)
    client = make_app(job_settings.replace(callback_first_delay_seconds=1.0)).test_client()
    # not audio: the job fails within milliseconds, long before the first delay is over
    url = serve_file(audio_host, "drive_interstitial.html")
    before = time.time()
    response = post(client, {"audio_url": url, "name": "Quick failure", "callback_url": receiver.url_for("/hook")})
    assert response.status_code == 202
    path = f"/v1/voice-clones/{response.json['job_id']}"
    wait_until(lambda: client.get(path, headers=HEADERS).json["callback_status"] == "delivered")
    assert len(arrived) == 1 and arrived[0] - before >= 1.0


def test_a_410_stops_callback_retries(make_app, job_settings, fake, audio_host, receiver):
    receiver.expect_request("/gone").respond_with_data("", status=410)
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    job_id = post(client, {"audio_url": url, "name": "x", "callback_url": receiver.url_for("/gone")}).json["job_id"]
    wait_until(lambda: client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json["callback_status"] == "given_up")
    assert len(receiver.log) == 1


def test_callbacks_give_up_after_the_schedule(make_app, job_settings, fake, audio_host, receiver):
    receiver.expect_request("/down").respond_with_data("", status=503)
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    job_id = post(client, {"audio_url": url, "name": "x", "callback_url": receiver.url_for("/down")}).json["job_id"]
    wait_until(lambda: client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json["callback_status"] == "given_up")
    assert len(receiver.log) == 4  # the first attempt and one per scheduled retry (3 in the tests)


# --- tokens ---------------------------------------------------------------------------------


def dump_database(settings) -> bytes:
    if settings.database_url.startswith("sqlite"):
        path = settings.database_url.removeprefix("sqlite:///")
        return b"".join(Path(p).read_bytes() for p in (path, path + "-wal") if os.path.exists(p))
    engine = db.connect(db.database_url(settings.database_url, ""))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM jobs")).all() + conn.execute(text("SELECT * FROM heartbeats")).all()
    engine.dispose()
    return repr(rows).encode()


def test_a_per_request_token_is_sealed_at_rest_and_erased_at_the_end(make_app, job_settings, fake, audio_host):
    fake.ready_after_polls = 3
    app = make_app(job_settings.replace(poll_interval_seconds=0.3))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    job_id = post(client, {"audio_url": url, "name": "Sealed", "wait_seconds": 0}).json["job_id"]
    store = app.extensions["relay.runtime"].store
    running = wait_until(lambda: (job := store.get(job_id)).phase == "uploaded" and job)
    assert running.token_kind == "sealed" and running.token_sealed and TOKEN not in running.token_sealed
    assert running.token_fingerprint == "…" + TOKEN[-4:]
    assert TOKEN.encode() not in dump_database(job_settings)
    wait_until(lambda: store.get(job_id).terminal)
    assert store.get(job_id).token_sealed is None
    assert TOKEN.encode() not in dump_database(job_settings)


def test_separate_workers_without_a_secret_key_refuse_per_request_tokens(make_app, job_settings):
    client = make_app(job_settings.replace(secret_key=None), workers=0).test_client()
    response = post(client, {"audio_url": "https://example.com/a.wav", "name": "x"})
    assert (response.status_code, response.json["error_code"]) == (400, "secret_key_required")


def test_a_job_whose_memory_token_was_lost_fails_clearly(make_app, job_settings, audio_host):
    # Created by a process with an in-process pool and no secret key (token kept in memory only),
    # then finished by another process, which never had the token.
    first = make_app(job_settings.replace(secret_key=None), workers=1)
    first.extensions["relay.runtime"].pool.stop(5)
    job_id = post(
        first.test_client(), {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "x", "wait_seconds": 0}
    ).json["job_id"]
    second = make_app(job_settings.replace(secret_key=None), workers=1)
    store = second.extensions["relay.runtime"].store
    job = wait_until(lambda: (j := store.get(job_id)).terminal and j)
    assert job.answer["error_code"] == "token_unavailable"


def test_a_process_just_back_from_a_database_outage_does_not_take_live_processes_jobs(make_app, job_settings):
    """During an outage no process can heartbeat, so when the database returns every process looks
    gone to every other. A process whose own heartbeats have not run 30 s without a gap must not take
    another's jobs whose token is in that one's memory (they would all end token_unavailable)."""
    app = make_app(job_settings.replace(secret_key=None), workers=1)
    runtime = app.extensions["relay.runtime"]
    store, engine = runtime.store, runtime.engine
    other = "another-process-0001"  # alive, but its heartbeat could not be written for a minute
    with engine.begin() as conn:
        conn.execute(db.heartbeats.insert().values(worker_id=other, seen_at=db.utcnow() - timedelta(seconds=60)))
    job_id = "f" * 32
    store.create(
        job_id,
        request={"audio_url": "https://example.com/a.wav", "name": "Held"},
        token_kind="memory",
        token_holder=other,
        account_key="A",
    )
    runtime.pool._beat()  # a heartbeat after the outage: the first one in over 30 s
    runtime.pool._last_beat = (time.monotonic() - 45, time.time() - 45)
    runtime.pool._beat()
    runtime.notifier.work_arrived(everyone=True)
    time.sleep(1.5)
    assert store.get(job_id).phase == "received" and store.get(job_id).lease_owner is None
    # Once its own heartbeats ran 30 s without a gap, a stale heartbeat means a process gone.
    runtime.pool._healthy_since = time.monotonic() - 31
    runtime.notifier.work_arrived(everyone=True)
    job = wait_until(lambda: (j := store.get(job_id)).terminal and j)
    assert job.answer["error_code"] == "token_unavailable"


def test_a_token_lost_after_useapi_accepted_the_upload_never_says_submit_again(
    make_app, job_settings, fake, audio_host
):
    fake.ready_after_polls = 1000  # accepted (202) and still cloning: the job waits in "uploaded"
    settings = job_settings.replace(secret_key=None)
    first = make_app(settings, workers=1)
    job_id = post(
        first.test_client(),
        {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Paid", "wait_seconds": 0},
    ).json["job_id"]
    wait_until(lambda: first.extensions["relay.runtime"].store.get(job_id).phase == "uploaded")
    first.extensions["relay.runtime"].pool.stop(5)  # the process holding the token goes away
    second = make_app(settings, workers=1)
    store = second.extensions["relay.runtime"].store
    job = wait_until(lambda: (j := store.get(job_id)).terminal and j)
    voice = next(iter(fake.voices))
    assert (job.answer["error_code"], job.answer["cloned_voice_item_id"]) == ("token_unavailable", voice)
    # The voice is paid for: a scenario told to submit again would pay twice.
    assert "Submit the clone again" not in job.answer["error_message"]
    assert f"do not submit it again; check the voice with GET /v1/voices/{voice}" in job.answer["error_message"]
    assert fake.upload_count() == 1


class ReleaseFailsOnce(JobStore):
    """The real store, except that the next release of a job fails as a locked database does."""

    failures = 1

    def release(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return super().release(*args, **kwargs)


def crash_once(app, job_id: str, settings, crashes_before: int = 0):
    """Claim ``job_id`` and run its step as the pool does, its write failing once; the job after."""
    from relay import events
    from relay.worker import CloneWorker

    runtime = app.extensions["relay.runtime"]
    store = ReleaseFailsOnce(runtime.store.engine)
    for _ in range(crashes_before):
        events.record(store.engine, job_id, "crashed")
    with store.engine.begin() as conn:  # many ordinary claims (polls, callback tries) before this one
        conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(attempts=40, next_run_at=db.utcnow()))
    worker = CloneWorker(store, settings, runtime.vault, runtime.notifier, "w-1")
    job = store.claim("w-1", 30)
    assert job is not None and job.id == job_id
    with pytest.raises(sqlalchemy.exc.OperationalError):
        worker.process(job)
    worker.crashed(job)  # what the pool does after a step raised
    return store.get(job_id)


def test_one_crash_after_many_claims_is_retried_and_never_undoes_a_finished_job(
    make_app, job_settings, fake, audio_host, receiver
):
    receiver.expect_request("/hook", method="POST").respond_with_response(Response("nope", status=500))
    app = make_app(job_settings, workers=1)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    body = {"audio_url": url, "name": "Good", "wait_seconds": 0, "callback_url": receiver.url_for("/hook")}
    job_id = post(client, body).json["job_id"]
    store = app.extensions["relay.runtime"].store
    wait_until(lambda: store.get(job_id).phase == "ready" and store.get(job_id).callback_attempts >= 1)
    app.extensions["relay.runtime"].pool.stop(5)
    # The callback step crashes once (its write fails): the job stays ready, its callback is tried again.
    job = crash_once(app, job_id, job_settings)
    assert (job.phase, job.answer["ok"], job.callback_status) == ("ready", True, "pending")
    assert job.lease_owner is None and job.callback_next_at is not None
    # Crashing for the last allowed time, it gives the callback up and still keeps its outcome.
    job = crash_once(app, job_id, job_settings, crashes_before=job_settings.max_attempts * 3 - 2)
    assert (job.phase, job.answer["ok"], job.callback_status) == ("ready", True, "given_up")
    assert "kept crashing" in job.callback_last_error


def test_a_job_whose_voice_exists_that_keeps_crashing_ends_saying_not_to_submit_again(
    make_app, job_settings, fake, audio_host
):
    fake.ready_after_polls = 1000
    app = make_app(job_settings, workers=1)
    client = app.test_client()
    job_id = post(
        client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Paid", "wait_seconds": 0}
    ).json["job_id"]
    store = app.extensions["relay.runtime"].store
    wait_until(lambda: store.get(job_id).phase == "uploaded")
    app.extensions["relay.runtime"].pool.stop(5)
    # 40 claims and one crash: retried (before, 15 claims were enough to end it at its first crash).
    job = crash_once(app, job_id, job_settings)
    assert job.phase == "uploaded" and job.lease_owner is None
    job = crash_once(app, job_id, job_settings, crashes_before=job_settings.max_attempts * 3 - 2)
    voice = next(iter(fake.voices))
    assert (job.phase, job.answer["error_code"], job.answer["cloned_voice_item_id"]) == (
        "failed",
        "internal_error",
        voice,
    )
    assert "do not submit it again" in job.answer["error_message"] and "Retry later" not in job.answer["error_message"]
    assert fake.upload_count() == 1


# --- leases and crashes ---------------------------------------------------------------------


def test_a_job_whose_worker_vanished_is_picked_up_when_the_lease_expires(make_app, job_settings, fake, audio_host):
    app = make_app(job_settings.replace(lease_seconds=1), workers=0)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    job_id = post(client, {"audio_url": url, "name": "Orphan", "wait_seconds": 0}).json["job_id"]
    store = app.extensions["relay.runtime"].store
    ghost = store.claim("ghost-worker", lease_seconds=1)  # a worker that claims, then dies silently
    assert ghost is not None and ghost.id == job_id
    status = client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json["status"]
    assert status == "running"
    started = time.monotonic()
    rescuer = make_app(job_settings.replace(lease_seconds=1), workers=1)
    job = wait_until(lambda: (j := rescuer.extensions["relay.runtime"].store.get(job_id)).terminal and j)
    assert job.phase == "ready" and time.monotonic() - started >= 0.5
    assert fake.upload_count() == 1


def test_two_claims_never_get_the_same_job(job_settings, fake):
    store = store_for(job_settings)
    db.migrate(store.engine)
    for n in range(30):
        add_job(store, f"{n:032x}")
    claimed: list[str] = []
    lock = threading.Lock()

    def grab(owner: str):
        while (job := store.claim(owner, 30)) is not None:
            with lock:
                claimed.append(job.id)

    in_threads(grab, 6, args=lambda n: (f"w{n}",))
    store.engine.dispose()
    assert sorted(claimed) == [f"{n:032x}" for n in range(30)]


def test_a_read_says_whether_a_claim_would_find_work(job_settings):
    store = store_for(job_settings)
    db.migrate(store.engine)
    try:
        for n in range(2):
            add_job(store, f"{n:032x}")
        assert store.claim("w1", 30, 10) is not None and store.due(10)
        assert store.claim("w2", 30, 10) is not None and not store.due(10)
        assert store.claim("w3", 30, 10) is None
        # One account at its limit: its next job is not work another worker could take now.
        for n in range(2, 4):
            add_job(store, f"{n:032x}", account_key="a")
        assert store.due(1)
        only = store.claim("w4", 30, account_limit=1)
        assert only.account_key == "a" and not store.due(1) and store.claim("w5", 30, account_limit=1) is None
    finally:
        store.engine.dispose()


def test_the_end_of_a_step_is_told_once_committed(job_settings):
    store = store_for(job_settings)
    db.migrate(store.engine)
    seen: list[tuple[str, str]] = []
    # What a waiting request does when told: read the job (another connection) — it is already there.
    store.on_change = lambda job_id: seen.append((job_id, store.get(job_id).phase))
    try:
        add_job(store, "c" * 32)
        job = store.claim("w1", 30)
        store.update(job.id, "w1", phase="uploading", upload_attempts=1)  # holds on: nothing told
        assert seen == []
        store.record_upload(job.id, 1, phase="ready", next_run_at=None)
        assert seen == [("c" * 32, "ready")]
    finally:
        store.announcer.close()
        store.engine.dispose()


class CountingStore(JobStore):
    """The real store, counting claims (each is a write transaction) and looks for due work (reads)."""

    claims = 0
    looks = 0

    def claim(self, *args, **kwargs):
        self.claims += 1
        return super().claim(*args, **kwargs)

    def due(self, *args, **kwargs):
        self.looks += 1
        return super().due(*args, **kwargs)


class TwoSteps:
    """A step that leaves its job due again at once (as a clone leaves a callback to deliver)."""

    def __init__(self, store: JobStore, worker_id: str, done: list[str]):
        self.store, self.worker_id, self.done = store, worker_id, done

    def process(self, job) -> None:
        self.done.append(job.phase)
        if job.phase == "received":
            self.store.release(job.id, self.worker_id, phase="downloaded", next_run_at=db.utcnow())
        else:
            self.store.release(job.id, self.worker_id, phase="ready", next_run_at=None)

    def crashed(self, job) -> None:  # pragma: no cover - the steps above do not crash
        raise AssertionError("crashed")


@contextlib.contextmanager
def two_step_pool(settings, kind: type[JobStore], start: bool = True, workers: int = 1):
    """Worker threads running :class:`TwoSteps` on a real store: ``(store, notifier, done, pool)``."""
    from relay.runner import Pool

    store = store_for(settings, kind)
    db.migrate(store.engine)
    done: list[str] = []
    notifier = Notifier()
    pool = Pool(store, settings, notifier, workers, lambda worker_id: TwoSteps(store, worker_id, done))
    try:
        yield store, notifier, done, pool.start() if start else pool
    finally:
        pool.stop(5)
        store.announcer.close()
        store.engine.dispose()


def test_a_long_hourly_clean_up_does_not_stop_the_heartbeats(job_settings, monkeypatch):
    """The purge may take minutes on a large table: meanwhile the heartbeats go on, or after 30 s
    other processes would take this live one for gone and end its memory-token jobs."""
    from relay import runner
    from relay.runner import Pool

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.2, raising=False)
    store = store_for(job_settings)
    db.migrate(store.engine)
    cleaning, release = threading.Event(), threading.Event()

    def hourly():
        cleaning.set()
        release.wait(20)

    pool = Pool(store, job_settings, Notifier(), 1, lambda worker_id: TwoSteps(store, worker_id, []), hourly=hourly)
    pool.start()
    try:
        assert cleaning.wait(10)
        before = store.last_heartbeat()
        wait_until(lambda: store.last_heartbeat() > before, timeout=5)  # it beats while the clean-up runs
        assert not release.is_set()
    finally:
        release.set()
        pool.stop(5)
        store.announcer.close()
        store.engine.dispose()


def test_a_worker_claims_again_at_once_only_when_something_is_due(job_settings):
    # An idle poll far longer than the test: whatever happens soon happens because it was due.
    with two_step_pool(job_settings.replace(idle_poll_seconds=30), CountingStore) as (store, notifier, done, _):
        # Its first look, at start, found nothing and ended (counted as it begins: a look still running
        # could take the job added next, and the two steps would then be counted as one).
        wait_until(lambda: store.claims == 1 and len(notifier._idle) == 1)
        store.claims = 0
        add_job(store, "a" * 32)
        notifier.work_arrived()
        # Its second step was due the moment the first ended: taken at once, not at the next poll.
        wait_until(lambda: done == ["received", "downloaded"], timeout=5)
        wait_until(lambda: store.get("a" * 32).phase == "ready", timeout=5)
        time.sleep(0.3)
        # Two claims that found work; after the last step nothing was due, so no third (empty) one.
        assert store.claims == 2
        # Work that arrives while the worker is busy or about to wait is not missed either.
        add_job(store, "b" * 32)
        notifier.work_arrived()
        wait_until(lambda: store.get("b" * 32).phase == "ready", timeout=5)


def test_an_idle_pool_polls_once_per_poll_however_many_workers_wait(job_settings):
    settings = job_settings.replace(idle_poll_seconds=0.05)
    with two_step_pool(settings, CountingStore, workers=8) as (store, notifier, done, _):
        wait_until(lambda: len(notifier._idle) == 8)
        looks, claims = store.looks, store.claims
        time.sleep(0.5)  # ten polls: one read each for the pool (each worker polling: eighty)
        assert 1 <= store.looks - looks <= 15 and store.claims == claims
        # A retry that comes due with nobody to announce it is still found by the poll.
        add_job(store, "6" * 32)
        with store.engine.begin() as conn:
            conn.execute(db.jobs.update().values(next_run_at=db.utcnow() + timedelta(seconds=0.3)))
        wait_until(lambda: store.get("6" * 32).phase == "ready", timeout=5)
        assert done == ["received", "downloaded"]


def test_an_idle_worker_polls_with_a_read_and_claims_only_what_came_due(job_settings):
    settings = job_settings.replace(idle_poll_seconds=0.05)
    with two_step_pool(settings, CountingStore, start=False) as (store, _, done, pool):
        # A retry due in a moment, with nobody to wake the worker when it comes due: the poll finds it.
        add_job(store, "7" * 32)
        with store.engine.begin() as conn:
            due = db.utcnow() + timedelta(seconds=1.0)
            conn.execute(db.jobs.update().values(next_run_at=due))
        pool.start()
        wait_until(lambda: store.claims == 1, interval=0.01)  # its first look, at start: nothing due
        time.sleep(0.5)  # ten idle polls meanwhile: each a read, none a claim (a write)
        assert store.claims == 1 and done == []
        wait_until(lambda: store.get("7" * 32).phase == "ready", timeout=5)
        assert done == ["received", "downloaded"]


class BlindStore(JobStore):
    """The real store, except that it cannot tell whether work is due (its read fails)."""

    def due(self, *args, **kwargs):
        raise RuntimeError("the read failed")


def test_a_failed_look_for_more_work_never_strands_the_claimed_job(job_settings):
    with two_step_pool(job_settings.replace(idle_poll_seconds=0.2), BlindStore, start=False) as (store, _, done, pool):
        add_job(store, "d" * 32)
        pool.start()
        # Both steps run (the second found by the idle poll), the lease never left dangling.
        wait_until(lambda: store.get("d" * 32).phase == "ready", timeout=10)
        assert done == ["received", "downloaded"] and store.get("d" * 32).lease_owner is None


# --- a claim made by the insert ---------------------------------------------------------------------


def test_an_insert_claims_the_queues_next_job_for_an_idle_worker(job_settings):
    store = store_for(job_settings)
    db.migrate(store.engine)
    sqlite = store.engine.dialect.name == "sqlite"
    try:
        claim = Claim("w1", 30, account_limit=1)
        job, created = store.create("a" * 32, claim=claim, **BARE, account_key="acct")
        assert created
        if not sqlite:  # PostgreSQL's insert is one statement of its own: the worker claims as before
            assert claim.job is None and job.lease_owner is None
            return
        # The new job comes back leased to the idle worker, answered "running", counted once.
        assert claim.job is not None and claim.job.id == job.id and job.lease_owner == "w1"
        assert job.attempts == 1 and job.queue_position is None
        assert answers.for_job(job, db.utcnow())["status"] == "running"
        assert store.get(job.id).lease_owner == "w1"
        # The account is at its limit (1 in flight): the next insert claims nothing for it...
        second = Claim("w2", 30, account_limit=1)
        job2, _ = store.create("b" * 32, claim=second, **BARE, account_key="acct")
        assert second.job is None and job2.lease_owner is None and job2.queue_position == 1
        # ...but another account's job does not wait, and the queue's order holds: an older job
        # of a free account is claimed before the new one.
        store.release(job.id, "w1", phase="ready", next_run_at=None)
        third = Claim("w3", 30, account_limit=1)
        job3, _ = store.create("c" * 32, claim=third, **BARE, account_key="acct")
        assert third.job is not None and third.job.id == "b" * 32 and job3.lease_owner is None
        assert store.claim("w4", 30, account_limit=1) is None  # "acct" is at its limit again
    finally:
        store.engine.dispose()


class FailingClaimStore(JobStore):
    """The real store, except that its claims fail."""

    def _lease_next(self, conn, claim):
        conn.execute(text("SELECT 1"))  # something done in the transaction, then undone
        raise RuntimeError("the claim failed")


def test_a_claim_that_fails_at_insert_leaves_the_new_job_queued(job_settings):
    store = store_for(job_settings, FailingClaimStore)
    db.migrate(store.engine)
    try:
        claim = Claim("w1", 30)
        job, created = store.create("9" * 32, claim=claim, **BARE, account_key="acct")
        assert created and claim.job is None and job.lease_owner is None
        assert store.get(job.id).phase == "received"  # written all the same: a worker claims it as usual
        add_job(store, "8" * 32)  # and the next insert is not troubled by it
    finally:
        store.engine.dispose()


def test_a_worker_handed_its_job_by_the_insert_makes_no_claim(job_settings):
    with two_step_pool(job_settings.replace(idle_poll_seconds=30), CountingStore) as (store, notifier, done, pool):
        wait_until(lambda: store.claims == 1 and notifier._idle)  # its first look found nothing: idle
        if store.engine.dialect.name != "sqlite":  # PostgreSQL's insert claims nothing: nobody is held back
            assert pool.reserve() is None
            return
        with pool.reserved() as claim:
            assert claim is not None and pool.reserve() is None  # the only idle worker is taken
            add_job(store, "e" * 32, claim=claim)
        wait_until(lambda: store.get("e" * 32).phase == "ready", timeout=5)
        # The first step came with the insert; the second was claimed.
        assert done == ["received", "downloaded"] and store.claims == 2
        # Handed nothing (the account was at its limit, say), it waits on without a claim...
        wait_until(lambda: notifier._idle)
        spot, _ = pool.reserve()
        spot.hand(None)
        wait_until(lambda: notifier._idle)
        time.sleep(0.2)
        assert store.claims == 2
        # ...and is woken like any idle worker when a job waits for one (as relay/api.py does).
        add_job(store, "f" * 32)
        notifier.work_arrived()
        wait_until(lambda: store.get("f" * 32).phase == "ready", timeout=5)


def test_a_reserved_worker_waits_for_what_it_is_handed_even_past_its_wait():
    notifier = Notifier()
    spot = Spot("w1")
    woke: list[bool] = []

    def wait(timeout: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: woke.append(notifier.wait_for_work(timeout, spot)))
        thread.start()
        wait_until(lambda: notifier._idle, interval=0.01)
        return thread

    thread = wait(1.0)
    assert notifier.reserve() is spot and notifier.reserve() is None
    time.sleep(1.5)  # its wait has run out meanwhile: it waits for the hand-off, not for more work
    assert thread.is_alive()
    handed = object()
    spot.hand(handed)
    thread.join(5)
    assert woke == [True] and spot.job is handed
    # Handed nothing, it is back in line for the rest of its wait...
    thread = wait(10)
    notifier.reserve().hand(None)
    wait_until(lambda: notifier._idle, interval=0.01)
    assert thread.is_alive() and woke == [True]
    notifier.work_arrived()  # ...and woken by new work, it leaves the line
    thread.join(5)
    assert woke == [True, True] and not notifier._idle and spot.job is None
    # Work that arrived while it was reserved wakes it when it is handed nothing.
    thread = wait(10)
    reserved = notifier.reserve()
    notifier.work_arrived()  # nobody else in line to wake
    reserved.hand(None)
    thread.join(5)
    assert woke == [True, True, True] and not notifier._idle
    # Not reserved nor woken, a worker's wait ends at its timeout.
    assert not notifier.wait_for_work(0.05, spot) and not notifier._idle


class WorkerProcess:
    """`relay worker` in its own process, so a test can kill -9 it mid-step."""

    def __init__(self, settings, tmp_path, name: str, **extra_env: str):
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "USEAPI_BASE_URL": settings.useapi_base_url,
            "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
            "RELAY_SECRET_KEY": SECRET_KEY,
            "RELAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "RELAY_LEASE_SECONDS": "1.5",
            "RELAY_RECONCILE_GRACE_SECONDS": "0.5",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_IDLE_POLL_SECONDS": "0.1",
            "RELAY_RETRY_BASE_SECONDS": "0.1",
            "RELAY_UPLOAD_TIMEOUT": "10",
            "RELAY_CALLBACK_SCHEDULE": "0.2,0.4,0.8",
            "RELAY_WORKER_CONCURRENCY": "2",
            **extra_env,
        }
        self.log = open(tmp_path / f"{name}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "worker"], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> int:
        try:
            return processes.stop(self.process)  # SIGTERM; SIGKILL only if it hangs (then not 0)
        finally:
            self.log.close()


@pytest.mark.parametrize("phase", ["download", "upload", "polling", "callback"])
def test_kill_9_in_each_phase_still_ends_with_one_upload(
    make_app, job_settings, fake, audio_host, receiver, tmp_path, phase
):
    hooks: list[Request] = []
    slow_hook = {"first": True}

    def hook(request: Request) -> Response:
        hooks.append(request)
        if slow_hook.pop("first", False) and phase == "callback":
            time.sleep(3)  # the worker is killed while it waits for this answer
        return Response("", status=200)

    receiver.expect_request("/hook").respond_with_handler(hook)
    if phase == "upload":
        fake.upload_delay = 3
    if phase == "polling":
        fake.ready_after_polls = 10_000
    app = make_app(job_settings, workers=0)
    client = app.test_client()
    with servers.RawServer(servers.pauses(audio_bytes("wav_pcm16_mono.wav"), 1000, 4)) as dripping:
        url = dripping.url("/voice.wav") if phase == "download" else serve_file(audio_host, "wav_pcm16_mono.wav")
        job_id = post(client, {"audio_url": url, "name": "Survivor", "callback_url": receiver.url_for("/hook")}).json[
            "job_id"
        ]
        store = app.extensions["relay.runtime"].store
        first = WorkerProcess(job_settings, tmp_path, "first")
        try:
            if phase == "download":
                wait_until(lambda: dripping.connections >= 1)
            elif phase == "upload":
                wait_until(lambda: fake.upload_count() >= 1)
            elif phase == "polling":
                wait_until(lambda: store.get(job_id).phase == "uploaded" and store.get(job_id).attempts >= 3)
            else:
                wait_until(lambda: len(hooks) >= 1)
            time.sleep(0.3)
        finally:
            first.kill()
        if phase == "polling":
            with fake.lock:
                for voice in fake.voices.values():
                    voice["polls_left"] = 1
        second = WorkerProcess(job_settings, tmp_path, "second")
        try:
            job = wait_until(lambda: (j := store.get(job_id)).terminal and j.callback_status == "delivered" and j, 30)
        finally:
            assert second.stop() == 0  # SIGTERM: a clean stop
    assert job.phase == "ready", job.answer
    assert fake.upload_count() == 1
    assert hooks and len({h.headers["webhook-id"] for h in hooks}) == 1
    if phase == "download":
        assert dripping.connections == 2


def test_kill_9_during_an_early_upload_leaves_it_incomplete_and_ends_with_one_upload(
    make_app, job_settings, fake, tmp_path
):
    app = make_app(job_settings, workers=0)
    store = app.extensions["relay.runtime"].store
    # enough of a WAV for an early upload to start (more than 64 KiB), then a pause
    with servers.RawServer(servers.pauses(audio_bytes("wav_pcm24_stereo.wav"), 80_000, 2)) as dripping:
        body = {"audio_url": dripping.url("/voice.wav"), "name": "Streamed", "wait_seconds": 0}
        job_id = post(app.test_client(), body).json["job_id"]
        first = WorkerProcess(job_settings, tmp_path, "first", RELAY_STREAM_MIN_BYTES="10000")
        try:
            # "uploading" is committed just before the early upload's first byte
            wait_until(lambda: store.get(job_id).phase == "uploading")
            time.sleep(0.3)
        finally:
            first.kill()
        wait_until(lambda: fake.incomplete, timeout=10)  # the killed upload never completed
        second = WorkerProcess(job_settings, tmp_path, "second", RELAY_STREAM_MIN_BYTES="10000")
        try:
            job = wait_until(lambda: (j := store.get(job_id)).terminal and j, 30)
        finally:
            assert second.stop() == 0
    assert job.phase == "ready", job.answer
    assert fake.upload_count() == 1 and fake.uploads[0]["bytes"] == len(audio_bytes("wav_pcm24_stereo.wav"))
    assert dripping.connections == 2


# --- wake-ups ---------------------------------------------------------------------------------


def test_a_waiting_request_wakes_for_its_own_job_and_not_for_others():
    notifier = Notifier()
    since = notifier.generation
    woke = threading.Event()

    def waiter():
        if notifier.wait_for_change(10, since, job_id="mine"):
            woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    for n in range(50):
        notifier.job_changed(f"other-{n}")
    assert not woke.wait(0.2)  # 50 changes of other jobs: still waiting
    notifier.job_changed("mine")
    assert woke.wait(5)
    thread.join(5)
    # A change before the wait began is not missed; one that concerns every job wakes everyone.
    assert notifier.wait_for_change(10, since, job_id="mine")
    since = notifier.generation
    assert not notifier.wait_for_change(0.05, since, job_id="anyone")
    notifier.job_changed()
    assert notifier.wait_for_change(10, since, job_id="anyone")


def test_a_job_forgotten_by_a_busy_notifier_counts_as_changed():
    notifier = Notifier()
    since = notifier.generation
    notifier.job_changed("old")
    for n in range(Notifier.REMEMBERED + 1):
        notifier.job_changed(f"job-{n}")
    assert notifier.wait_for_change(10, since, job_id="old")  # "old" may have changed: look
    assert not notifier.wait_for_change(0.05, notifier.generation, job_id="old")


def test_other_processes_wake_at_once_for_new_jobs_and_changes(make_app, job_settings, fake, audio_host):
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("notifications between processes are PostgreSQL's LISTEN/NOTIFY")
    web = make_app(job_settings, workers=0)  # a web process: no workers of its own
    # A worker process that would poll for work only every 60 s: a new job must wake it.
    worker = make_app(job_settings.replace(idle_poll_seconds=60), workers=1)
    waiter = web.extensions["relay.runtime"]
    for app in (web, worker):
        wait_until(app.extensions["relay.runtime"].listener.listening.is_set)
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    answer = post(web.test_client(), {"audio_url": url, "name": "Across", "wait_seconds": 20}).json
    assert answer["status"] == "ready" and fake.upload_count() == 1  # taken at once, not after 60 s
    # The web process, which works no job itself, learnt of the job's end from the notification.
    assert waiter.notifier.generation > 0


@pytest.mark.parametrize(
    "secret",
    [
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",  # Heroku's generator: hex
        "Zx3_k9Lq-2VbNw8tYp4RmA7sDcFhJuEo",  # Render's generateValue: a random string
        "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdHM=",
    ],
)
def test_the_readmes_receiver_recipe_verifies_every_kind_of_secret(secret):
    from relay import callbacks

    body = b'{"ok":true}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": callbacks.sign(secret, "msg_1", timestamp, body),
    }
    key = secret if secret.startswith("whsec_") else "whsec_" + base64.b64encode(secret.encode()).decode()
    assert Webhook(key).verify(body, headers) == {"ok": True}


def test_a_worker_without_the_relays_token_ends_its_jobs_clearly_and_uploads_nothing(
    make_app, job_settings, fake, audio_host
):
    """Render keeps each service's variables apart: a web service with USEAPI_TOKEN accepts a clone
    with the relay's token, and a worker service without it picks the job up. Before, the worker sent
    "Authorization: Bearer None" to useapi and blamed the token."""
    web = make_app(job_settings.replace(useapi_token=TOKEN), workers=0)
    response = web.test_client().post(
        "/v1/voice-clones",
        json={"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "x", "wait_seconds": 0},
        headers={"Authorization": f"Bearer {RELAY_KEY}"},  # no X-Useapi-Token: the relay's own
    )
    assert response.status_code == 202, response.json
    worker = make_app(job_settings.replace(useapi_token=None), workers=1)
    store = worker.extensions["relay.runtime"].store
    job = wait_until(lambda: (j := store.get(response.json["job_id"])).terminal and j)
    assert job.answer["error_code"] == "token_unavailable"
    assert "has no USEAPI_TOKEN" in job.answer["error_message"]
    assert "Submit the clone again" in job.answer["error_message"]  # nothing was sent
    assert fake.upload_count() == 0


def test_a_key_whose_job_failed_before_any_upload_runs_again_when_repeated(make_app, job_settings, fake, audio_host):
    """A Make blueprint keys each Drive file: after a failure that reached useapi with nothing (the
    host was down, the file not shared yet), running the scenario again must try again, not get the
    stored failure back for as long as the job is kept."""
    client = make_app(job_settings).test_client()
    url = audio_host.url_for("/later.wav")  # not served yet: the host answers 404
    body = {"audio_url": url, "name": "Later", "wait_seconds": 20}
    first = post(client, body, {"Idempotency-Key": "drive-file-1"})
    assert first.json["error_code"] == "download_failed", first.json
    serve_file(audio_host, "wav_pcm16_mono.wav", path="/later.wav")
    second = post(client, body, {"Idempotency-Key": "drive-file-1"})
    assert second.json["status"] == "ready" and second.json["job_id"] != first.json["job_id"], second.json
    assert any(f"earlier job {first.json['job_id']} failed (download_failed)" in w for w in second.json["warnings"])
    assert "Idempotent-Replayed" not in second.headers
    # A repeat now gets the new job's answer, marked as a replay: the voice is made once.
    third = post(client, body, {"Idempotency-Key": "drive-file-1"})
    assert third.json["job_id"] == second.json["job_id"] and third.headers["Idempotent-Replayed"] == "true"
    assert any("nothing was done again" in w for w in third.json["warnings"])
    assert fake.upload_count() == 1


def test_a_retried_key_that_meets_a_running_clone_of_its_name_waits_for_it(make_app, job_settings, fake, audio_host):
    client = make_app(job_settings).test_client()
    body = {"audio_url": audio_host.url_for("/gone.wav"), "name": "Same", "if_exists": "reuse", "wait_seconds": 20}
    failed = post(client, body, {"Idempotency-Key": "row-7"})
    assert failed.json["error_code"] == "download_failed", failed.json
    fake.upload_delay = 2.0
    url = serve_file(audio_host, "wav_pcm16_mono.wav", path="/gone.wav")
    running = post(client, {**body, "wait_seconds": 0}).json  # another clone of the name, under way
    retried = post(client, {**body, "wait_seconds": 0}, {"Idempotency-Key": "row-7"})
    assert retried.status_code == 202 and retried.json["job_id"] not in (failed.json["job_id"], running["job_id"])
    assert any("waits for it" in w for w in retried.json["warnings"]), retried.json
    assert url and fake.upload_count() <= 1


def test_a_follower_that_failed_before_its_own_upload_is_retried_too(make_app, job_settings, fake, audio_host):
    """Two Drive files of one name, the folder not shared yet: the second waits for the first, then
    makes the voice itself and fails as the first did. Both run again once the folder is shared."""
    client = make_app(job_settings).test_client()
    audio_host.expect_request("/late.wav").respond_with_handler(  # not shared yet: Drive's refusal, slowly
        lambda _request: time.sleep(1) or Response("not shared", status=404)
    )
    body = {"audio_url": audio_host.url_for("/late.wav"), "name": "Twin", "if_exists": "reuse", "wait_seconds": 0}
    first = post(client, body, {"Idempotency-Key": "file-1"}).json
    second = post(client, body, {"Idempotency-Key": "file-2"}).json
    assert any("waits for it" in w for w in second["warnings"]), second  # it follows the first
    store = client.application.extensions["relay.runtime"].store
    wait_until(lambda: store.get(first["job_id"]).terminal and store.get(second["job_id"]).terminal)
    first, second = (store.get(answer["job_id"]) for answer in (first, second))
    assert (first.answer["error_code"], second.answer["error_code"]) == ("download_failed", "download_failed")
    assert second.follows == first.id  # it waited for the first, then made the voice itself and failed so
    audio_host.clear()
    serve_file(audio_host, "wav_pcm16_mono.wav", path="/late.wav")
    body["wait_seconds"] = 20
    first, second = first.answer, second.answer
    again = [post(client, body, {"Idempotency-Key": key}).json for key in ("file-1", "file-2")]
    assert [answer["status"] for answer in again] == ["ready", "ready"], again
    assert {answer["job_id"] for answer in again}.isdisjoint({first["job_id"], second["job_id"]})
    assert fake.upload_count() == 1  # the second reused the voice the first made


def test_concurrent_repeats_of_a_retried_key_all_get_the_one_new_job(make_app, job_settings, fake, audio_host):
    client_app = make_app(job_settings)
    body = {"audio_url": audio_host.url_for("/soon.wav"), "name": "Crowd", "wait_seconds": 0}
    failed = post(client_app.test_client(), {**body, "wait_seconds": 20}, {"Idempotency-Key": "row-1"}).json
    assert failed["error_code"] == "download_failed", failed
    serve_file(audio_host, "wav_pcm16_mono.wav", path="/soon.wav")
    start, answers_seen = threading.Barrier(6), []

    def repeat():
        start.wait(10)
        answers_seen.append(post(client_app.test_client(), body, {"Idempotency-Key": "row-1"}).json)

    in_threads(repeat, 6)
    assert len(answers_seen) == 6
    assert len({answer["job_id"] for answer in answers_seen}) == 1, answers_seen  # one new job for all
    assert answers_seen[0]["job_id"] != failed["job_id"] and not any(a["error_code"] for a in answers_seen)
    store = client_app.extensions["relay.runtime"].store
    wait_until(lambda: store.get(answers_seen[0]["job_id"]).terminal)
    assert fake.upload_count() == 1


def test_a_key_whose_upload_went_out_keeps_its_answer(make_app, job_settings, fake, audio_host):
    """useapi refused the whole upload: repeating the same request with the same key gets the same
    refusal back (and pays for nothing more); only a failure before the upload is tried again."""
    fake.refusals = [(400, {})] * 2  # useapi's own refusal, after the whole body
    fake.refusal_body = {"error": "Voice sample rejected", "code": 400}
    client = make_app(job_settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Refused", "wait_seconds": 20}
    first = post(client, body, {"Idempotency-Key": "refused-1"})
    assert first.json["error_code"] == "upstream_rejected", first.json
    again = post(client, body, {"Idempotency-Key": "refused-1"})
    assert again.json["job_id"] == first.json["job_id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(fake.uploads) == 1  # sent once, refused once
