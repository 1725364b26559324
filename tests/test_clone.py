"""POST /v1/voice-clones end to end: a real audio host, a real useapi stand-in, every outcome."""

from __future__ import annotations

import json
import re
import time

import pytest
from werkzeug import Response

from relay.schemas import ANSWER_FIELDS

from . import servers
from .conftest import RELAY_KEY, TOKEN, audio_bytes, clone, serve_file, wait_until
from .test_audio import ACCEPTED

VOICE_ID = "user:12345-tempolor:67890-voice:abc123"
UPLOAD = "/v1/tempolor/music/cloned-voices/"


def expect_upload(useapi, name: str, content_type: str, *, query=None, token=TOKEN):
    return useapi.expect_request(
        UPLOAD,
        method="POST",
        query_string=query or {"name": "My voice"},
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        data=audio_bytes(name),
    )


@pytest.mark.parametrize(("name", "fmt", "content_type"), [row[:3] for row in ACCEPTED])
def test_every_accepted_variant_arrives_upstream_byte_identical(client, audio_host, useapi, name, fmt, content_type):
    url = serve_file(audio_host, name)
    expect_upload(useapi, name, content_type, query={"name": "My voice", "user_id": "67890"}).respond_with_json(
        {"result": True, "itemId": "abc123", "clonedVoiceItemId": VOICE_ID}
    )
    response = clone(client, {"audio_url": url, "name": "  My voice ", "user_id": 67890})
    useapi.check_assertions()
    assert response.status_code == 200, response.json
    body = response.json
    assert set(body) == set(ANSWER_FIELDS)
    assert body["ok"] is True and body["status"] == "ready" and body["error_code"] is None
    assert body["cloned_voice_item_id"] == VOICE_ID and body["item_id"] == "abc123"
    assert (body["audio_format"], body["audio_content_type"]) == (fmt, content_type)
    assert body["audio_bytes"] == len(audio_bytes(name))
    assert body["name"] == "My voice" and body["user_id"] == "67890"
    assert body["upstream_status"] == 200
    assert len(useapi.log) == 1


def test_still_processing_upstream_is_polled_until_ready(client, audio_host, useapi):
    url = serve_file(audio_host, "mp3_cbr_bare.mp3")
    expect_upload(useapi, "mp3_cbr_bare.mp3", "audio/mpeg").respond_with_json(
        {"itemId": "abc123", "clonedVoiceItemId": VOICE_ID, "message": "still processing after 120 seconds"},
        status=202,
    )
    one_voice = f"{UPLOAD}{VOICE_ID}"
    useapi.expect_oneshot_request(one_voice).respond_with_json({"status": 0, "clonedVoiceItemId": VOICE_ID})
    useapi.expect_oneshot_request(one_voice).respond_with_json({"status": 0, "clonedVoiceItemId": VOICE_ID})
    useapi.expect_oneshot_request(one_voice).respond_with_json({"status": 30, "clonedVoiceItemId": VOICE_ID})
    response = clone(client, {"audio_url": url, "name": "My voice"})
    assert response.status_code == 200, response.json
    assert (response.json["ok"], response.json["status"]) == (True, "ready")
    assert response.json["cloned_voice_item_id"] == VOICE_ID
    assert response.json["upstream_status"] == 202
    useapi.check_assertions()


UPSTREAM_FAILURES = [
    # useapi status, useapi body, relay status, error_code, text in error_message, uploads made
    (400, {"error": "Empty file received", "code": 400}, 422, "upstream_rejected", "Empty file received", 1),
    (401, {"error": "Unauthorized", "code": 401}, 401, "upstream_unauthorized", "token", 1),
    (402, {"error": "Subscription required", "code": 402}, 402, "upstream_payment_required", "Subscription", 1),
    (404, {"error": "Account not found", "code": 404}, 422, "upstream_rejected", "Account not found", 1),
    # useapi answered, so it did not take the voice: retried up to RELAY_MAX_ATTEMPTS (3 here)
    (429, {"error": "Too many requests", "code": 429}, 429, "upstream_rate_limited", "Wait", 3),
]
# (Any other 5xx after the whole body went through, useapi's own included, and an error page that is
# not useapi's own answer, are reconciled, never resent — see tests/test_faults.py. A 503 with
# Retry-After is useapi saying it took nothing: retried, see tests/test_jobs.py.)


@pytest.mark.parametrize(("status", "payload", "relay_status", "code", "says", "uploads"), UPSTREAM_FAILURES)
def test_upstream_errors_map_to_the_documented_answer(
    client, audio_host, useapi, status, payload, relay_status, code, says, uploads
):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    handler = expect_upload(useapi, "wav_pcm16_mono.wav", "audio/wav")
    if isinstance(payload, dict):
        handler.respond_with_json(payload, status=status)
    else:
        handler.respond_with_data(payload, status=status, content_type="text/html")
    response = clone(client, {"audio_url": url, "name": "My voice"})
    assert response.status_code == relay_status
    body = response.json
    assert (body["ok"], body["status"], body["error_code"], body["upstream_status"]) == (False, "failed", code, status)
    assert says in body["error_message"]
    assert body["audio_format"] == "wav"  # what was learned before the failure is kept
    assert len(useapi.log) == uploads


