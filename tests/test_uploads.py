"""Files as well as links: the recording in a multipart form or as the raw body, stored in the
database until its job is done, on both databases; a kill -9 of the worker loses nothing."""

from __future__ import annotations

import io
import json

import pytest
import requests
from sqlalchemy import func, select

from relay import db, uploads
from relay.errors import UploadStorageFull

from .conftest import HEADERS, audio_bytes, over_http, post, wait_until
from .test_convert import MEDIA
from .test_jobs import WorkerProcess


def multipart(client, fields: dict, data: bytes, filename: str = "voice.bin", headers=None):
    form = {**fields, "file": (io.BytesIO(data), filename)}
    return client.post(
        "/v1/voice-clones", data=form, content_type="multipart/form-data", headers={**HEADERS, **(headers or {})}
    )


def raw(client, query: dict, data: bytes, content_type: str = "application/octet-stream", headers=None):
    return client.post(
        "/v1/voice-clones",
        query_string=query,
        data=data,
        content_type=content_type,
        headers={**HEADERS, **(headers or {})},
    )


def stored(app) -> tuple[int, int]:
    engine = app.extensions["relay.runtime"].engine
    with engine.connect() as conn:
        return (
            conn.scalar(select(func.count()).select_from(db.uploads)),
            conn.scalar(select(func.count()).select_from(db.upload_chunks)),
        )


@pytest.fixture
def app(make_app, job_settings):
    return make_app(job_settings)


FORMS = ["multipart", "raw", "json"]


def send(form: str, client, audio_host, name: str, data: bytes, fields: dict, headers=None):
    if form == "multipart":
        return multipart(client, fields, data, filename=name, headers=headers)
    if form == "raw":
        return raw(client, fields, data, headers=headers)
    audio_host.expect_request(f"/{name}").respond_with_data(data)
    if "metadata" in fields:  # JSON carries it as an object, the forms as JSON text
        fields = {**fields, "metadata": json.loads(fields["metadata"])}
    return post(client, {**fields, "audio_url": audio_host.url_for(f"/{name}")}, headers=headers)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["wav_pcm16_mono.wav", "mp3_vbr_id3v2.mp3", "flac_mono.flac", "m4a_aac.m4a"])
def test_accepted_files_arrive_byte_exact_by_every_form(app, fake, audio_host, form, name):
    data = audio_bytes(name)
    response = send(form, app.test_client(), audio_host, name, data, {"name": "Sent", "metadata": '{"row": 3}'})
    assert response.status_code == 200, response.json
    assert response.json["converted"] is False and response.json["audio_bytes"] == len(data)
    assert response.json["metadata"] == {"row": 3}
    [upload] = fake.uploads
    assert upload["body"] == data and upload["name"] == "Sent"
    wait_until(lambda: stored(app) == (0, 0))  # deleted as soon as useapi had it


@pytest.mark.parametrize("form", FORMS)
def test_a_voice_note_is_converted_by_every_form(app, fake, audio_host, form):
    data = (MEDIA / "voice_note.opus").read_bytes()
    response = send(form, app.test_client(), audio_host, "note.opus", data, {"name": "Note"})
    assert response.status_code == 200, response.json
    assert (response.json["source_format"], response.json["audio_format"]) == ("opus", "flac")
    assert fake.uploads[0]["content_type"] == "audio/flac"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("name", "code"),
    [("drive_interstitial.html", "not_audio"), ("random.bin", "not_audio"), ("silence", "audio_silent")],
)
def test_non_audio_and_silence_are_refused_by_every_form(app, fake, audio_host, form, name, code):
    data = (MEDIA / "silence.wav").read_bytes() if name == "silence" else audio_bytes(name)
    response = send(form, app.test_client(), audio_host, name, data, {"name": "Bad"})
    assert (response.status_code, response.json["error_code"]) == (422, code), response.json
    assert fake.uploads == []
    wait_until(lambda: stored(app) == (0, 0))  # a failed job keeps nothing


@pytest.mark.parametrize("form", ["multipart", "raw"])
def test_an_empty_file_is_not_audio(app, form):
    client = app.test_client()
    response = multipart(client, {"name": "x"}, b"") if form == "multipart" else raw(client, {"name": "x"}, b"")
    assert (response.status_code, response.json["error_code"]) == (422, "not_audio")


