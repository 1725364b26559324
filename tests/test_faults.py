"""When the world misbehaves: lost and unreadable upstream answers, dripping peers, stalled leases,
two accounts, two processes, a full disk. Every case ends with the right error_code or the adopted
voice, and never with a second upload for one job. Job cases run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
import sqlalchemy
from sqlalchemy import func, select, text, update
from werkzeug import Response

from relay import db, events
from relay.db import utcnow

from . import servers
from .conftest import (
    AUDIO_HOST,
    HEADERS,
    RELAY_KEY,
    TOKEN,
    audio_bytes,
    in_threads,
    over_http,
    post,
    serve_file,
    wait_until,
)
from .test_console import Console

UPLOAD_HELD = 1.0  # the stand-in holds an upload this long; the relay gives up waiting sooner


def clone_and_wait(client, body: dict, timeout: float = 20.0, headers=None) -> dict:
    """POST a clone, then follow its status_url until the job ends; the final answer."""
    first = post(client, {"wait_seconds": 0, **body}, headers)
    assert first.status_code in (200, 202), first.json
    job_id = first.json["job_id"]

    def ended():
        answer = client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json
        return answer if answer["status"] in ("ready", "failed", "validated") else None

    return wait_until(ended, timeout=timeout)


@pytest.fixture
def lossy(job_settings):
    """Settings where an upload's answer is lost: the relay stops waiting before useapi answers."""
    return job_settings.replace(
        upload_timeout=UPLOAD_HELD / 3, reconcile_grace_seconds=0.05, ready_timeout_seconds=4, poll_interval_seconds=0.1
    )


# --- lost and unreadable upload answers ---------------------------------------------------------


def test_a_lost_answer_adopts_the_voice_listed_only_once_ready_without_its_name(make_app, lossy, fake, audio_host):
    fake.upload_delay = UPLOAD_HELD  # the body arrives, the answer comes after the relay gave up
    fake.unnamed = True  # the rename never ran
    fake.ready_after_seconds = 1.5  # and the list shows the voice only once it is ready
    client = make_app(lossy).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Lost"})
    assert (answer["status"], answer["error_code"]) == ("ready", None)
    assert answer["cloned_voice_item_id"] in fake.voices
    assert any("found and adopted" in w for w in answer["warnings"])
    assert fake.upload_count() == 1
    assert fake.list_calls >= 2  # looked, found nothing yet, looked again: never uploaded again


def test_a_lost_answer_with_no_voice_ever_ends_upload_unconfirmed(make_app, lossy, fake, audio_host):
    fake.upload_delay = UPLOAD_HELD
    fake.ready_after_seconds = 3600  # never listed within the window
    client = make_app(lossy.replace(ready_timeout_seconds=2)).test_client()
    started = time.monotonic()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Ghost"})
    assert (answer["status"], answer["error_code"]) == ("failed", "upload_unconfirmed")
    assert "GET /v1/voices?name=Ghost" in answer["error_message"]
    assert fake.upload_count() == 1
    assert time.monotonic() - started < 10  # the window (2 s) bounds it


def test_an_upload_reset_after_its_whole_body_is_reconciled_not_resent(make_app, job_settings, audio_host):
    with servers.RawServer(servers.takes_body_then_resets(), host="127.0.0.1") as upstream:
        settings = job_settings.replace(
            useapi_base_url=upstream.url("/v1"), ready_timeout_seconds=1.5, reconcile_grace_seconds=0.05
        )
        client = make_app(settings).test_client()
        answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Reset"})
        seen = list(upstream.requests)
    assert answer["error_code"] == "upload_unconfirmed"
    # one upload; every other request was a look at the voice list (reset too)
    assert sum(1 for entry in seen if entry.startswith(b"POST")) == 1
    assert sum(1 for entry in seen if entry.startswith(b"GET")) >= 1


@pytest.mark.parametrize(
    ("status", "text", "kind"),
    [
        (200, "<html><body>Bad gateway</body></html>", "text/html"),
        (200, "{}", "application/json"),
        (202, '{"message": "still processing"}', "application/json"),
        (502, "<html>proxy error</html>", "text/html"),
        (200, '{"itemId": true, "clonedVoiceItemId": "user:1-tempolor:2-voice:x"}', "application/json"),
        # A gateway's JSON error (no useapi code), a gateway status even in useapi's shape, a proxy's 4xx page.
        (500, '{"error": "Internal"}', "application/json"),
        (502, '{"error": "Bad gateway", "code": 502}', "application/json"),
        (408, "<html>Request Timeout</html>", "text/html"),
        (408, '{"error": "Request Timeout"}', "application/json"),  # a proxy's JSON: no useapi code
        # useapi's own 500, or 503 without Retry-After: it may have made the voice before it failed
        (500, '{"error": "Internal error", "code": 500}', "application/json"),
        (503, '{"error": "Service Unavailable", "code": 503}', "application/json"),
        # two ids that name different voices: neither is sure
        (200, '{"itemId": "zzz", "clonedVoiceItemId": "user:12345-tempolor:67890-voice:other"}', "application/json"),
        (429, "<html>rate limited</html>", "text/html"),  # not useapi's own 429: a layer in front, after the body
    ],
    ids=[
        "html-200",
        "empty-200",
        "202-without-id",
        "proxy-502",
        "id-of-the-wrong-type",
        "json-error-without-code-500",
        "gateway-502-json",
        "proxy-408-html",
        "proxy-408-json-without-code",
        "useapi-own-500",
        "useapi-own-503-without-retry-after",
        "ids-that-disagree",
        "proxy-429-html",
    ],
)
def test_an_unreadable_upload_answer_is_never_success_and_never_resent(
    make_app, lossy, fake, audio_host, status, text, kind
):
    fake.upload_answer = (status, text, kind)  # the voice was made; the answer does not say so
    client = make_app(lossy).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Odd"})
    assert fake.upload_count() == 1
    assert answer["status"] == "ready" and answer["cloned_voice_item_id"] in fake.voices  # found, adopted


def test_a_200_whose_result_is_false_is_not_ready_until_the_voice_says_so(make_app, job_settings, fake, audio_host):
    fake.unsure_200, fake.ready_after_polls = True, 2  # 200 {"result": false, ids}: still cloning
    client = make_app(job_settings).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Unsure"})
    assert answer["status"] == "ready", answer
    (voice,) = fake.voices.values()
    assert voice["polls_left"] == 0  # ready because the voice's own status said so, after two looks
    assert fake.upload_count() == 1


def test_a_lost_answer_whose_voice_failed_ends_clone_failed_at_once(make_app, lossy, fake, audio_host):
    """The one new voice of the job's name failed at useapi: that is the clone's outcome, known at
    once, not a wait of the whole window that ends saying no voice appeared."""
    fake.upload_answer = (502, "<html>bad gateway</html>", "text/html")
    fake.clones_fail, fake.list_ready_only = True, False
    client = make_app(lossy.replace(ready_timeout_seconds=30)).test_client()
    started = time.monotonic()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Broken"})
    assert answer["error_code"] == "clone_failed", answer
    assert answer["cloned_voice_item_id"] in fake.voices and time.monotonic() - started < 15
    assert fake.upload_count() == 1


def test_an_unreadable_answer_with_no_voice_is_upload_unconfirmed_not_success(make_app, lossy, fake, audio_host):
    fake.upload_answer = (200, "{}", "application/json")
    fake.ready_after_seconds = 3600
    client = make_app(lossy.replace(ready_timeout_seconds=1.5)).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Odd"})
    assert (answer["ok"], answer["error_code"], answer["cloned_voice_item_id"]) == (False, "upload_unconfirmed", None)
    assert fake.upload_count() == 1


# --- look-ups that fail now and then ---------------------------------------------------------------


