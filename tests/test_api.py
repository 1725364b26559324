"""The HTTP surface: auth, request parsing, and every error in the one JSON shape."""

from __future__ import annotations

import json

import pytest

from relay import __version__
from relay.schemas import ANSWER_FIELDS

from .conftest import RELAY_KEY, TOKEN, clone


def assert_error_shape(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.json
    assert set(body) == set(ANSWER_FIELDS)
    assert (body["ok"], body["status"], body["error_code"]) == (False, "failed", code)
    assert body["error_message"] and body["request_id"]
    return body


def test_healthz_needs_no_key(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"ok": True, "version": __version__}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"Basic {RELAY_KEY}"}, 401),
        ({"Authorization": f"Bearer {RELAY_KEY}x"}, 401),
        ({"X-Relay-Key": RELAY_KEY[:-1]}, 401),
        ({"Authorization": f"Bearer {RELAY_KEY}"}, 400),
        ({"Authorization": f"bearer  {RELAY_KEY}"}, 400),
        ({"X-Relay-Key": RELAY_KEY}, 400),
    ],
)
def test_relay_key_by_bearer_or_header(client, headers, status):
    # 400 = past the key check, stopped by the empty body.
    response = client.post("/v1/voice-clones", data="", headers=headers)
    assert response.status_code == status
    assert response.json["error_code"] == ("unauthorized" if status == 401 else "invalid_request")


def test_a_blueprints_relay_key_placeholder_left_in_is_named(client):
    """Make's blueprint has the key in two modules; the second (the status re-read) is easy to miss."""
    for headers in ({"Authorization": "Bearer YOUR_RELAY_API_KEY"}, {"X-Relay-Key": "YOUR_RELAY_API_KEY"}):
        response = client.get("/v1/voice-clones/" + "0" * 32, headers=headers)
        assert (response.status_code, response.json["error_code"]) == (401, "unauthorized")
        assert "still the placeholder 'YOUR_RELAY_API_KEY'" in response.json["error_message"]
        assert "a Make blueprint has two" in response.json["error_message"]
    wrong = client.get("/v1/voice-clones/" + "0" * 32, headers={"Authorization": "Bearer nope"})
    assert "placeholder" not in wrong.json["error_message"]


def test_without_a_key_configured_the_relay_is_open(make_app, settings, audio_host):
    client = make_app(settings.replace(relay_api_key=None)).test_client()
    response = clone(client, {"audio_url": "http://127.0.0.1/x.wav", "name": "x"}, key=None)
    assert response.json["error_code"] == "url_not_allowed"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "audio_url: Missing data"),
        ({"audio_url": "https://example.com/a.wav"}, "name: Missing data"),
        ({"audio_url": "https://example.com/a.wav", "name": "   "}, "name: Length must be between 1 and 100"),
        ({"audio_url": "https://example.com/a.wav", "name": "x" * 101}, "name: Length"),
        ({"audio_url": 42, "name": "x"}, "audio_url"),
        ({"audio_url": "https://example.com/a.wav", "name": "x", "dry_run": "maybe"}, "dry_run"),
        ({"audio_url": "https://example.com/a.wav", "name": "x", "content_type": "audio/ogg"}, "content_type"),
        ({"audio_url": "https://example.com/a.wav", "name": "x", "metadata": [1, 2]}, "metadata"),
        ({"audio_url": "https://example.com/a.wav", "name": "x", "metadata": {"k": "v" * 5000}}, "4096 bytes"),
        ({"audio_url": "https://example.com/a.wav", "name": "nul\u0000inside"}, "name: Must not contain control"),
        ({"audio_url": "https://example.com/a.wav", "name": "tab\there"}, "name: Must not contain control"),
        ({"audio_url": "https://example.com/a.wav", "name": "\u200b\u200b"}, "name: Must contain visible"),
        ({"audio_url": "https://example.com/a.wav", "name": "\u3164"}, "name: Must contain visible"),
        ({"audio_url": "https://example.com/a.wav", "name": "A\ud800"}, "name: Must be valid Unicode"),
        ({"audio_url": "https://example.com/a.wav", "name": "x", "if_exists": "maybe"}, "if_exists"),
        ([1, 2, 3], "must be a JSON object"),
        ("just a string", "must be a JSON object"),
        # A misspelt field is named, with the one probably meant, when the request fails for it.
        (
            {"url": "https://example.com/a.wav", "voice_name": "v"},
            "required field; unknown fields: 'url' (did you mean 'audio_url'?), 'voice_name' (did you mean 'name'?).",
        ),
        ({"Audio_URL": "https://example.com/a.wav", "name": "v"}, "'Audio_URL' (did you mean 'audio_url'?)"),
    ],
)
def test_invalid_bodies_are_400_with_the_field_named(client, body, says):
    body = assert_error_shape(clone(client, body), 400, "invalid_request")
    assert says in body["error_message"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    ],
)
def test_unreadable_bodies_are_400(client, raw, says):
    response = client.post(
        "/v1/voice-clones",
        data=raw,
        headers={"Authorization": f"Bearer {RELAY_KEY}", "Content-Type": "application/json"},
    )
    body = assert_error_shape(response, 400, "invalid_request")
    assert says in body["error_message"]


