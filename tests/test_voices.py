"""Voices: list (all pages), find, read, delete, and if_exists on clones, against the useapi stand-in."""

from __future__ import annotations

import pytest

from relay import voices

from .conftest import RELAY_KEY, TOKEN, clone, serve_file

LIST = "/v1/tempolor/music/cloned-voices/"
AUTH = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}
ODD_IDS = [
    "user:12345-tempolor:67890-voice:abcdef123456789",
    "user:1-tempolor:jane.doe+music@example.com-voice:a_b-C",
    "user:abc_9-tempolor:my-account-1-voice:0",
]


def record(item_id: str, name: str, status: int = 30, user_id: str = "67890", created: int = 1716565425000) -> dict:
    return {
        "isAddRel": False,
        "ucid": user_id,
        "itemId": item_id,
        "name": name,
        "status": status,
        "vocalUrl": f"https://cdn.example/{item_id}.mp3",
        "createTime": created,
        "updateTime": created + 275000,
        "labels": [],
        "clonedVoiceItemId": f"user:12345-tempolor:{user_id}-voice:{item_id}",
    }


def serve_pages(useapi, pages: list[list[dict]], user_id: str = "67890") -> None:
    for number, records in enumerate(pages):
        query = {"user_id": user_id} if number == 0 else {"user_id": user_id, "cursor": f"c{number}"}
        has_next = number + 1 < len(pages)
        useapi.expect_request(
            LIST, method="GET", query_string=query, headers={"Authorization": f"Bearer {TOKEN}"}
        ).respond_with_json({"records": records, "hasNext": has_next, "cursor": f"c{number + 1}" if has_next else ""})


def test_list_walks_every_page_and_flattens(client, useapi):
    serve_pages(useapi, [[record("a1", "Alice")], [record("b2", "Bob", status=0)], [record("c3", "Carol", status=50)]])
    response = client.get("/v1/voices?user_id=67890", headers=AUTH)
    assert response.status_code == 200
    body = response.json
    assert (body["ok"], body["count"], body["complete"]) == (True, 3, True)
    assert [v["status"] for v in body["voices"]] == ["ready", "processing", "failed"]
    assert [v["upstream_status_code"] for v in body["voices"]] == [30, 0, 50]
    assert body["voices"][0] == {
        "cloned_voice_item_id": "user:12345-tempolor:67890-voice:a1",
        "item_id": "a1",
        "name": "Alice",
        "status": "ready",
        "upstream_status_code": 30,
        "vocal_url": "https://cdn.example/a1.mp3",
        "created_at": "2024-05-24T15:43:45Z",
        "updated_at": "2024-05-24T15:48:20Z",
        "user_id": "67890",
    }
    assert len(useapi.log) == 3


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("name=alice", ["Alice"]),
        ("name=%20ALICE%20", ["Alice"]),
        ("name=Ali", []),
        ("name_contains=li", ["Alice", "Alina"]),
        ("status=processing", ["Alina"]),
        ("name_contains=a&status=ready", ["Alice"]),
    ],
)
def test_list_filters(client, useapi, query, names):
    serve_pages(useapi, [[record("a1", "Alice"), record("a2", "Alina", status=0), record("b1", "Bob")]])
    response = client.get(f"/v1/voices?user_id=67890&{query}", headers=AUTH)
    assert [v["name"] for v in response.json["voices"]] == names
    assert response.json["count"] == len(names)


def test_listing_is_bounded_by_max_pages(make_app, settings, useapi):
    client = make_app(settings.replace(max_list_pages=2)).test_client()
    serve_pages(useapi, [[record("a", "A")], [record("b", "B")], [record("c", "C")]])
    body = client.get("/v1/voices?user_id=67890", headers=AUTH).json
    assert (body["count"], body["complete"]) == (2, False)
    assert "RELAY_MAX_LIST_PAGES" in body["warnings"][0]
    assert len(useapi.log) == 2