def test_one_429_on_a_poll_holds_the_account_for_its_retry_after_not_a_back_off_per_poll(
    make_app, job_settings, fake, audio_host
):
    # Claims count every poll: a back-off from them made one short 429 pause the account for minutes.
    fake.ready_after_polls = 6
    client = make_app(job_settings.replace(retry_base_seconds=2.0, ready_timeout_seconds=60)).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Polled", "wait_seconds": 0}
    first = post(client, body)
    job_id = first.json["job_id"]
    wait_until(lambda: client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json["status"] == "processing")
    wait_until(lambda: sum(1 for v in fake.voices.values() if v["polls_left"] <= 3), timeout=15)
    fake.lookup_refusals = [(429, {"Retry-After": "1"})]
    answer = wait_until(lambda: _ended(client, first.json), timeout=10)  # the old back-off: 2 s × 2^polls
    assert answer["status"] == "ready" and not fake.lookup_refusals
    engine = client.application.extensions["relay.runtime"].engine
    steps = [e.detail or "" for e in events.for_job(engine, job_id) if e.kind == "lookup_failed"]
    assert steps and "upstream_rate_limited" in steps[0]


def test_if_exists_looks_again_after_a_failed_voice_listing(make_app, job_settings, fake, audio_host):
    fake.lookup_refusals = [(500, {}), (429, {"Retry-After": "1"})]
    client = make_app(job_settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Looked", "if_exists": "reuse"}
    answer = clone_and_wait(client, body)
    assert (answer["status"], answer["reused"]) == ("ready", False) and fake.upload_count() == 1
    assert fake.list_calls == 3 and not fake.lookup_refusals


def test_if_exists_ends_with_useapis_refusal_or_outage_not_a_queue_timeout(make_app, job_settings, fake, audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    client = make_app(job_settings.replace(queue_timeout_seconds=2)).test_client()
    # useapi's own 400 on the listing: looking again gets the same answer.
    fake.lookup_refusals = [(400, {})]
    refused = clone_and_wait(client, {"audio_url": url, "name": "Refused", "if_exists": "reuse"})
    assert refused["error_code"] == "upstream_rejected" and fake.list_calls == 1
    # An outage whose Retry-After outlasts the queue's bound: the error it met, never "no worker took it".
    fake.lookup_refusals = [(503, {"Retry-After": "3"})]
    down = clone_and_wait(client, {"audio_url": url, "name": "Down", "if_exists": "reuse"})
    assert down["error_code"] == "upstream_unavailable", down
    assert fake.upload_count() == 0


def test_a_clone_past_the_queue_bound_after_a_refused_upload_still_looks_again(
    make_app, job_settings, fake, audio_host
):
    # The queue's bound is for jobs no worker took: one already uploading (a 503, retried later)
    # that meets a failed listing looks again, as any if_exists look does.
    fake.refusals = [(503, {"Retry-After": "3"})]
    client = make_app(job_settings.replace(queue_timeout_seconds=2)).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Retried", "if_exists": "reuse"}
    first = post(client, {**body, "wait_seconds": 0}).json
    wait_until(lambda: len(fake.uploads) == 1)
    fake.lookup_refusals = [(500, {})]  # the look before the second upload fails once
    answer = wait_until(lambda: _ended(client, first), timeout=20)
    assert (answer["status"], len(fake.uploads)) == ("ready", 2), answer


def test_a_retry_that_downloads_another_file_says_only_what_is_true_of_it(make_app, job_settings, fake, audio_host):
    # The link serves an Opus note, then (on the retry after useapi's 503) a WAV: the answer must not
    # still say an OPUS file was converted, nor show the relay's own note of what it said.
    audio_host.expect_ordered_request("/changing").respond_with_data(audio_bytes("opus.opus"))
    audio_host.expect_ordered_request("/changing").respond_with_data(audio_bytes("wav_pcm16_mono.wav"))
    fake.refusals = [(503, {"Retry-After": "1"})]
    client = make_app(job_settings).test_client()
    answer = clone_and_wait(client, {"audio_url": audio_host.url_for("/changing"), "name": "Changing"})
    assert (answer["status"], answer["audio_format"], answer["converted"]) == ("ready", "wav", False), answer
    assert not [w for w in answer["warnings"] if "OPUS" in w], answer["warnings"]
    assert all(not key.startswith("_") for key in answer)


PROXY_502 = (502, "<html>502 Bad Gateway</html>", "text/html")


def test_a_lost_answer_never_adopts_the_voice_of_another_upload_of_its_name(make_app, job_settings, fake, audio_host):
    # A's answer is lost; B, same account and name, is answered late (useapi holds uploads up to
    # 120 s). A must not take B's voice, the newest of its name: it waits for B's answer to claim it.
    fake.upload_plans = [{"answer": PROXY_502}, {"delay": 2.5}]
    # A looks once B's voice exists and before B's answer comes; B's voice is a second newer (the
    # listing's times have whole seconds).
    settings = job_settings.replace(reconcile_grace_seconds=2.0, ready_timeout_seconds=12, poll_interval_seconds=0.1)
    client = make_app(settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Same name", "wait_seconds": 0}
    first = post(client, body).json
    wait_until(lambda: len(fake.uploads) == 1)
    time.sleep(1.1)
    second = post(client, body).json
    a, b = (wait_until(lambda job=job: _ended(client, job), timeout=20) for job in (first, second))
    assert (a["status"], b["status"]) == ("ready", "ready"), (a, b)
    assert {a["cloned_voice_item_id"], b["cloned_voice_item_id"]} == set(fake.voices)  # one each
    assert fake.upload_count() == 2


def test_two_lost_answers_of_one_name_guess_no_voice(make_app, job_settings, fake, audio_host):
    # Both answers lost: the two new voices of the name cannot be told apart. No guess (each job
    # took the other's before): both end upload_unconfirmed, saying to list the voices first.
    fake.upload_plans = [{"answer": PROXY_502}, {"answer": PROXY_502}]
    settings = job_settings.replace(reconcile_grace_seconds=0.05, ready_timeout_seconds=3, poll_interval_seconds=0.1)
    client = make_app(settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Twice", "wait_seconds": 0}
    jobs = [post(client, body).json, post(client, body).json]
    ended = [wait_until(lambda job=job: _ended(client, job), timeout=20) for job in jobs]
    assert [job["error_code"] for job in ended] == ["upload_unconfirmed"] * 2, ended
    assert fake.upload_count() == 2


def test_a_refused_token_while_looking_for_a_lost_answers_voice_says_a_voice_may_exist(
    make_app, lossy, fake, audio_host
):
    fake.upload_delay = UPLOAD_HELD  # the answer is lost; the voice is made
    fake.lookup_refusals = [(401, {})]
    client = make_app(lossy).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Kept"})
    assert answer["error_code"] == "upstream_unauthorized"
    said = answer["error_message"]
    assert "may have created a voice" in said and "GET /v1/voices?name=Kept" in said
    assert fake.upload_count() == 1


def test_a_listing_never_readable_while_reconciling_says_so(make_app, lossy, fake, audio_host):
    fake.upload_delay = UPLOAD_HELD
    fake.list_answer = (200, "<html>maintenance</html>", "text/html")
    client = make_app(lossy.replace(ready_timeout_seconds=1.5)).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Unread"})
    assert answer["error_code"] == "upload_unconfirmed"
    assert "listing could not be read" in answer["error_message"] and "appeared" not in answer["error_message"]
    assert fake.upload_count() == 1


def test_a_503_refusal_is_retried_after_its_retry_after(make_app, job_settings, fake, audio_host):
    fake.refusals = [(503, {"Retry-After": "2"})]
    client = make_app(job_settings).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Later"})
    assert answer["status"] == "ready" and len(fake.uploads) == 2
    assert fake.uploads[1]["started"] - fake.uploads[0]["at"] >= 1.9  # not the 0.05 s retry base


def test_a_clone_that_ends_rate_limited_passes_on_useapis_retry_after(make_app, job_settings, fake, audio_host):
    """Make and Zapier back off on a 429 only as long as they are told: the job's answer carries
    useapi's Retry-After, as the relay's own look-ups do."""
    fake.refusals = [(429, {"Retry-After": "1"})] * 3  # every attempt (RELAY_MAX_ATTEMPTS = 3)
    client = make_app(job_settings).test_client()
    body = {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Busy", "wait_seconds": 20}
    response = post(client, body)
    assert (response.status_code, response.json["error_code"]) == (429, "upstream_rate_limited"), response.json
    assert response.headers["Retry-After"] == "1"
    assert "_retry_after" not in response.json
    status = client.get(f"/v1/voice-clones/{response.json['job_id']}", headers=HEADERS)
    assert status.headers["Retry-After"] == "1" and status.status_code == 200


# --- strict parsing of lists and look-ups -------------------------------------------------------

GARBAGE_LISTS = [
    (200, "<html>maintenance</html>", "text/html"),
    (200, '{"records": "none"}', "application/json"),
    (200, '{"records": [{"name": "no id"}], "hasNext": false}', "application/json"),
    (200, "[]", "application/json"),
]


@pytest.mark.parametrize(("status", "text", "kind"), GARBAGE_LISTS)
def test_a_garbage_voice_list_is_an_error_never_no_voices(make_app, job_settings, fake, status, text, kind):
    fake.list_answer = (status, text, kind)
    client = make_app(job_settings).test_client()
    response = client.get("/v1/voices", headers=HEADERS)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")
    assert response.json["ok"] is False


def test_a_voice_list_far_larger_than_any_answer_is_refused_not_read_whole(make_app, job_settings, fake):
    # Valid JSON, padded past the 4 MiB cap: before, it was read whole and taken for "no voices".
    padded = '{"records": [' + " " * (5 * 1024 * 1024) + '], "hasNext": false}'
    fake.list_answer = (200, padded, "application/json")
    client = make_app(job_settings).test_client()
    response = client.get("/v1/voices", headers=HEADERS)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")
    assert "more than 4 MiB" in response.json["error_message"]


def test_useapi_answers_are_asked_for_uncompressed_and_a_compressed_one_is_read_within_the_cap(make_app, job_settings):
    # 64 MiB of JSON in ~64 KB of gzip, sent although the relay asked for answers as they are.
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb") as archive:
        archive.write(b'{"records": [')
        for _ in range(64):
            archive.write(b" " * (1024 * 1024))
        archive.write(b'], "hasNext": false}')
    body = packed.getvalue()

    def behave(conn, stop):
        conn.sendall(
            servers.headers(Content_Type="application/json", Content_Encoding="gzip", Content_Length=str(len(body)))
        )
        conn.sendall(body)

    with servers.RawServer(behave, host="127.0.0.1") as upstream:
        client = make_app(job_settings.replace(useapi_base_url=upstream.url("/v1"))).test_client()
        response = client.get("/v1/voices", headers=HEADERS)
        asked = upstream.requests[0].lower()
    assert b"accept-encoding: identity\r\n" in asked
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")


def test_a_voice_status_that_is_not_a_number_is_an_invalid_answer_not_a_failed_clone(
    make_app, job_settings, fake, audio_host
):
    fake.ready_after_polls = 1000  # still cloning
    client = make_app(job_settings.replace(ready_timeout_seconds=1.5)).test_client()
    first = post(
        client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Typed", "wait_seconds": 0}
    )
    wait_until(lambda: fake.voices)
    with fake.lock:
        for voice in fake.voices.values():
            voice["status"] = "PROCESSING"  # a word where useapi documents a number

    def ended():
        answer = client.get(f"/v1/voice-clones/{first.json['job_id']}", headers=HEADERS).json
        return answer if answer["status"] in ("ready", "failed") else None

    answer = wait_until(ended, timeout=20)
    # Not clone_failed ("try another recording"): the voice may well be cloning still. The answers
    # were retried as nonsense until the ready window ended, and the voice is named for a look.
    assert (answer["error_code"], answer["cloned_voice_item_id"]) == ("ready_timeout", next(iter(fake.voices)))
    assert fake.upload_count() == 1
    # A listed voice's status is held to the same shape.
    voice = {"clonedVoiceItemId": answer["cloned_voice_item_id"], "name": "Typed", "status": "PROCESSING"}
    fake.list_answer = (200, json.dumps({"records": [voice], "hasNext": False}), "application/json")
    assert client.get("/v1/voices", headers=HEADERS).json["error_code"] == "upstream_invalid_answer"


def test_a_voice_listing_of_many_slow_pages_ends_within_the_total_of_one_look_up(make_app, job_settings):
    pages = iter(range(1000))

    def behave(conn, stop):  # every page says there is another, after 0.3 s
        stop.wait(0.3)
        body = json.dumps({"records": [], "hasNext": True, "cursor": f"c{next(pages)}"}).encode()
        head = servers.headers(Content_Type="application/json", Content_Length=str(len(body)), Connection="close")
        conn.sendall(head + body)

    with servers.RawServer(behave, host="127.0.0.1") as upstream:
        settings = job_settings.replace(
            useapi_base_url=upstream.url("/v1"), connect_timeout=0.5, read_timeout=1.0, max_list_pages=20
        )
        client = make_app(settings).test_client()
        started = time.monotonic()
        response = client.get("/v1/voices", headers=HEADERS)
        took = time.monotonic() - started
        pages_read = len(upstream.requests)
    # 1.5 s for the whole walk, keeping what it read; before, 1.5 s per page: 20 pages took 6 s.
    assert (response.status_code, response.json["complete"]) == (200, False)
    assert "stopped before its end" in response.json["warnings"][0]
    assert took < 4 and 3 <= pages_read < 8


def test_voice_lookups_for_a_request_end_within_relay_lookup_timeout(make_app, job_settings, fake, audio_host):
    # Long timeouts, a slow useapi: a look-up still answers before Zapier's and Heroku's 30 s.
    settings = job_settings.replace(connect_timeout=5, read_timeout=30, lookup_timeout=1.0)
    client = make_app(settings).test_client()
    made = post(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Slow"}).json
    fake.lookup_delay = 4.0
    for path in ("/v1/voices", f"/v1/voices/{made['cloned_voice_item_id']}"):
        started = time.monotonic()
        response = client.get(path, headers=HEADERS)
        took = time.monotonic() - started
        assert (response.status_code, response.json["error_code"]) == (504, "upstream_timeout"), path
        assert took < 3, (path, took)


def test_a_voice_lookup_answering_with_another_voice_is_an_invalid_answer(make_app, job_settings):
    asked, other = "user:1-tempolor:2-voice:asked", "user:1-tempolor:2-voice:other"

    def behave(conn, stop):
        body = json.dumps({"clonedVoiceItemId": other, "name": "Other", "status": 30}).encode()
        conn.sendall(servers.headers(Content_Type="application/json", Content_Length=str(len(body))) + body)

    with servers.RawServer(behave, host="127.0.0.1") as upstream:
        client = make_app(job_settings.replace(useapi_base_url=upstream.url("/v1"))).test_client()
        response = client.get(f"/v1/voices/{asked}", headers=HEADERS)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")


def test_if_exists_reuse_with_a_garbage_list_fails_without_uploading(make_app, job_settings, fake, audio_host):
    fake.list_answer = GARBAGE_LISTS[0]
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    answer = clone_and_wait(client, {"audio_url": url, "name": "Maybe", "if_exists": "reuse"})
    assert answer["error_code"] == "upstream_invalid_answer"
    assert fake.upload_count() == 0


def test_a_token_echoed_in_a_long_message_never_leaks(make_app, job_settings, fake, audio_host):
    fake.refusals = [(400, {})]
    # cut at 300 characters before scrubbing, the message would end with the token's first 12
    fake.refusal_body = {"error": "x" * 280 + f" token: {TOKEN}", "code": 400}
    client = make_app(job_settings).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Echo"})
    assert answer["error_code"] == "upstream_rejected"
    assert TOKEN[:12] not in json.dumps(answer)


def test_a_huge_retry_after_is_capped(make_app, job_settings, fake, audio_host):
    fake.refusals = [(429, {"Retry-After": "999999999"})]
    app = make_app(job_settings.replace(max_retry_after_seconds=0.5))
    answer = clone_and_wait(app.test_client(), {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "R"})
    assert answer["status"] == "ready"
    engine = app.extensions["relay.runtime"].engine
    with engine.connect() as conn:
        until = conn.scalar(select(func.max(db.accounts.c.backoff_until)))
    assert until is not None and until < utcnow() + timedelta(seconds=60)


# --- leases -------------------------------------------------------------------------------------


def test_an_upload_answer_after_the_lease_was_lost_is_recorded_and_never_resent(
    make_app, job_settings, fake, audio_host
):
    fake.upload_delay = 1.5
    app = make_app(job_settings.replace(upload_timeout=10, lease_seconds=30, reconcile_grace_seconds=0.05))
    store = app.extensions["relay.runtime"].store
    client = app.test_client()
    job_id = post(
        client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Slow", "wait_seconds": 0}
    ).json["job_id"]
    wait_until(lambda: store.get(job_id).body_sent_at is not None)
    # The database stalls past the lease: another worker takes the job while the upload runs (in
    # one statement, as a claim does, so none of the app's own idle workers takes it first).
    with store.engine.begin() as conn:
        taken = conn.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id, db.jobs.c.phase == "uploading")
            .values(lease_owner="intruder", lease_expires_at=utcnow() + timedelta(seconds=30))
        ).rowcount
    assert taken == 1
    # The first worker's answer arrives late: it is recorded, and the intruder's lease is gone.
    job = wait_until(lambda: (j := store.get(job_id)).terminal and j)
    assert job.answer["status"] == "ready" and job.cloned_voice_item_id in fake.voices
    assert not store.update(job_id, "intruder", attempts=99)
    assert fake.upload_count() == 1


# --- dripping peers -----------------------------------------------------------------------------


def test_an_audio_host_dripping_its_headers_is_cut_off_at_the_download_deadline(make_app, job_settings, fake):
    with servers.RawServer(servers.drips_headers(0.2)) as host:
        client = make_app(job_settings.replace(download_timeout=1.5)).test_client()
        started = time.monotonic()
        answer = clone_and_wait(client, {"audio_url": host.url("/voice.wav"), "name": "Drip"})
    assert answer["error_code"] == "download_failed"
    assert "RELAY_DOWNLOAD_TIMEOUT" in answer["error_message"]
    assert time.monotonic() - started < 8
    assert fake.upload_count() == 0


def test_a_useapi_dripping_its_answer_is_cut_off_and_reconciled(make_app, job_settings, audio_host, fake):
    with servers.RawServer(servers.drips_headers(0.2), host="127.0.0.1") as upstream:
        settings = job_settings.replace(
            useapi_base_url=upstream.url("/v1"), upload_timeout=1, ready_timeout_seconds=1, read_timeout=1
        )
        client = make_app(settings).test_client()
        started = time.monotonic()
        answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "D"})
    assert answer["error_code"] == "upload_unconfirmed"
    assert time.monotonic() - started < 10


def test_a_dripping_callback_receiver_is_a_failed_attempt(make_app, job_settings, fake, audio_host):
    with servers.RawServer(servers.drips_headers(0.2)) as receiver:
        settings = job_settings.replace(callback_timeout=0.8, callback_schedule=(0.1,), callback_first_delay_seconds=0)
        app = make_app(settings)
        store = app.extensions["relay.runtime"].store
        url = serve_file(audio_host, "wav_pcm16_mono.wav")
        job_id = post(app.test_client(), {"audio_url": url, "name": "Cb", "callback_url": receiver.url("/hook")}).json[
            "job_id"
        ]
        job = wait_until(lambda: (j := store.get(job_id)).callback_status == "given_up" and j, timeout=20)
    assert job.callback_attempts == 2
    assert "no whole answer within 0.8 s" in job.callback_last_error
    assert job.callback_url == receiver.url("/hook")  # kept, without any query


@pytest.mark.parametrize("location", ["http://[::1/hook", "http://[127.0.0.1]/hook"])
def test_a_callback_receiver_redirecting_to_nonsense_is_a_failed_attempt(
    make_app, job_settings, fake, audio_host, location
):
    settings = job_settings.replace(callback_schedule=(0.1,), callback_first_delay_seconds=0)
    app = make_app(settings)
    store = app.extensions["relay.runtime"].store
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    with servers.RawServer(servers.redirects_to(lambda _n: location)) as receiver:
        body = {"audio_url": url, "name": "Cb", "callback_url": receiver.url("/hook")}
        job_id = post(app.test_client(), body).json["job_id"]
        job = wait_until(lambda: (j := store.get(job_id)).callback_status == "given_up" and j, timeout=20)
    assert job.callback_attempts == 2  # tried on schedule, not crashed and retried as a crash
    assert "cannot be parsed" in job.callback_last_error
    assert events.count(app.extensions["relay.runtime"].engine, job_id, "crashed") == 0


def test_a_database_that_stops_answering_is_503_database_unavailable(make_app, job_settings, audio_host, caplog):
    # PostgreSQL reached through a TCP forwarder that then drops every connection and refuses new
    # ones (a restart, a failover, a full connection slot): each request names that, with Retry-After,
    # instead of a 500 "bug in the relay"; a clone's answer says whether it may have been stored.
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("the forwarder stands between the relay and PostgreSQL")
    target = sqlalchemy.make_url(job_settings.database_url)
    cut = threading.Event()
    with servers.RawServer(servers.forwards_to((target.host, target.port or 5432), cut), host="127.0.0.1") as proxy:
        url = target.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
        app = make_app(job_settings.replace(database_url=url), workers=0)
        client = app.test_client()
        body = {"audio_url": audio_host.url_for("/a.wav"), "name": "Down", "wait_seconds": 0}
        first = post(client, body)
        assert first.status_code == 202, first.json
        with over_http(app) as base:
            console = Console(base)
            assert console.login().status_code == 200
            cut.set()
            with caplog.at_level(logging.WARNING, logger="relay"):
                status = client.get(f"/v1/voice-clones/{first.json['job_id']}", headers=HEADERS)
                again = post(client, {**body, "name": "Down again"})
                keyed = post(client, {**body, "name": "Down, keyed"}, headers={"Idempotency-Key": "k-1"})
                page = console.get("/console")
    for response in (status, again):
        assert response.status_code == 503 and response.headers["Retry-After"] == "10", response.json
        assert response.json["error_code"] == "database_unavailable" and response.json["ok"] is False
        assert "database did not answer" in response.json["error_message"]
    assert status.json["status"] is None  # a poll that could not read the job says nothing of the clone
    # The clone's insert was under way: it may have committed, so nothing is claimed about the clone.
    assert again.json["status"] is None and "console's job list" in again.json["error_message"], again.json
    assert keyed.status_code == 503 and "same Idempotency-Key" in keyed.json["error_message"], keyed.json
    # The console's page says the same, as a page.
    assert page.status_code == 503 and "text/html" in page.headers["Content-Type"]
    assert "database did not answer" in page.text and "database_unavailable" in page.text
    logged = [record for record in caplog.records if "database unavailable" in record.getMessage()]
    assert logged and not any(record.exc_info for record in logged)  # one line per request, no traceback


def test_a_connection_pooler_in_front_of_postgresql_is_served(make_app, job_settings):
    """PgBouncer (transaction mode) and Neon's pooler refuse a startup 'options' parameter: the
    relay's statement and lock bounds are set after connecting, so it works behind them."""
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("a pooler stands between the relay and PostgreSQL")
    target = sqlalchemy.make_url(job_settings.database_url)
    with servers.RawServer(servers.pooler_in_front_of((target.host, target.port or 5432)), host="127.0.0.1") as pooler:
        url = target.set(host=pooler.host, port=pooler.port).render_as_string(hide_password=False)
        app = make_app(job_settings.replace(database_url=url), workers=0)
        client = app.test_client()
        created = post(client, {"audio_url": "https://example.com/a.wav", "name": "Pooled", "wait_seconds": 0})
        assert created.status_code == 202, created.json
        with app.extensions["relay.runtime"].engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == f"{db.LOCK_TIMEOUT_MS // 1000}s"


def test_a_table_locked_for_long_is_503_database_unavailable_within_seconds(make_app, job_settings):
    """Every wait has an end: a request that waits for a lock another session holds (a long
    migration, an operator's LOCK TABLE) is answered 503 within the relay's lock bound, well inside a
    host router's 30 s, instead of hanging for as long as the lock is held."""
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's lock_timeout")
    app = make_app(job_settings, workers=0)
    client = app.test_client()
    job_id = post(client, {"audio_url": "https://example.com/a.wav", "name": "Locked", "wait_seconds": 0}).json[
        "job_id"
    ]
    holder = sqlalchemy.create_engine(db.database_url(job_settings.database_url, ""))
    locked, done = threading.Event(), threading.Event()

    def hold():  # another session holds the lock for 20 s at most
        with holder.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            locked.set()
            done.wait(20)
            conn.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        status = client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS)
        waited = time.monotonic() - started
    finally:
        done.set()
        thread.join(30)
        holder.dispose()
    assert (status.status_code, status.json["error_code"]) == (503, "database_unavailable"), status.json
    assert waited < db.LOCK_TIMEOUT_MS / 1000 + 5


def test_a_database_that_cannot_take_writes_is_unavailable_not_a_bug(tmp_path):

    # A read-only (or full) SQLite file: the database cannot be used just now; retry later, no bug.
    path = tmp_path / "ro.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    readonly = sqlalchemy.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught, readonly.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    readonly.dispose()
    assert "readonly" in str(caught.value) and db.unavailable(caught.value)


def test_a_statement_the_database_refuses_is_a_bug_with_its_traceback_not_unavailable(make_app, settings, caplog):
    # SQLite calls a missing column an OperationalError, as it calls "database is locked": only the
    # second is the database not answering; the first must stay visible (500, traceback in the log).
    app = make_app(settings, workers=0)
    client = app.test_client()
    with app.extensions["relay.runtime"].engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN audio_url_sealed"))
    with caplog.at_level(logging.ERROR, logger="relay"):
        response = client.get(f"/v1/voice-clones/{'0' * 32}", headers=HEADERS)
    assert (response.status_code, response.json["error_code"]) == (500, "internal_error")
    assert any(record.exc_info for record in caplog.records if record.getMessage() == "unexpected error")


def test_a_waiting_request_whose_job_cannot_be_read_again_answers_with_the_job(make_app, job_settings, audio_host):
    # The job is written; then the database stops answering reads of it (here its table is renamed
    # away for a moment): the caller must get its job_id and status_url, not a 500 to retry (a second clone).
    app = make_app(job_settings, workers=0)
    engine = app.extensions["relay.runtime"].engine
    answer: dict = {}

    def waiter() -> None:
        response = post(app.test_client(), {"audio_url": audio_host.url_for("/a.wav"), "name": "W", "wait_seconds": 20})
        answer.update(status=response.status_code, body=response.json)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:

        def written() -> bool:
            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1

        wait_until(written)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE jobs RENAME TO jobs_away"))
        thread.join(30)
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE jobs_away RENAME TO jobs"))
    assert answer["status"] == 202, answer
    body = answer["body"]
    assert body["ok"] is True and body["status"] == "queued" and body["job_id"]
    assert body["status_url"].endswith(body["job_id"])
    assert any("do not send it again" in warning for warning in body["warnings"])


def test_a_failing_database_write_logs_no_signed_query(make_app, job_settings, audio_host, caplog):
    app = make_app(job_settings)
    engine = app.extensions["relay.runtime"].engine
    postgres = engine.dialect.name == "postgresql"
    # The database itself refuses every new job (a trigger), as a full disk or a failover would.
    sabotage = (
        [
            "CREATE FUNCTION relay_test_refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ "
            "LANGUAGE plpgsql",
            "CREATE TRIGGER relay_test_refuse BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION relay_test_refuse()",
        ]
        if postgres
        else ["CREATE TRIGGER relay_test_refuse BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'refused'); END"]
    )
    with engine.begin() as conn:
        for statement in sabotage:
            conn.execute(text(statement))
    try:
        url = audio_host.url_for("/a.wav") + "?X-Amz-Signature=LEAKED-SIGNATURE"
        callback = audio_host.url_for("/hook") + "?signature=LEAKED-CALLBACK"
        with caplog.at_level(logging.INFO):
            response = post(app.test_client(), {"audio_url": url, "name": "Db", "callback_url": callback})
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER relay_test_refuse" + (" ON jobs" if postgres else "")))
            if postgres:
                conn.execute(text("DROP FUNCTION relay_test_refuse()"))
    assert (response.status_code, response.json["error_code"]) == (500, "internal_error")
    logged = "\n".join(record.getMessage() + "\n" + caplog.text for record in caplog.records)
    assert "refused" in logged  # the database's own reason is there
    assert "LEAKED" not in logged


def test_a_write_that_cannot_start_says_why_and_leaves_the_writer_lock_whole(tmp_path):
    # Another program holds SQLite's write lock (a backup, a sqlite3 shell on the live file) past the
    # busy timeout, shortened here to 0.1 s on every connection the engine opens.
    path = tmp_path / "relay.db"
    engine = db.connect(f"sqlite:///{path}")
    db.migrate(engine)
    sqlalchemy.event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=100"))
    engine.dispose()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The process's own writer lock was released once: writers still take turns, one at a time.
    order: list[str] = []

    def second_writer() -> None:
        with engine.begin() as conn:
            order.append("second")
            conn.execute(text("SELECT 1"))

    with engine.begin() as conn:
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.3)  # time for the second writer to get in, were the lock free
        order.append("first")
        conn.execute(text("SELECT 1"))
    thread.join(10)
    assert order == ["first", "second"]
    engine.dispose()