@pytest.mark.parametrize("name", ["Zoë 👩‍🎤", 'Bob "take 2"', "日本語の声", "a\u200bb"])
def test_names_with_visible_characters_are_taken(client, name):
    body = {"audio_url": "http://127.0.0.1/x.wav", "name": name}
    # past the schema: stopped by the URL guard, with the name as given
    assert clone(client, body).json["error_code"] == "url_not_allowed"


def test_if_exists_takes_any_case(client):
    body = {"audio_url": "http://127.0.0.1/x.wav", "name": "x", "if_exists": " Reuse "}
    assert clone(client, body).json["error_code"] == "url_not_allowed"


@pytest.mark.parametrize(
    ("content_type", "data", "says"),
    [
        ("application/x-www-form-urlencoded", "audio_url=https%3A%2F%2Fexample.com%2Fa.wav&name=x", "sent as a form"),
        (  # a form is taken (the recording as a file), but this one has neither a file nor a link
            "multipart/form-data; boundary=b",
            '--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--',
            "part named 'file'",
        ),
        ("text/plain", "audio_url: https://example.com/a.wav", "Content-Type: application/json"),
    ],
)
def test_a_body_that_is_not_json_says_to_send_json(client, content_type, data, says):
    response = client.post(
        "/v1/voice-clones", data=data, headers={"Authorization": f"Bearer {RELAY_KEY}", "Content-Type": content_type}
    )
    body = assert_error_shape(response, 400, "invalid_request")
    assert says in body["error_message"]