def test_a_useapi_base_url_that_is_a_web_site_fails_at_once_naming_the_setting(client, audio_host, useapi):
    """USEAPI_BASE_URL without ``api.``: every path is a web site's 404 page. Nothing exists at that
    address, so nothing was made: the clone ends at once naming the setting (it used to look for
    a voice for 30 minutes, then say one "may have been charged")."""
    useapi.expect_request(re.compile(".*")).respond_with_data("<html>Not Found</html>", 404, content_type="text/html")
    response = clone(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "My voice"})
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer"), response.json
    assert "HTTP 404" in response.json["error_message"] and "USEAPI_BASE_URL" in response.json["error_message"]
    assert [entry[0].method for entry in useapi.log] == ["POST"]  # sent once, never looked for, never again


def test_upstream_silence_is_reconciled_never_resent_then_upload_unconfirmed(make_app, settings, audio_host, useapi):
    client = make_app(settings.replace(upload_timeout=0.3, ready_timeout_seconds=1)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")

    def slow(request):
        time.sleep(0.6)
        return Response("{}", status=200)

    expect_upload(useapi, "wav_pcm16_mono.wav", "audio/wav").respond_with_handler(slow)
    useapi.expect_request(UPLOAD, method="GET").respond_with_json({"records": [], "hasNext": False, "cursor": ""})
    response = clone(client, {"audio_url": url, "name": "My voice"})
    assert response.status_code == 502
    assert response.json["error_code"] == "upload_unconfirmed"
    methods = [entry[0].method for entry in useapi.log]
    # the body went out once; after that, only looks at the account's voices until the window closed
    assert methods[0] == "POST" and set(methods[1:]) == {"GET"} and len(methods) > 2


def test_upstream_down_is_retried_then_upstream_unavailable(make_app, settings, audio_host):
    with servers.RawServer(lambda conn, stop: None, host="127.0.0.1") as gone:
        base = gone.url("/v1")
    client = make_app(settings.replace(useapi_base_url=base)).test_client()
    response = clone(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "My voice"})
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_unavailable")
    # Why, naming the host and the cause, and where an operator looks (not just "try again later").
    said = "useapi.net could not be reached for the upload: 127.0.0.1 refused the connection"
    assert f"{said}; retrying." in response.json["warnings"]
    assert said in response.json["error_message"] and "USEAPI_BASE_URL" in response.json["error_message"]
    assert len(audio_host.log) == 3  # downloaded again for each of the 3 attempts