# --- accounts -----------------------------------------------------------------------------------


def test_the_same_idempotency_key_from_two_accounts_makes_two_jobs(make_app, job_settings, fake, audio_host):
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    key = {"Idempotency-Key": "order-42"}
    first = post(client, {"audio_url": url, "name": "Mine", "user_id": "111"}, key)
    second = post(client, {"audio_url": url, "name": "Theirs", "user_id": "222"}, key)  # another body: no 422
    assert first.status_code == second.status_code == 200, (first.json, second.json)
    assert first.json["job_id"] != second.json["job_id"]
    assert first.json["cloned_voice_item_id"] != second.json["cloned_voice_item_id"]
    again = post(client, {"audio_url": url, "name": "Mine", "user_id": "111"}, key)
    assert again.json["job_id"] == first.json["job_id"]  # within one account, the key still holds
    assert fake.upload_count() == 2


def test_concurrent_reuse_requests_for_one_name_make_one_voice(make_app, job_settings, fake, audio_host):
    fake.upload_delay = 0.5
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    answers: list[dict] = []

    def one(if_exists: str) -> None:
        answers.append(post(client, {"audio_url": url, "name": "Shared", "if_exists": if_exists}).json)

    in_threads(one, 8, args=lambda n: ("reuse" if n % 2 else "fail",))
    assert len(answers) == 8
    assert fake.upload_count() == 1
    assert len({a["job_id"] for a in answers}) == 8  # each request has a job of its own (callback, metadata)
    # One voice: made once, reused by the other "reuse" requests, named by the "fail" ones' 409.
    assert len({a["cloned_voice_item_id"] for a in answers}) == 1 and answers[0]["cloned_voice_item_id"]
    for answer in answers:
        assert answer["status"] == "ready" or answer["error_code"] == "voice_exists", answer


