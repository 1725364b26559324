"""Many accounts, one relay: per-account limits, fair turns, per-account back-off (both databases)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from relay.db import utcnow

from . import servers
from .conftest import AUDIO_HOST, HEADERS, JOBS_SECRET_KEY, PG_URL, post, serve_file, wait_until
from .processes import stop


def wait_for_all(store, job_ids, timeout: float) -> None:
    wait_until(lambda: all(store.get(job_id).terminal for job_id in job_ids), timeout=timeout)


def submit(client, url: str, account: str, name: str) -> str:
    response = post(client, {"audio_url": url, "name": name, "user_id": account, "wait_seconds": 0})
    assert response.status_code == 202, response.json
    return response.json["job_id"]


def test_an_account_never_has_more_uploads_in_flight_than_its_limit(make_app, job_settings, fake, audio_host):
    fake.upload_delay = 0.3
    app = make_app(job_settings.replace(account_concurrency=3, inprocess_workers=6))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    ids = [submit(client, url, "A", f"voice {n}") for n in range(15)]
    store = app.extensions["relay.runtime"].store
    wait_for_all(store, ids, timeout=40)
    assert fake.max_in_flight["A"] == 3
    assert fake.upload_count() == 15


def test_clones_useapi_is_still_making_count_against_the_accounts_limit(make_app, job_settings, fake, audio_host):
    # useapi's maxJobs counts a clone it accepted (202) and is still making: with a limit of 1, the
    # second upload waits until the first voice is ready (it went out at once, and useapi said 429).
    fake.ready_after_polls = 3
    app = make_app(job_settings.replace(account_concurrency=1, inprocess_workers=3, poll_interval_seconds=0.2))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    ids = [submit(client, url, "A", f"voice {n}") for n in range(2)]
    store = app.extensions["relay.runtime"].store
    wait_for_all(store, ids, timeout=30)
    first, second = sorted((store.get(job_id) for job_id in ids), key=lambda job: job.upload_started_at)
    assert (first.phase, second.phase) == ("ready", "ready") and fake.upload_count() == 2
    assert first.completed_at <= second.upload_started_at  # not while useapi was still making the first


def test_a_clone_whose_answer_was_lost_counts_against_the_limit_while_useapi_makes_it(
    make_app, job_settings, fake, audio_host
):
    # The first upload's answer is lost (a proxy's 502 after the whole body): its voice is being made
    # at useapi all the same, so with a limit of 1 the second upload waits until it is found.
    fake.upload_plans = [{"answer": (502, "<html>bad gateway</html>", "text/html")}]
    fake.ready_after_seconds = 1.5
    settings = job_settings.replace(
        account_concurrency=1, inprocess_workers=3, reconcile_grace_seconds=0.05, poll_interval_seconds=0.2
    )
    app = make_app(settings)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = submit(client, url, "A", "lost")
    wait_until(lambda: len(fake.uploads) == 1)
    second = submit(client, url, "A", "next")
    store = app.extensions["relay.runtime"].store
    wait_for_all(store, [first, second], timeout=30)
    assert store.get(first).phase == "ready" and store.get(second).phase == "ready"
    (made,) = [voice for voice in fake.voices.values() if voice["name"] == "lost"]
    assert fake.uploads[1]["started"] >= made["ready_at"] - 0.05  # not while useapi was still making it


def test_a_poll_claimed_after_its_window_looks_once_more_before_failing(make_app, job_settings, fake, audio_host):
    # A backlog can hold a poll past its window: the voice may be ready by then, so look before failing.
    fake.ready_after_polls = 1
    app = make_app(job_settings.replace(ready_timeout_seconds=1.0, poll_interval_seconds=2.0))
    client = app.test_client()
    [job_id] = [submit(client, serve_file(audio_host, "wav_pcm16_mono.wav"), "A", "Late look")]
    store = app.extensions["relay.runtime"].store
    wait_for_all(store, [job_id], timeout=20)
    job = store.get(job_id)
    assert (job.phase, job.answer["error_code"]) == ("ready", None), job.answer


def test_a_job_is_read_only_by_its_own_account_when_the_request_names_one(make_app, job_settings, fake, audio_host):
    client = make_app(job_settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Mine", "metadata": {"row": "private"}}
    job = post(client, body).json  # made with TOKEN's account
    path = f"/v1/voice-clones/{job['job_id']}"
    other = {**HEADERS, "X-Useapi-Token": "another-accounts-token-0000"}
    refused = client.get(path, headers=other)
    assert (refused.status_code, refused.json["error_code"]) == (404, "job_not_found")
    assert "private" not in refused.get_data(as_text=True)
    assert client.get(path, headers=HEADERS).json["metadata"] == {"row": "private"}  # its own account
    key_only = {"Authorization": HEADERS["Authorization"]}  # the relay key alone: the operator sees any job
    assert client.get(path, headers=key_only).status_code == 200


def test_queued_jobs_show_their_place_in_line(make_app, job_settings, fake, audio_host):
    fake.upload_delay = 0.5
    app = make_app(job_settings.replace(account_concurrency=1, inprocess_workers=3))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    ids = [submit(client, url, "A", f"voice {n}") for n in range(4)]
    wait_until(lambda: fake.upload_count() >= 1)
    last = client.get(f"/v1/voice-clones/{ids[-1]}", headers=HEADERS).json
    assert last["status"] == "queued"
    assert last["queue_position"] in (2, 3)
    store = app.extensions["relay.runtime"].store
    wait_for_all(store, ids, timeout=30)
    assert fake.max_in_flight["A"] == 1


def test_one_accounts_backlog_does_not_starve_another(make_app, job_settings, fake, audio_host):
    fake.upload_delay = 0.3
    # Three threads, all busy with A: without turns, B would wait behind A's whole backlog (~3 s).
    app = make_app(job_settings.replace(account_concurrency=10, inprocess_workers=3))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    a_ids = [submit(client, url, "A", f"a{n}") for n in range(30)]
    wait_until(lambda: fake.upload_count() >= 3)
    submitted = utcnow()
    b_id = submit(client, url, "B", "b")
    store = app.extensions["relay.runtime"].store
    b_job = wait_until(lambda: (job := store.get(b_id)).terminal and job, timeout=30)
    waited = (b_job.completed_at - submitted).total_seconds()
    assert waited < 1.2, f"B waited {waited:.2f} s behind A's backlog"
    a_left = sum(1 for job_id in a_ids if not store.get(job_id).terminal)
    assert a_left > 10  # B really went before most of A's backlog
    wait_for_all(store, a_ids, timeout=40)


def test_one_accounts_hanging_webhook_does_not_hold_up_another_accounts_clones(
    make_app, job_settings, fake, audio_host
):
    """Callback deliveries take turns with other accounts' work: before, claiming one never moved
    its account back in line, so B's clone waited until all of A's retries against a hanging
    receiver were given up."""
    settings = job_settings.replace(
        inprocess_workers=2, callback_timeout=1.0, callback_schedule=(0.2,) * 6, callback_first_delay_seconds=0
    )
    app = make_app(settings)
    client = app.test_client()
    store = app.extensions["relay.runtime"].store
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    with servers.RawServer(lambda conn, stop: stop.wait(30)) as receiver:  # takes the request, never answers
        body = {"audio_url": url, "user_id": "A", "wait_seconds": 0, "callback_url": receiver.url("/hook")}
        a_ids = [post(client, {**body, "name": f"a{n}"}).json["job_id"] for n in range(8)]
        wait_for_all(store, a_ids, timeout=20)
        wait_until(lambda: receiver.connections >= 4)  # A's deliveries are under way
        first = submit(client, url, "B", "b1")
        wait_until(lambda: store.get(first).terminal, timeout=20)
        started = utcnow()
        second = submit(client, url, "B", "b2")
        job = wait_until(lambda: (j := store.get(second)).terminal and j, timeout=40)
        waited = (job.completed_at - started).total_seconds()
        assert waited < 5, f"B's second clone waited {waited:.1f} s behind A's webhook retries"
        assert any(store.get(a).callback_status == "pending" for a in a_ids)  # A's retries still go on


def test_a_429_backs_off_that_account_only(make_app, job_settings, fake, audio_host):
    fake.refusals_for["A"] = [(429, {"Retry-After": "2"})]
    app = make_app(job_settings.replace(inprocess_workers=2))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first_a = submit(client, url, "A", "a1")
    wait_until(lambda: len(fake.uploads) >= 1)
    second_a = submit(client, url, "A", "a2")
    b = submit(client, url, "B", "b")
    store = app.extensions["relay.runtime"].store
    wait_until(lambda: store.get(b).terminal, timeout=10)
    refused_at = fake.uploads[0]["at"]
    b_upload = next(u for u in fake.uploads if u["user_id"] == "B")
    assert b_upload["at"] - refused_at < 1.5  # B was not held
    assert not store.get(second_a).terminal  # A is still backing off
    wait_until(lambda: store.get(first_a).terminal and store.get(second_a).terminal, timeout=15)
    later_a = [u["at"] for u in fake.uploads if u["user_id"] == "A"][1:]
    assert min(later_a) - refused_at >= 1.9  # Retry-After: 2 held all of A


@pytest.mark.skipif(not PG_URL, reason="RELAY_TEST_DATABASE_URL is not set (.ci/run starts PostgreSQL)")
def test_two_worker_processes_on_postgresql_share_the_limit(make_app, job_settings, fake, audio_host, tmp_path):
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("the cross-process limit is a PostgreSQL case")
    fake.upload_delay = 0.4
    app = make_app(job_settings, workers=0)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    env = {
        **os.environ,
        "DATABASE_URL": PG_URL,
        "USEAPI_BASE_URL": fake.base_url,
        "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
        "RELAY_SECRET_KEY": JOBS_SECRET_KEY,
        "RELAY_ACCOUNT_CONCURRENCY": "3",
        # Two threads each under a limit of 3: three uploads at once can only be both processes
        # working together, and never a fourth is the limit holding across them.
        "RELAY_WORKER_CONCURRENCY": "2",
        "RELAY_IDLE_POLL_SECONDS": "0.05",
    }
    paths = [tmp_path / f"worker{n}.log" for n in range(2)]
    logs = [path.open("wb") for path in paths]
    workers = [
        subprocess.Popen([sys.executable, "-m", "relay.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        for log in logs
    ]
    try:
        # Both pools polling before any job exists (a busy machine may start one much later than the
        # other): the one that starts first cannot have done all the work alone.
        wait_until(lambda: all("threads" in path.read_text() for path in paths), timeout=120)
        ids = [submit(client, url, "A", f"voice {n}") for n in range(18)]
        store = app.extensions["relay.runtime"].store
        wait_for_all(store, ids, timeout=120)
    finally:
        for worker in workers:
            stop(worker)
        for log in logs:
            log.close()
    assert fake.max_in_flight["A"] == 3
    assert fake.upload_count() == 18
    for path in paths:  # both processes did part of the work
        assert '"job claimed"' in path.read_text()