def test_fields_come_from_the_form_or_the_query_string(app, fake):
    client = app.test_client()
    data = audio_bytes("wav_pcm16_mono.wav")
    response = multipart(client, {"name": "Dry", "dry_run": "true", "colour": "red"}, data)
    assert response.json["status"] == "validated" and response.json["dry_run"] is True
    assert response.json["warnings"] == ["Unknown field 'colour' was ignored."]
    response = raw(client, {"name": "Dry", "dry_run": "true", "metadata": '{"a": [1]}'}, data, "audio/wav")
    assert response.json["status"] == "validated" and response.json["metadata"] == {"a": [1]}
    assert fake.uploads == []
    response = raw(client, {"name": "x", "metadata": "{not json"}, data)
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")
    deep = '{"a": ' * 5000 + "1" + "}" * 5000  # JSON in a form field, nested past the parser's depth
    response = multipart(client, {"name": "x", "metadata": deep}, data)
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")
    assert "nested too deeply" in response.json["error_message"]
    response = raw(client, {}, data)
    assert response.json["error_code"] == "invalid_request" and "name" in response.json["error_message"]


def test_a_recording_or_a_form_sent_with_the_wrong_content_type_is_told_what_to_change(app):
    client = app.test_client()
    wav, opus = audio_bytes("wav_pcm16_mono.wav"), (MEDIA / "voice_note.opus").read_bytes()[:20000]
    # curl --data-binary @voice.wav without -H: form-urlencoded; a small file: read as (bad) JSON text.
    for data, kind, media_type in ((wav[:20000], "WAV", "audio/wav"), (opus, "OGG-OPUS", "application/octet-stream")):
        for sent in ("application/x-www-form-urlencoded", "text/plain"):
            response = raw(client, {"name": "x"}, data, sent)
            said = response.json["error_message"]
            assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")
            assert f"The body is a recording ({kind}) sent as {sent}: send it with Content-Type {media_type}" in said
    # Past the JSON limit, whatever it is: how to send a file, not only "send a URL".
    response = raw(client, {"name": "x"}, b"RIFF" + b"\0" * 200_000, "application/x-www-form-urlencoded")
    assert (
        response.status_code == 413
        and "multipart/form-data with the file in a part named 'file'" in (response.json["error_message"])
    )
    # A multipart form with a JSON Content-Type left on it.
    boundary = b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--xyz--\r\n'
    response = raw(client, {}, boundary, "application/json")
    assert "The body is a multipart form sent as application/json" in response.json["error_message"]
    # curl -F file=voice.ogg (no @): the part is text.
    response = client.post(
        "/v1/voice-clones", data={"name": "x", "file": "voice.ogg"}, content_type="multipart/form-data", headers=HEADERS
    )
    assert "The form part 'file' is text, not a file" in response.json["error_message"]
    # ...but next to a link (an empty file input in a form), it is an unknown field, as before.
    response = client.post(
        "/v1/voice-clones",
        data={"name": "x", "file": "", "audio_url": "https://example.com/a.wav", "dry_run": "true"},
        content_type="multipart/form-data",
        headers=HEADERS,
    )
    assert "The form part 'file' is text" not in (response.json["error_message"] or "")
    # The recording as the body, its name forgotten in the query string.
    response = raw(client, {}, wav, "audio/wav")
    assert "the fields go in the query string (?name=My%20voice)" in response.json["error_message"]


def test_a_file_and_a_link_together_are_refused(app):
    response = multipart(app.test_client(), {"name": "x", "audio_url": "https://example.com/a.wav"}, b"RIFF")
    assert (response.status_code, response.json["error_code"]) == (400, "invalid_request")


def test_a_form_with_a_link_works_like_json(app, fake, audio_host):
    audio_host.expect_request("/a.wav").respond_with_data(audio_bytes("wav_pcm16_mono.wav"))
    response = app.test_client().post(
        "/v1/voice-clones",
        data={"name": "Form", "audio_url": audio_host.url_for("/a.wav")},
        content_type="multipart/form-data",
        headers=HEADERS,
    )
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("form", ["multipart", "raw"])
@pytest.mark.parametrize("padding", [0, 1_200_000], ids=["just-over", "far-over"])
def test_files_over_relay_max_bytes_are_413(make_app, job_settings, form, padding):
    app = make_app(job_settings.replace(max_bytes=10_000))
    data = audio_bytes("wav_pcm16_mono.wav") + bytes(padding)  # 64 KB, or past the form allowance too
    with over_http(app) as base:
        if form == "multipart":
            response = requests.post(
                f"{base}/v1/voice-clones",
                data={"name": "x"},
                files={"file": ("v.wav", data)},
                headers=HEADERS,
                timeout=30,
            )
        else:
            response = requests.post(
                f"{base}/v1/voice-clones",
                params={"name": "x"},
                data=data,
                headers={**HEADERS, "Content-Type": "audio/wav"},
                timeout=30,
            )
    assert (response.status_code, response.json()["error_code"]) == (413, "request_too_large")
    # What the caller did was right: the file is too large, not the form of the request.
    assert "The uploaded file is over" in response.json()["error_message"]