def test_a_request_waiting_for_a_clone_of_the_same_name_keeps_its_own_callback_and_metadata(
    make_app, job_settings, fake, audio_host, receiver
):
    # n8n and Make bulk runs send if_exists=reuse, each run with its own resume URL and row.
    seen: list = []
    receiver.expect_request(re.compile("/run/.*"), method="POST").respond_with_handler(
        lambda request: seen.append((request.path, json.loads(request.get_data()))) or Response("ok")
    )
    fake.upload_delay = 1.0
    settings = job_settings.replace(callback_first_delay_seconds=0)
    app = make_app(settings)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    started = []
    for row in (1, 2, 3):
        body = {
            "audio_url": url,
            "name": "Bulk",
            "if_exists": "reuse",
            "callback_url": receiver.url_for(f"/run/{row}"),
            "metadata": {"row": row},
        }
        started.append(post(client, body).json)
    assert [answer["metadata"] for answer in started] == [{"row": 1}, {"row": 2}, {"row": 3}]
    assert len({answer["job_id"] for answer in started}) == 3
    assert "waits for it" in " ".join(started[2]["warnings"])
    wait_until(lambda: len(seen) == 3, timeout=30)
    by_path = dict(seen)
    assert fake.upload_count() == 1
    for row in (1, 2, 3):
        final = by_path[f"/run/{row}"]
        assert final["metadata"] == {"row": row} and final["status"] == "ready"
        assert final["job_id"] == started[row - 1]["job_id"]
    assert len({by_path[f"/run/{row}"]["cloned_voice_item_id"] for row in (1, 2, 3)}) == 1
    assert [by_path[f"/run/{row}"]["reused"] for row in (1, 2, 3)] == [False, True, True]