def test_an_oversized_body_is_413(make_app, settings):
    client = make_app(settings.replace(max_json_bytes=2048)).test_client()
    payload = json.dumps({"audio_url": "https://example.com/a.wav", "name": "x", "pad": "y" * 5000})
    response = client.post("/v1/voice-clones", data=payload, headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert_error_shape(response, 413, "request_too_large")


def test_unknown_route_is_a_json_404(client):
    assert_error_shape(client.get("/v1/nothing-here"), 404, "not_found")


def test_wrong_method_is_a_json_405(client):
    response = client.get("/v1/voice-clones")
    assert_error_shape(response, 405, "method_not_allowed")
    # curl and requests turn a redirected POST into a GET (http:// sent on to https://): say so.
    assert response.headers["Allow"] == "POST" and "redirected" in response.json["error_message"]


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("POST", "/v1/voice-clones/", "Drop the trailing slash: /v1/voice-clones."),
        ("GET", "/v1/voices/", "Drop the trailing slash: /v1/voices."),
        ("POST", "/v1/voice-clones/v1/voice-clones", "holds /v1/ twice"),
        ("POST", "/v1/v1/voice-clones", "holds /v1/ twice"),  # a relay URL pasted ending in /v1
    ],
)
def test_common_address_mistakes_are_named_in_the_404(client, method, path, says):
    response = client.open(path, method=method, headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert_error_shape(response, 404, "not_found")
    assert says in response.json["error_message"]


def test_no_trailing_slash_hint_where_dropping_it_leads_to_a_405(client):
    response = client.get("/v1/voice-clones/", headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status_code == 404 and "trailing slash" not in response.json["error_message"]


def test_an_unexpected_exception_is_a_json_500(make_app, settings, monkeypatch):
    app = make_app(settings)

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")

    assert_error_shape(app.test_client().get("/boom"), 500, "internal_error")


def test_a_bogus_request_id_is_replaced(client):
    response = client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert response.headers["X-Request-Id"] != "bad id with spaces"
    assert len(response.headers["X-Request-Id"]) == 32


@pytest.mark.parametrize(
    ("headers", "status", "source"),
    [
        ({"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": "t-123456789012"}, 200, "request"),
        ({"Authorization": f"Bearer {RELAY_KEY}"}, 200, None),
        ({"Authorization": "Bearer wrong"}, 401, None),
    ],
)
def test_auth_check_for_connectors(client, headers, status, source):
    response = client.get("/v1/auth", headers=headers)
    assert response.status_code == status
    if status == 200:
        assert response.json["ok"] is True and response.json["useapi_token"] == source
    else:
        assert response.json["error_code"] == "unauthorized"


def test_auth_check_asks_useapi_whether_it_takes_the_token(make_app, job_settings, fake):
    """A connection test with a token useapi refuses fails there, naming the token checked (before,
    it passed, and every clone failed later)."""
    client = make_app(job_settings).test_client()
    key = {"Authorization": f"Bearer {RELAY_KEY}"}
    good = client.get("/v1/auth", headers={**key, "X-Useapi-Token": TOKEN})
    assert (good.status_code, good.json["useapi_account"]) == (200, "ok")
    refused = client.get("/v1/auth", headers={**key, "X-Useapi-Token": "t-wrong-0000000000"})
    assert (refused.status_code, refused.json["error_code"]) == (401, "upstream_unauthorized")
    assert "X-Useapi-Token, …0000" in refused.json["error_message"]
    server = make_app(job_settings.replace(useapi_token="t-stale-1111111111")).test_client()
    stale = server.get("/v1/auth", headers=key)
    assert stale.status_code == 401 and "the relay's USEAPI_TOKEN, …1111" in stale.json["error_message"]
    placeholder = client.get("/v1/auth", headers={**key, "X-Useapi-Token": "YOUR_USEAPI_TOKEN_OR_EMPTY"})
    assert (placeholder.status_code, placeholder.json["error_code"]) == (400, "invalid_request")
    assert "placeholder" in placeholder.json["error_message"]
    fake.lookup_delay = 3  # useapi too slow to ask: the relay's own check still passes
    slow = make_app(job_settings.replace(lookup_timeout=0.5)).test_client()
    answer = slow.get("/v1/auth", headers={**key, "X-Useapi-Token": TOKEN}).json
    assert answer["ok"] is True and answer["useapi_account"] == "not checked: upstream_timeout"
    # The message names the bound that ended the look (RELAY_LOOKUP_TIMEOUT), not the call's own.
    listed = slow.get("/v1/voices", headers={**key, "X-Useapi-Token": TOKEN})
    assert (listed.status_code, listed.json["error_code"]) == (504, "upstream_timeout")
    assert "within 0.5 s" in listed.json["error_message"], listed.json["error_message"]


def test_auth_check_refuses_a_per_request_token_the_relay_could_not_keep(make_app, settings):
    # Workers in another process and no RELAY_SECRET_KEY: every clone with this token would be refused.
    client = make_app(settings.replace(secret_key=None), workers=0).test_client()
    headers = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": "t-123456789012"}
    response = client.get("/v1/auth", headers=headers)
    assert (response.status_code, response.json["error_code"]) == (400, "secret_key_required")
    assert client.get("/v1/auth", headers={"Authorization": f"Bearer {RELAY_KEY}"}).status_code == 200


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/voice-clones/" + "0" * 32, {"Authorization": f"Bearer {RELAY_KEY}"}, 404, "job_not_found"),
        ("/v1/voice-clones/" + "0" * 32, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ("/v1/voice-clones/not-a-job", {"Authorization": f"Bearer {RELAY_KEY}"}, 404, "job_not_found"),
    ],
)
def test_a_status_poll_that_reaches_no_job_is_not_a_failed_clone(client, path, headers, status, code):
    response = client.get(path, headers=headers)
    assert (response.status_code, response.json["error_code"]) == (status, code)
    assert response.json["ok"] is False and response.json["status"] is None