def test_if_exists_never_takes_a_listing_cut_short_for_no_such_voice(make_app, settings, useapi, audio_host):
    # The name is on page 3; only 2 pages are read: reuse must not clone a second one on a guess.
    client = make_app(settings.replace(max_list_pages=2)).test_client()
    serve_pages(useapi, [[record("a", "A")], [record("b", "B")], [record("m", "My voice")]])
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "My voice", "user_id": "67890", "if_exists": "reuse"})
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")
    assert "cannot tell whether a voice named 'My voice' exists" in response.json["error_message"]
    assert "more than 2 pages (RELAY_MAX_LIST_PAGES)" in response.json["error_message"]
    assert all(entry[0].method == "GET" for entry in useapi.log) and audio_host.log == []


def test_if_exists_against_a_looping_listing_says_so_and_not_that_time_ran_out(client, useapi, audio_host):
    useapi.expect_request(LIST).respond_with_json({"records": [record("a", "A")], "hasNext": True, "cursor": "same"})
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "My voice", "if_exists": "reuse"})
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer"), response.json
    assert "a cursor missing or repeated" in response.json["error_message"]
    assert "Try again later" not in response.json["error_message"] and audio_host.log == []


def test_times_written_as_digits_are_read_as_numbers_are(client, useapi):
    # is_status takes a status written as digits; the times beside it are read the same way.
    serve_pages(useapi, [[{**record("a", "Alpha"), "createTime": "1716565425000", "updateTime": "x"}]])
    (voice,) = client.get("/v1/voices?user_id=67890", headers=AUTH).json["voices"]
    assert (voice["created_at"], voice["updated_at"]) == ("2024-05-24T15:43:45Z", None)


def test_one_unreadable_record_does_not_make_the_whole_account_unreadable(client, useapi, audio_host):
    broken = {**record("x", "Old"), "clonedVoiceItemId": None}  # useapi's model: "all fields are optional"
    serve_pages(useapi, [[record("a", "Alpha"), broken, record("m", "My voice")]])
    body = client.get("/v1/voices?user_id=67890", headers=AUTH).json
    assert (body["ok"], body["count"], body["complete"]) == (True, 2, False), body
    assert "1 record(s) without a voice id or status" in body["warnings"][0]
    # The voice asked for is on the page: if_exists still finds it, and nothing is uploaded.
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "My voice", "user_id": "67890", "if_exists": "reuse"})
    assert response.json["cloned_voice_item_id"].endswith("-voice:m") and audio_host.log == [], response.json


def test_a_walk_keeps_a_bounded_number_of_voices_whatever_useapi_sends(client, useapi, monkeypatch):
    monkeypatch.setattr(voices, "MAX_VOICES", 3)  # 5000 in production: 100 times the largest plan's voices
    pages = [[record("a", "A"), record("b", "B")], [record("c", "C"), record("d", "D")], [record("e", "E")]]
    serve_pages(useapi, pages)
    body = client.get("/v1/voices?user_id=67890", headers=AUTH).json
    assert (body["complete"], body["count"]) == (False, 3)
    assert "more than 3 voices" in body["warnings"][0]


@pytest.mark.parametrize(("second", "count"), [("b", 2), ("a", 1)], ids=["new-voice", "same-page-again"])
def test_a_repeating_cursor_stops_the_walk_and_lists_each_voice_once(client, useapi, second, count):
    useapi.expect_request(LIST, query_string={"user_id": "67890"}).respond_with_json(
        {"records": [record("a", "A")], "hasNext": True, "cursor": "same"}
    )
    useapi.expect_request(LIST, query_string={"user_id": "67890", "cursor": "same"}).respond_with_json(
        {"records": [record(second, second.upper())], "hasNext": True, "cursor": "same"}
    )
    body = client.get("/v1/voices?user_id=67890", headers=AUTH).json
    assert body["complete"] is False and body["count"] == count


def test_a_page_announcing_more_without_a_cursor_is_an_incomplete_listing(client, useapi):
    # "hasNext: true" and no way to the next page: never "that was all" (if_exists would pay again).
    useapi.expect_request(LIST).respond_with_json({"records": [record("a", "A")], "hasNext": True, "cursor": ""})
    body = client.get("/v1/voices", headers=AUTH).json
    assert body["complete"] is False and body["count"] == 1 and body["warnings"]