def test_a_key_whose_job_took_another_jobs_doubtful_failure_is_never_retried(make_app, lossy, fake, audio_host):
    """B (keyed, if_exists=reuse) waits for A, which makes the same name's voice. A's answer is lost
    and the voice does not show: A ends upload_unconfirmed, and B with it. B uploaded nothing itself,
    but the voice may exist: a repeat of B's key gets B's answer, never a second upload."""
    fake.upload_answer = (502, "<html>bad gateway</html>", "text/html")  # the voice is made, the answer lost
    fake.ready_after_seconds = 3600  # … and it is never listed within the window
    client = make_app(lossy.replace(ready_timeout_seconds=2)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    body = {"audio_url": url, "name": "Shared", "if_exists": "reuse", "wait_seconds": 0}
    post(client, body)
    keyed = post(client, body, {"Idempotency-Key": "drive-file-9"}).json
    assert "waits for it" in " ".join(keyed["warnings"]), keyed
    ended = wait_until(lambda: _ended(client, keyed), timeout=30)
    assert ended["error_code"] == "upload_unconfirmed", ended
    again = post(client, body, {"Idempotency-Key": "drive-file-9"})
    assert again.json["job_id"] == keyed["job_id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(fake.uploads) == 1


def _ended(client, answer: dict):
    now = client.get(answer["status_url"], headers=HEADERS).json
    return now if now["status"] in ("ready", "failed") else None


def test_a_request_waiting_for_an_if_exists_create_clone_is_answered_when_it_ends(
    make_app, job_settings, fake, audio_host
):
    # The running clone of that name was sent with if_exists=create (the default): its end wakes the
    # waiting job at once too, not at its next look a minute later.
    fake.upload_delay = 1.0
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "Bob", "wait_seconds": 0}).json
    second = post(client, {"audio_url": url, "name": "Bob", "if_exists": "reuse", "wait_seconds": 0}).json
    assert any(first["job_id"] in warning for warning in second["warnings"])
    assert wait_until(lambda: _ended(client, first), timeout=30)["status"] == "ready"
    ended = time.monotonic()
    final = wait_until(lambda: _ended(client, second), timeout=90)
    assert time.monotonic() - ended < 10  # FOLLOW_CHECK_SECONDS is 60
    assert final["reused"] is True and final["cloned_voice_item_id"] == _ended(client, first)["cloned_voice_item_id"]
    assert fake.upload_count() == 1