def test_stored_bytes_are_bounded_with_a_clear_503(make_app, job_settings):
    app = make_app(job_settings.replace(upload_store_bytes=300_000), workers=0)
    client = app.test_client()
    data = audio_bytes("wav_pcm16_mono.wav")  # 64 KB
    for account in ("A", "B"):  # two each: 256 KB of 300 KB
        for n in range(2):
            query = {"name": f"{account}{n}", "user_id": account, "wait_seconds": "0"}
            assert raw(client, query, data).status_code == 202
    response = raw(client, {"name": "C", "user_id": "C", "wait_seconds": "0"}, data)
    assert (response.status_code, response.json["error_code"]) == (503, "upload_storage_full")
    assert response.headers["Retry-After"] == "60" and "RELAY_UPLOAD_STORE_BYTES" in response.json["error_message"]
    assert stored(app)[0] == 4


def test_one_accounts_waiting_files_leave_room_for_the_others(make_app, job_settings):
    # A backlog of one account's files (waiting behind its own limit) must not refuse everyone else's.
    app = make_app(job_settings.replace(upload_store_bytes=300_000), workers=0)
    client = app.test_client()
    data = audio_bytes("wav_pcm16_mono.wav")  # 64 KB: one account may hold 150 KB, two files
    answers = [raw(client, {"name": f"A{n}", "user_id": "A", "wait_seconds": "0"}, data) for n in range(3)]
    assert [answer.status_code for answer in answers] == [202, 202, 503]
    assert "one account may hold at most half" in answers[2].json["error_message"]
    other = raw(client, {"name": "B", "user_id": "B", "wait_seconds": "0"}, data)
    assert other.status_code == 202


def test_an_accounts_share_counts_files_whose_jobs_are_not_written_yet_and_one_file_always_fits(make_app, job_settings):
    # A burst: each file is stored before its job row exists, so the share is counted on the files.
    app = make_app(job_settings.replace(upload_store_bytes=300_000), workers=0)
    engine = app.extensions["relay.runtime"].engine
    data = audio_bytes("wav_pcm16_mono.wav")  # 64 KB; one account may hold 150 KB
    for n in range(2):
        uploads.save(engine, io.BytesIO(data), len(data), f"{n:032x}", 300_000, account="A")
    with pytest.raises(UploadStorageFull, match="one account may hold at most half"):
        uploads.save(engine, io.BytesIO(data), len(data), f"{2:032x}", 300_000, account="A")
    # A file larger than half the store, while the account holds none: taken (a 60 s retry would never help).
    big = data * 3  # 192 KB of 300 KB, with 128 KB stored: over the whole store
    with pytest.raises(UploadStorageFull, match="RELAY_UPLOAD_STORE_BYTES"):
        uploads.save(engine, io.BytesIO(big), len(big), f"{3:032x}", 300_000, account="B")
    assert uploads.save(engine, io.BytesIO(big[:160_000]), 160_000, f"{4:032x}", 300_000, account="B").size == 160_000


def test_a_file_an_older_process_stored_counts_for_its_jobs_account(make_app, job_settings):
    # During a deploy an older process stores files without their account: their job names it.
    app = make_app(job_settings.replace(upload_store_bytes=300_000), workers=0)
    runtime = app.extensions["relay.runtime"]
    data = audio_bytes("wav_pcm16_mono.wav")  # 64 KB; one account may hold 150 KB
    for n in range(2):
        job_id = f"{n:032x}"
        uploads.save(runtime.engine, io.BytesIO(data), len(data), job_id, 300_000)  # no account, as before
        runtime.store.create(job_id, request={"name": "old"}, account_key="A", token_kind="server")
    with pytest.raises(UploadStorageFull, match="one account may hold at most half"):
        uploads.save(runtime.engine, io.BytesIO(data), len(data), f"{9:032x}", 300_000, account="A")