def test_a_listing_without_has_next_is_not_the_documented_shape(client, useapi):
    useapi.expect_request(LIST).respond_with_json({"records": []})
    response = client.get("/v1/voices", headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")


def test_a_bad_status_filter_is_400(client):
    response = client.get("/v1/voices?status=done", headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("status", "relay_status", "code"),
    [(401, 401, "upstream_unauthorized"), (429, 429, "upstream_rate_limited"), (500, 502, "upstream_unavailable")],
)
def test_list_errors_map_like_clone_errors(client, useapi, status, relay_status, code):
    useapi.expect_request(LIST).respond_with_json({"error": "nope", "code": status}, status=status)
    response = client.get("/v1/voices", headers=AUTH)
    assert (response.status_code, response.json["error_code"], response.json["ok"]) == (relay_status, code, False)


@pytest.mark.parametrize("voice_id", ODD_IDS)
def test_get_one_voice_round_trips_the_id(client, useapi, voice_id):
    useapi.expect_request(f"{LIST}{voice_id}", method="GET").respond_with_json(
        {
            "status": 30,
            "name": "",
            "itemId": voice_id.rsplit(":", 1)[1],
            "clonedVoiceItemId": voice_id,
            "status_name": "COMPLETED",
        }
    )
    response = client.get(f"/v1/voices/{voice_id}", headers=AUTH)
    assert response.status_code == 200, response.json
    assert (response.json["ok"], response.json["cloned_voice_item_id"], response.json["status"]) == (
        True,
        voice_id,
        "ready",
    )
    assert useapi.log[0][0].path == f"{LIST}{voice_id}"


def test_a_voice_read_keeps_the_asked_id_when_the_record_holds_none(client, useapi):
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}").respond_with_json(
        {"status": 30, "name": "Mine", "itemId": voice_id.rsplit(":", 1)[1], "clonedVoiceItemId": None}
    )
    response = client.get(f"/v1/voices/{voice_id}", headers=AUTH)
    assert (response.status_code, response.json["cloned_voice_item_id"]) == (200, voice_id), response.json
    assert response.json["user_id"] == "67890"


def test_a_voice_read_that_fails_says_nothing_of_the_voices_status(client, useapi):
    """A poller that carries on past errors must not read a useapi hiccup as a failed clone."""
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}").respond_with_json(
        {"error": "Too many requests", "code": 429}, status=429
    )
    response = client.get(f"/v1/voices/{voice_id}", headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (429, "upstream_rate_limited")
    assert response.json["status"] is None


def test_an_unknown_voice_is_404(client, useapi):
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}").respond_with_json(
        {"error": f"No record found for {voice_id}", "code": 404}, status=404
    )
    response = client.get(f"/v1/voices/{voice_id}", headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (404, "voice_not_found")
    assert response.json["upstream_status"] == 404


@pytest.mark.parametrize(
    "bad_id",
    [
        "abc",
        "user:1-tempolor:2-voice:",
        "user:1-tempolor:2-voice:x;rm",
        "user:1-tempolor:a b-voice:x",
        "voice:1",
        "%00",
    ],
)
def test_malformed_ids_are_refused_before_calling_useapi(client, useapi, bad_id):
    for method in ("get", "delete"):
        response = getattr(client, method)(f"/v1/voices/{bad_id}", headers=AUTH)
        assert (response.status_code, response.json["error_code"]) == (400, "invalid_voice_id")
    assert useapi.log == []


@pytest.mark.parametrize("voice_id", ODD_IDS)
def test_delete_answers_deleted(client, useapi, voice_id):
    useapi.expect_request(f"{LIST}{voice_id}", method="DELETE").respond_with_json({"result": True})
    response = client.delete(f"/v1/voices/{voice_id}", headers=AUTH)
    assert response.json == {
        "ok": True,
        "deleted": True,
        "cloned_voice_item_id": voice_id,
        "request_id": response.json["request_id"],
    }


def test_deleting_a_voice_that_is_gone_is_still_ok(client, useapi):
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}", method="DELETE").respond_with_json(
        {"error": "No record found", "code": 404}, status=404
    )
    response = client.delete(f"/v1/voices/{voice_id}", headers=AUTH)
    assert response.status_code == 200
    assert (response.json["ok"], response.json["deleted"]) == (True, False)