def test_a_request_waiting_for_a_clone_that_timed_out_in_the_queue_is_not_cloned_later(
    make_app, job_settings, fake, audio_host
):
    # No worker for longer than RELAY_QUEUE_TIMEOUT_SECONDS: the first clone fails queue_timeout
    # ("nothing was uploaded"); the request that waited for it, just as old, must not be uploaded then.
    down = make_app(job_settings.replace(queue_timeout_seconds=1), workers=0).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(down, {"audio_url": url, "name": "Late", "if_exists": "reuse", "wait_seconds": 0}).json
    second = post(down, {"audio_url": url, "name": "Late", "if_exists": "reuse", "wait_seconds": 0}).json
    assert any(first["job_id"] in warning for warning in second["warnings"])
    time.sleep(1.5)  # both are older than the queue timeout when a worker comes
    up = make_app(job_settings.replace(queue_timeout_seconds=1)).test_client()
    assert wait_until(lambda: _ended(up, first), timeout=30)["error_code"] == "queue_timeout"
    assert wait_until(lambda: _ended(up, second), timeout=30)["error_code"] == "queue_timeout"
    assert fake.upload_count() == 0


def test_a_request_waiting_for_a_clone_whose_voice_is_in_doubt_never_uploads_another(
    make_app, job_settings, fake, audio_host
):
    # The first clone's upload was taken, then the voice was not ready in time (ready_timeout). It is
    # listed only once ready, so a second upload by the waiting request would pay for a second voice.
    fake.upload_delay = 0.5
    fake.ready_after_polls = 10_000
    client = make_app(job_settings.replace(ready_timeout_seconds=1)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "Twice", "if_exists": "reuse", "wait_seconds": 0}).json
    second = post(client, {"audio_url": url, "name": "Twice", "if_exists": "reuse", "wait_seconds": 0}).json
    waiting = wait_until(
        lambda: (a := client.get(second["status_url"], headers=HEADERS).json)["status"] == "queued" and a
    )
    assert f"waits for job {first['job_id']}" in waiting["message"]
    ended = wait_until(lambda: _ended(client, first), timeout=30)
    assert ended["error_code"] == "ready_timeout" and ended["cloned_voice_item_id"]
    final = wait_until(lambda: _ended(client, second), timeout=30)
    assert (final["error_code"], final["cloned_voice_item_id"]) == ("ready_timeout", ended["cloned_voice_item_id"])
    assert final["audio_bytes"] is None and final["source_format"] is None  # it downloaded nothing
    assert any(f"waited for job {first['job_id']}" in warning for warning in final["warnings"])
    assert fake.upload_count() == 1