def test_the_same_key_and_file_make_one_job(app, fake):
    client = app.test_client()
    data = audio_bytes("wav_pcm16_mono.wav")
    first = raw(client, {"name": "Once"}, data, headers={"Idempotency-Key": "k-1"})
    again = multipart(client, {"name": "Once"}, data, headers={"Idempotency-Key": "k-1"})
    assert first.json["job_id"] == again.json["job_id"] and fake.upload_count() == 1
    other = raw(client, {"name": "Once"}, audio_bytes("flac_mono.flac"), headers={"Idempotency-Key": "k-1"})
    assert (other.status_code, other.json["error_code"]) == (422, "idempotency_key_reused")
    wait_until(lambda: stored(app) == (0, 0))


def test_an_upload_job_survives_kill_9_and_another_process_finishes_it(make_app, job_settings, fake, tmp_path):
    fake.upload_delay = 3
    app = make_app(job_settings, workers=0)
    store = app.extensions["relay.runtime"].store
    data = (MEDIA / "voice_note.opus").read_bytes()
    job_id = raw(app.test_client(), {"name": "Survivor", "wait_seconds": "0"}, data, "audio/ogg").json["job_id"]
    first = WorkerProcess(job_settings, tmp_path, "first")
    try:
        wait_until(lambda: fake.upload_count() >= 1)  # its upload is under way
    finally:
        first.kill()
    assert stored(app)[0] == 1  # the file is still held for the job
    fake.upload_delay = 0
    second = WorkerProcess(job_settings, tmp_path, "second")
    try:
        job = wait_until(lambda: (j := store.get(job_id)).terminal and j, 60)
    finally:
        assert second.stop() == 0
    assert job.phase == "ready", job.answer
    assert job.answer["source_format"] == "opus" and job.answer["converted"] is True
    assert fake.upload_count() == 1
    assert json.loads(json.dumps(job.answer))["audio_format"] == "flac"
    assert stored(app) == (0, 0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_chunked_body_over_http_is_streamed_and_bounded(make_app, job_settings, fake):
    """Over real HTTP, with no Content-Length (chunked): the limit holds while the body streams."""
    import requests

    data = audio_bytes("wav_pcm16_mono.wav")

    def pieces(body: bytes, size: int = 8192):
        for start in range(0, len(body), size):
            yield body[start : start + size]

    with over_http(make_app(job_settings.replace(max_bytes=100_000))) as base:
        url = f"{base}/v1/voice-clones"
        headers = {**HEADERS, "Content-Type": "audio/wav"}
        ok = requests.post(url, params={"name": "Chunked"}, data=pieces(data), headers=headers, timeout=30)
        assert ok.status_code == 200, ok.text
        assert fake.uploads[0]["body"] == data
        big = requests.post(url, params={"name": "Big"}, data=pieces(data * 3), headers=headers, timeout=30)
        assert (big.status_code, big.json()["error_code"]) == (413, "request_too_large")


def test_the_sweep_removes_only_uploads_no_job_needs(make_app, job_settings, tmp_path):
    from datetime import timedelta

    app = make_app(job_settings, workers=0)
    engine = app.extensions["relay.runtime"].engine
    job_id = raw(app.test_client(), {"name": "Waiting", "wait_seconds": "0"}, audio_bytes("flac_mono.flac")).json[
        "job_id"
    ]
    with open(MEDIA / "speech.wav", "rb") as source:  # an upload whose request died before its job was written
        uploads.save(engine, source, (MEDIA / "speech.wav").stat().st_size, "f" * 32, 10**9)
    assert stored(app)[0] == 2
    assert uploads.sweep(engine, db.utcnow() - timedelta(minutes=10)) == 0  # both are recent
    assert uploads.sweep(engine, db.utcnow() + timedelta(seconds=1)) == 1  # the orphan goes, the job's stays
    assert stored(app)[0] == 1
    spooled = str(tmp_path / "spooled.bin")
    with pytest.raises(Exception) as caught:
        uploads.spool(engine, "f" * 32, spooled)
    assert getattr(caught.value, "error_code", None) == "download_failed"
    assert uploads.spool(engine, job_id, spooled) == len(audio_bytes("flac_mono.flac"))