@pytest.mark.parametrize(
    ("body", "kind"),
    [("<html><body>404 Not Found</body></html>", "text/html"), ("", "text/plain"), ('{"error": "nope"}', "x")],
    ids=["proxy-page", "empty", "json-without-code"],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_404_that_is_not_useapis_own_says_nothing_about_the_voice(client, useapi, body, kind, method):
    """Only useapi's {error, code: 404} means "no such voice": a proxy's 404 is an unreadable answer,
    never "not found" (someone would clone again) nor "already deleted"."""
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}", method=method).respond_with_data(body, status=404, content_type=kind)
    response = client.open(f"/v1/voices/{voice_id}", method=method, headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer"), response.json
    assert response.json["ok"] is False


def test_a_status_no_voice_has_is_an_unreadable_answer_not_a_crash(client, useapi):
    voice_id = ODD_IDS[0]
    useapi.expect_request(f"{LIST}{voice_id}").respond_with_json({"clonedVoiceItemId": voice_id, "status": "3" * 5000})
    response = client.get(f"/v1/voices/{voice_id}", headers=AUTH)
    assert (response.status_code, response.json["error_code"]) == (502, "upstream_invalid_answer")


def test_voice_endpoints_need_the_relay_key_and_a_token(client, useapi):
    assert client.get("/v1/voices", headers={"X-Useapi-Token": TOKEN}).status_code == 401
    response = client.get("/v1/voices", headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert (response.status_code, response.json["error_code"]) == (400, "missing_upstream_token")
    assert useapi.log == []


def test_if_exists_reuse_answers_with_the_existing_voice_and_uploads_nothing(client, useapi, audio_host):
    serve_pages(
        useapi, [[record("old", "My Voice", created=1716565425000), record("new", "my voice", created=1716569025000)]]
    )
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(client, {"audio_url": url, "name": "My voice", "user_id": "67890", "if_exists": "reuse"})
    assert response.status_code == 200
    body = response.json
    assert (body["ok"], body["status"], body["reused"]) == (True, "ready", True)
    assert body["cloned_voice_item_id"] == "user:12345-tempolor:67890-voice:new"
    assert all(entry[0].method == "GET" for entry in useapi.log)
    assert audio_host.log == []


def test_if_exists_reuse_clones_when_no_voice_has_the_name(client, useapi, audio_host):
    serve_pages(useapi, [[record("x", "Someone else")]])
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    useapi.expect_request(LIST, method="POST").respond_with_json(
        {"result": True, "itemId": "n", "clonedVoiceItemId": "user:1-tempolor:67890-voice:n"}
    )
    response = clone(client, {"audio_url": url, "name": "My voice", "user_id": "67890", "if_exists": "reuse"})
    assert (response.status_code, response.json["reused"]) == (200, False)
    assert [entry[0].method for entry in useapi.log] == ["GET", "POST"]


def test_if_exists_fail_is_409(client, useapi, audio_host):
    serve_pages(useapi, [[record("a1", "My voice")]])
    response = clone(
        client,
        {"audio_url": audio_host.url_for("/never.wav"), "name": "MY VOICE", "user_id": "67890", "if_exists": "fail"},
    )
    assert (response.status_code, response.json["error_code"]) == (409, "voice_exists")
    assert response.json["cloned_voice_item_id"] == "user:12345-tempolor:67890-voice:a1"
    assert audio_host.log == []


def test_a_failed_voice_with_the_name_does_not_count(client, useapi, audio_host):
    serve_pages(useapi, [[record("a1", "My voice", status=40)]])
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    response = clone(
        client, {"audio_url": url, "name": "My voice", "user_id": "67890", "if_exists": "fail", "dry_run": True}
    )
    assert (response.status_code, response.json["status"]) == (200, "validated")