def test_a_request_waiting_for_a_clone_useapi_refused_or_failed_makes_its_own_voice(
    make_app, job_settings, fake, audio_host
):
    # useapi refused the first clone's upload (400): no voice exists, so the waiting request's own
    # recording is cloned; its answer describes its own request, not the first one's audio.
    fake.lookup_delay = 0.5  # the first job's if_exists look-up takes long enough for the second to wait
    fake.refusals = [(400, {})]
    fake.refusal_body = {"error": "Audio is too short", "code": 400}
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "Ref", "if_exists": "reuse", "wait_seconds": 0}).json
    second = post(client, {"audio_url": url, "name": "Ref", "if_exists": "reuse", "wait_seconds": 0}).json
    assert any(first["job_id"] in warning for warning in second["warnings"])
    assert wait_until(lambda: _ended(client, first), timeout=30)["error_code"] == "upstream_rejected"
    final = wait_until(lambda: _ended(client, second), timeout=30)
    assert final["status"] == "ready" and final["reused"] is False and final["cloned_voice_item_id"]
    assert fake.upload_count() == 1 and len(fake.uploads) == 2


def test_a_request_that_waited_past_the_queue_timeout_for_a_clone_that_failed_sends_nothing(
    make_app, job_settings, fake, audio_host
):
    audio_host.expect_request("/slow-page.html").respond_with_handler(
        lambda _request: time.sleep(1.5) or Response(audio_bytes("drive_interstitial.html"), content_type="text/html")
    )
    client = make_app(job_settings.replace(queue_timeout_seconds=1)).test_client()
    page = {"audio_url": audio_host.url_for("/slow-page.html"), "name": "Old", "if_exists": "reuse", "wait_seconds": 0}
    first = post(client, page).json
    good = serve_file(audio_host, "wav_pcm16_mono.wav")
    second = post(client, {"audio_url": good, "name": "Old", "if_exists": "reuse", "wait_seconds": 0}).json
    assert wait_until(lambda: _ended(client, first), timeout=30)["error_code"] == "not_audio"
    final = wait_until(lambda: _ended(client, second), timeout=30)
    assert final["error_code"] == "queue_timeout" and "made none" in final["error_message"]
    assert fake.upload_count() == 0


def test_requests_waiting_in_two_processes_for_a_clone_that_failed_upload_once(
    make_app, job_settings, fake, audio_host
):
    audio_host.expect_request("/slow-page.html").respond_with_handler(
        lambda _request: time.sleep(1.0) or Response(audio_bytes("drive_interstitial.html"), content_type="text/html")
    )
    fake.upload_delay = 0.5
    apps = [make_app(job_settings).test_client(), make_app(job_settings).test_client()]  # two pools of workers
    good = serve_file(audio_host, "wav_pcm16_mono.wav")
    page = {"audio_url": audio_host.url_for("/slow-page.html"), "name": "Two", "if_exists": "reuse", "wait_seconds": 0}
    first = post(apps[0], page).json
    body = {"audio_url": good, "name": "Two", "if_exists": "reuse", "wait_seconds": 0}
    others = [post(apps[n % 2], body).json for n in range(6)]
    finals = [wait_until(lambda a=a: _ended(apps[0], a), timeout=120) for a in (first, *others)]
    assert finals[0]["error_code"] == "not_audio"
    assert fake.upload_count() == 1  # one of the six made the voice; the other five reused it
    assert len({final["cloned_voice_item_id"] for final in finals[1:]}) == 1
    assert sorted(final["reused"] for final in finals[1:]) == [False, True, True, True, True, True]


def test_a_request_that_waited_for_a_clone_that_failed_makes_the_voice_itself(make_app, job_settings, fake, audio_host):
    client = make_app(job_settings).test_client()
    audio_host.expect_request("/slow-page.html").respond_with_handler(
        lambda _request: time.sleep(1.0) or Response(audio_bytes("drive_interstitial.html"), content_type="text/html")
    )
    page = {
        "audio_url": audio_host.url_for("/slow-page.html"),
        "name": "Again",
        "if_exists": "reuse",
        "wait_seconds": 0,
    }
    first = post(client, page).json
    good = serve_file(audio_host, "wav_pcm16_mono.wav")
    second = post(client, {"audio_url": good, "name": "Again", "if_exists": "reuse", "wait_seconds": 0}).json
    assert any(f"(job {first['job_id']})" in warning for warning in second["warnings"])  # it waits for the first

    assert wait_until(lambda: _ended(client, first))["error_code"] == "not_audio"  # a web page: no voice was made
    final = wait_until(lambda: _ended(client, second))
    assert final["status"] == "ready" and final["reused"] is False and final["cloned_voice_item_id"]
    assert fake.upload_count() == 1


# --- several processes ----------------------------------------------------------------------------


def test_per_request_tokens_work_with_two_gunicorn_processes_without_a_secret_key(
    job_settings, fake, audio_host, tmp_path
):
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": job_settings.database_url,
        "RELAY_DATA_DIR": str(tmp_path),
        "RELAY_API_KEY": RELAY_KEY,
        "USEAPI_BASE_URL": fake.base_url,
        "RELAY_ALLOWED_NETWORKS": f"{AUDIO_HOST}/32",
        "RELAY_IDLE_POLL_SECONDS": "0.05",
        "WEB_CONCURRENCY": "2",
        "PORT": str(port),
        "RELAY_BIND_HOST": "127.0.0.1",
    }
    env.pop("RELAY_SECRET_KEY", None)
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:relay.gunicorn_conf", "relay:create_app()"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base + "/healthz"), timeout=60, interval=0.2)
        url = serve_file(audio_host, "wav_pcm16_mono.wav")
        headers = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}
        with requests.Session() as session:
            results = [
                session.post(
                    base + "/v1/voice-clones",
                    json={"audio_url": url, "name": f"p{n}", "wait_seconds": 15},
                    headers=headers,
                    timeout=30,
                )
                for n in range(12)
            ]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(40)
        log.close()
    codes = [(r.status_code, r.json()["error_code"]) for r in results]
    assert codes == [(200, None)] * 12, codes
    assert fake.upload_count() == 12
    pids = (tmp_path / "gunicorn.log").read_text().count("Booting worker")
    assert pids == 2


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# --- the relay's own faults -------------------------------------------------------------------------


def test_a_spool_folder_gone_bad_is_storage_full_and_logged(make_app, job_settings, fake, audio_host, tmp_path, caplog):
    spool = tmp_path / "spool"
    client = make_app(job_settings.replace(spool_dir=str(spool))).test_client()
    if spool.exists():
        spool.rmdir()
    spool.write_text("a file where the spool folder was")  # the operator's disk went wrong after the start
    with caplog.at_level(logging.ERROR, logger="relay.fetch"):
        answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Disk"})
    assert answer["error_code"] == "storage_full"
    assert "not your link" in answer["error_message"]
    assert any(getattr(r, "fields", {}).get("path") == str(spool) for r in caplog.records)
    assert fake.upload_count() == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root, as CI has): the spool fills it mid-download."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_storage_full_not_a_broken_link(make_app, job_settings, fake, audio_host, tiny_disk):
    client = make_app(job_settings.replace(spool_dir=str(tiny_disk))).test_client()
    answer = clone_and_wait(client, {"audio_url": serve_file(audio_host, "wav_pcm24_stereo.wav"), "name": "Full"})
    assert answer["error_code"] == "storage_full"
    assert not any(tiny_disk.iterdir())  # the partial spool file was removed
    assert fake.upload_count() == 0


# --- the public base of status_url ----------------------------------------------------------------