def test_a_job_put_back_to_try_again_says_so_not_that_it_waits_for_a_worker(make_app, job_settings, audio_host):
    with servers.RawServer(lambda conn, stop: None, host="127.0.0.1") as gone:
        base = gone.url("/v1")
    # A long retry delay: the job sits queued between its first and second attempts.
    app = make_app(job_settings.replace(useapi_base_url=base, retry_base_seconds=60), workers=1)
    client = app.test_client()
    first = client.post(
        "/v1/voice-clones",
        json={"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "Later", "wait_seconds": 0},
        headers={"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN},
    )
    job_id = first.json["job_id"]
    store = app.extensions["relay.runtime"].store
    wait_until(lambda: store.get(job_id).upload_attempts == 1 and store.get(job_id).lease_owner is None)
    answer = client.get(f"/v1/voice-clones/{job_id}", headers={"Authorization": f"Bearer {RELAY_KEY}"}).json
    assert (answer["status"], answer["message"]) == (
        "queued",
        "The clone waits to be tried again; warnings say what happened.",
    )
    assert any("refused the connection; retrying." in warning for warning in answer["warnings"])


def test_dry_run_validates_everything_and_uploads_nothing(client, audio_host, useapi):
    url = serve_file(audio_host, "m4a_aac.m4a")
    response = clone(client, {"audio_url": url, "name": "Test", "dry_run": True}, token=None)
    assert response.status_code == 200
    body = response.json
    assert (body["ok"], body["status"], body["dry_run"]) == (True, "validated", True)
    assert body["audio_content_type"] == "audio/mp4"
    assert "Nothing was uploaded" in body["message"]
    assert useapi.log == []


def test_a_disagreeing_content_type_hint_only_warns(client, audio_host, useapi):
    url = serve_file(audio_host, "flac_mono.flac", content_type="audio/mpeg")
    expect_upload(useapi, "flac_mono.flac", "audio/flac").respond_with_json(
        {"result": True, "itemId": "abc123", "clonedVoiceItemId": VOICE_ID}
    )
    response = clone(client, {"audio_url": url, "name": "My voice", "content_type": "audio/mpeg"})
    assert response.status_code == 200
    assert any("does not match" in w for w in response.json["warnings"])


def test_unknown_fields_are_ignored_and_named(client, audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "x", "dry_run": True, "voice_style": "warm", "lang": "en"})
    assert response.status_code == 200
    assert response.json["warnings"] == [
        "Unknown field 'lang' was ignored.",
        "Unknown field 'voice_style' was ignored.",
    ]


def test_metadata_is_echoed_untouched(client, audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    metadata = {"row": 7, "nested": {"list": [1, "two", None]}, "unicode": "héllo"}
    response = clone(client, {"audio_url": url, "name": "x", "dry_run": True, "metadata": metadata})
    assert response.json["metadata"] == metadata
    # An object typed into a no-code tool's free-form field arrives as JSON text: the same object.
    response = clone(client, {"audio_url": url, "name": "x", "dry_run": True, "metadata": json.dumps(metadata)})
    assert response.json["metadata"] == metadata
    for text, says in (('"just text"', "Not a valid mapping"), ("{not json", "JSON object"), ("[1]", "mapping")):
        refused = clone(client, {"audio_url": url, "name": "x", "dry_run": True, "metadata": text})
        assert refused.json["error_code"] == "invalid_request" and says in refused.json["error_message"], text


@pytest.mark.parametrize(
    ("fixture", "code", "status"),
    [
        ("drive_interstitial.html", "not_audio", 422),
        ("random.bin", "not_audio", 422),
        ("wav_short.wav", "audio_too_short", 422),
        ("m4a_truncated.m4a", "audio_corrupt", 422),
        ("empty.bin", "not_audio", 422),
    ],
)
def test_bad_audio_is_refused_without_an_upload(client, audio_host, useapi, fixture, code, status):
    url = serve_file(audio_host, fixture, content_type="audio/wav")
    response = clone(client, {"audio_url": url, "name": "My voice"})
    assert (response.status_code, response.json["error_code"]) == (status, code)
    assert response.json["ok"] is False and response.json["error_message"]
    assert useapi.log == []


def test_the_per_request_token_wins_over_the_server_token(make_app, settings, audio_host, useapi):
    client = make_app(settings.replace(useapi_token="server-token-000000000000")).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    expect_upload(useapi, "wav_pcm16_mono.wav", "audio/wav", token=TOKEN).respond_with_json(
        {"result": True, "itemId": "abc123", "clonedVoiceItemId": VOICE_ID}
    )
    assert clone(client, {"audio_url": url, "name": "My voice"}).status_code == 200


def test_the_server_token_is_used_when_none_is_sent(make_app, settings, audio_host, useapi):
    client = make_app(settings.replace(useapi_token="server-token-000000000000")).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    expect_upload(useapi, "wav_pcm16_mono.wav", "audio/wav", token="server-token-000000000000").respond_with_json(
        {"result": True, "itemId": "abc123", "clonedVoiceItemId": VOICE_ID}
    )
    assert clone(client, {"audio_url": url, "name": "My voice"}, token=None).status_code == 200


def test_no_token_anywhere_fails_before_downloading(client, audio_host, useapi):
    response = clone(client, {"audio_url": audio_host.url_for("/never.wav"), "name": "x"}, token=None)
    assert (response.status_code, response.json["error_code"]) == (400, "missing_upstream_token")
    assert audio_host.log == [] and useapi.log == []


def test_a_google_drive_link_is_rewritten_and_noted(client):
    # Drive's host resolves to a public address the test network cannot reach; a dry run on the
    # rewritten URL is refused for the missing token only after the literal URL is accepted.
    response = clone(client, {"audio_url": "https://drive.google.com/file/d/ID/view", "name": "x"}, token=None)
    assert response.json["error_code"] == "missing_upstream_token"


def test_the_request_id_is_echoed(client, audio_host):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "x", "dry_run": True}, headers={"X-Request-Id": "req-42"})
    assert response.json["request_id"] == "req-42" == response.headers["X-Request-Id"]


def test_key_checked_before_anything_else(client, audio_host):
    response = clone(client, {"audio_url": audio_host.url_for("/a.wav"), "name": "x"}, key="wrong")
    assert response.status_code == 401
    assert audio_host.log == []
    assert RELAY_KEY not in response.get_data(as_text=True)


def test_an_upstream_message_echoing_the_server_token_is_scrubbed(make_app, settings, audio_host, useapi):
    server_token = "server-token-000000000000"
    client = make_app(settings.replace(useapi_token=server_token)).test_client()
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    useapi.expect_request(UPLOAD).respond_with_json({"error": f"Bad token {server_token}", "code": 401}, status=401)
    response = clone(client, {"audio_url": url, "name": "My voice"}, token=None)
    assert response.json["error_code"] == "upstream_unauthorized"
    assert server_token not in response.get_data(as_text=True)