def test_x_forwarded_host_is_ignored_unless_the_operator_trusts_it(make_app, job_settings, audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    spoof = {"X-Forwarded-Host": "evil.example"}
    plain = make_app(job_settings).test_client()
    body = {"audio_url": url, "name": "Host", "dry_run": True}
    assert "evil.example" not in post(plain, body, spoof).json["status_url"]
    trusting = make_app(job_settings.replace(trust_forwarded_host=True)).test_client()
    assert post(trusting, body, spoof).json["status_url"].startswith("http://evil.example/")


def test_a_callback_url_resolving_to_a_private_address_is_refused_at_once(make_app, job_settings):
    client = make_app(job_settings).test_client()
    url = "https://example.com/a.wav"
    for callback in (
        "http://localhost:5678/webhook-waiting/1",
        "http://127.0.0.1/hook",
        "http://10.1.2.3/x",
        "http://a..b/hook",  # no resolver takes it: refused, not a crash
        "http://" + "a" * 64 + ".example/hook",
    ):
        response = post(client, {"audio_url": url, "name": "x", "callback_url": callback})
        assert (response.status_code, response.json["error_code"]) == (422, "url_not_allowed"), callback
        assert response.json["error_message"].startswith("callback_url:")


def test_signed_queries_are_not_kept_once_the_job_no_longer_needs_them(make_app, job_settings, fake, audio_host):
    audio_host.expect_request("/signed.wav").respond_with_data(audio_bytes("wav_pcm16_mono.wav"))
    app = make_app(job_settings)
    client = app.test_client()
    answer = clone_and_wait(
        client, {"audio_url": audio_host.url_for("/signed.wav") + "?X-Amz-Signature=s3cr3t", "name": "Signed"}
    )
    assert answer["status"] == "ready"
    engine = app.extensions["relay.runtime"].engine
    with engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.execute(text("SELECT * FROM jobs")) for v in row)
    assert "s3cr3t" not in stored


def test_readyz_notices_a_database_that_went_away(make_app, job_settings):
    if not job_settings.database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL server that goes away")
    admin = db.connect(db.database_url(job_settings.database_url, ""))
    name = "relay_readyz_gone"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = job_settings.database_url.rsplit("/", 1)[0] + "/" + name
    client = make_app(job_settings.replace(database_url=url)).test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "database unreachable" in response.json["problems"]


def test_one_accounts_dripping_links_do_not_hold_up_another_account(make_app, job_settings, fake, audio_host):
    # Three workers, at most two per account: account A's three dripping links can hold two workers
    # until the download deadline, never the third.
    settings = job_settings.replace(inprocess_workers=3, account_concurrency=2, download_timeout=3)
    app = make_app(settings)
    client = app.test_client()
    store = app.extensions["relay.runtime"].store
    with servers.RawServer(servers.drips_headers(0.2)) as slow:
        stuck = [
            post(client, {"audio_url": slow.url(f"/{n}.wav"), "name": f"a{n}", "user_id": "A", "wait_seconds": 0}).json[
                "job_id"
            ]
            for n in range(3)
        ]
        wait_until(lambda: slow.connections >= 2)
        other = post(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "b", "user_id": "B"})
        assert (other.status_code, other.json["status"]) == (200, "ready")
        assert not any(store.get(job_id).terminal for job_id in stuck)  # A's links are still dripping
        finished = wait_until(lambda: all((j := store.get(i)).terminal for i in stuck) and j, timeout=40)
    assert finished
    assert {store.get(i).answer["error_code"] for i in stuck} == {"download_failed"}


def test_a_callback_host_that_does_not_resolve_now_is_accepted_with_a_warning(make_app, job_settings, audio_host):
    client = make_app(job_settings).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = post(
        client, {"audio_url": url, "name": "x", "dry_run": True, "callback_url": "https://unknown.invalid/h"}
    )
    assert response.status_code in (200, 202), response.json
    assert any("could not be resolved" in w for w in response.json["warnings"])


def test_two_jobs_can_never_own_the_voice_one_upload_made(make_app, job_settings, fake, audio_host):
    # The last guard behind the reconciler's look-up: a voice made (or adopted) by one job cannot be
    # written as made by another, even by two workers adopting at the same moment.
    from sqlalchemy.exc import IntegrityError

    app = make_app(job_settings, workers=0)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    ids = [post(client, {"audio_url": url, "name": f"v{n}", "wait_seconds": 0}).json["job_id"] for n in range(2)]
    engine = app.extensions["relay.runtime"].engine
    voice = f"user:12345-tempolor:{fake.user_id}-voice:shared"
    with engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == ids[0]).values(made_voice_id=voice))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == ids[1]).values(made_voice_id=voice))
    assert app.extensions["relay.runtime"].store.voice_taken(voice, ids[1])


def test_two_lost_uploads_of_one_account_never_take_each_others_unnamed_voice(make_app, lossy, fake, audio_host):
    # Both answers are lost and both voices are listed without a name: which is whose cannot be
    # known, so neither job guesses (each would otherwise grab the newest, the other's).
    fake.upload_delay = UPLOAD_HELD
    fake.unnamed = True
    fake.ready_after_seconds = 0.2
    app = make_app(lossy.replace(ready_timeout_seconds=2.5))
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    ids = [post(client, {"audio_url": url, "name": name, "wait_seconds": 0}).json["job_id"] for name in ("Al", "Bo")]
    store = app.extensions["relay.runtime"].store
    wait_until(lambda: all(store.get(i).terminal for i in ids), timeout=20)
    ended = [store.get(i).answer for i in ids]
    assert [a["error_code"] for a in ended] == ["upload_unconfirmed", "upload_unconfirmed"]
    assert all(a["cloned_voice_item_id"] is None for a in ended)
    assert fake.upload_count() == 2


def test_a_request_attached_to_a_running_job_of_the_same_name_keeps_to_the_waiter_budget(
    make_app, job_settings, fake, audio_host
):
    fake.upload_delay = 1.0
    app = make_app(job_settings)
    client = app.test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    first = post(client, {"audio_url": url, "name": "Busy", "if_exists": "reuse", "wait_seconds": 0}).json
    waiters = app.extensions["relay.runtime"].waiters
    taken = 0
    while waiters.acquire(blocking=False):  # every waiter slot is held by other requests
        taken += 1
    try:
        started = time.monotonic()
        attached = post(client, {"audio_url": url, "name": "Busy", "if_exists": "reuse", "wait_seconds": 10})
        assert time.monotonic() - started < 5  # answered at once, not after waiting up to 10 s
    finally:
        for _ in range(taken):
            waiters.release()
    assert attached.status_code == 202 and attached.json["job_id"] != first["job_id"]
    assert any("RELAY_MAX_WAITERS" in w for w in attached.json["warnings"])
    assert any(f"(job {first['job_id']})" in w for w in attached.json["warnings"])


# --- the timeline -------------------------------------------------------------------------------


def test_a_clone_writes_its_whole_timeline_in_order_with_its_own_writes(make_app, job_settings, fake, audio_host):
    app = make_app(job_settings)
    engine = app.extensions["relay.runtime"].engine
    alone = []  # transactions that wrote events and nothing else

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def seen(conn, cursor, statement, parameters, context, executemany):
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE
            conn.info.setdefault("statements", []).append(statement.split()[0:3])

    @sqlalchemy.event.listens_for(engine, "commit")
    def committed(conn):
        done = conn.info.pop("statements", [])
        if done and all(words[:3] == ["INSERT", "INTO", "job_events"] for words in done):
            alone.append(len(done))

    answer = clone_and_wait(app.test_client(), {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "T"})
    assert answer["status"] == "ready"
    kinds = [event.kind for event in events.for_job(engine, answer["job_id"])]
    assert kinds == [
        "download_started",
        "downloaded",
        "audio_valid",
        "upload_started",
        "upload_sent",
        "upload_answered",
        "ready",
    ]
    assert alone == []  # no event is written in a transaction of its own
