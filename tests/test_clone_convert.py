"""Clones of recordings in other formats, end to end: what reaches useapi is converted, checked
and never silent; large accepted files still start uploading while they download."""

from __future__ import annotations

import struct

import av
import pytest

from . import servers
from .conftest import post, wait_until
from .test_convert import MEDIA, decoded

STREAM_FROM = 10_000


def serve_media(audio_host, name: str) -> str:
    audio_host.expect_request(f"/{name}").respond_with_data((MEDIA / name).read_bytes())
    return audio_host.url_for(f"/{name}")


@pytest.fixture
def jobs_client(make_app, job_settings):
    return make_app(job_settings).test_client()


def sent_file(tmp_path, upload: dict):
    path = tmp_path / "sent.bin"
    path.write_bytes(upload["body"])
    return path


def test_a_voice_note_is_converted_before_upload(jobs_client, fake, audio_host, tmp_path):
    response = post(jobs_client, {"audio_url": serve_media(audio_host, "voice_note.opus"), "name": "Note"})
    assert response.status_code == 200, response.json
    body = response.json
    assert (body["source_format"], body["converted"], body["audio_format"]) == ("opus", True, "flac")
    assert body["audio_content_type"] == "audio/flac"
    assert body["audio_peak_dbfs"] > -3 and body["audio_rms_dbfs"] < -15
    [upload] = fake.uploads
    assert upload["content_type"] == "audio/flac" and upload["bytes"] == body["audio_bytes"]
    seconds, fmt = decoded(sent_file(tmp_path, upload))
    assert fmt == "flac" and seconds == pytest.approx(decoded(MEDIA / "voice_note.opus")[0], rel=0.02)


def test_a_phone_video_uploads_only_its_audio(jobs_client, fake, audio_host, tmp_path):
    response = post(jobs_client, {"audio_url": serve_media(audio_host, "phone.mp4"), "name": "Video"})
    assert response.status_code == 200, response.json
    assert (response.json["source_format"], response.json["converted"]) == ("mp4", True)
    [upload] = fake.uploads
    assert upload["content_type"] == "audio/mp4"
    decoded(sent_file(tmp_path, upload))  # asserts there is no video stream


def test_an_accepted_file_is_not_converted(jobs_client, fake, audio_host):
    response = post(jobs_client, {"audio_url": serve_media(audio_host, "speech.wav"), "name": "Plain"})
    assert response.json["converted"] is False and response.json["source_format"] == "wav"
    assert fake.uploads[0]["body"] == (MEDIA / "speech.wav").read_bytes()


def test_convert_never_refuses_other_formats(jobs_client, fake, audio_host):
    url = serve_media(audio_host, "voice_note.opus")
    response = post(jobs_client, {"audio_url": url, "name": "Note", "convert": "never"})
    assert (response.status_code, response.json["error_code"]) == (422, "unsupported_audio_format")
    assert fake.uploads == []


@pytest.mark.parametrize("name", ["silence.wav", "near_silence.wav", "silence.opus"])
def test_a_silent_recording_never_costs_a_clone(jobs_client, fake, audio_host, name):
    response = post(jobs_client, {"audio_url": serve_media(audio_host, name), "name": "Mute"})
    assert (response.status_code, response.json["error_code"]) == (422, "audio_silent"), response.json
    assert response.json["audio_peak_dbfs"] < -60 and response.json["ok"] is False
    assert fake.uploads == []


@pytest.fixture
def streaming(make_app, job_settings):
    return make_app(job_settings.replace(stream_min_bytes=STREAM_FROM)).test_client()


def test_a_video_that_started_early_is_withdrawn_and_its_audio_sent(streaming, fake, tmp_path):
    # An MP4 looks like M4A from its first bytes, so its upload starts early; once the video track is
    # found, that upload is left incomplete and the audio alone goes up.
    body = (MEDIA / "phone.mp4").read_bytes()
    assert len(body) > STREAM_FROM
    with servers.RawServer(servers.in_pieces(body, pieces=4, interval=0.05)) as host:
        response = post(streaming, {"audio_url": host.url("/v.mp4"), "name": "Video", "wait_seconds": 20})
    assert response.status_code == 200, response.json
    wait_until(lambda: fake.incomplete, timeout=10)
    [upload] = fake.uploads
    assert upload["content_type"] == "audio/mp4" and upload["bytes"] < len(body)
    with av.open(str(sent_file(tmp_path, upload))) as sent:
        assert not sent.streams.video


def test_a_large_silent_wav_that_started_early_is_left_incomplete(streaming, fake):
    data = bytes(200_000)
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
        + b"data"
        + struct.pack("<I", len(data))
    )
    with servers.RawServer(servers.in_pieces(header + data, pieces=4, interval=0.05)) as host:
        response = post(streaming, {"audio_url": host.url("/s.wav"), "name": "Mute", "wait_seconds": 20})
    assert response.json["error_code"] == "audio_silent", response.json
    wait_until(lambda: fake.incomplete, timeout=10)
    assert fake.upload_count() == 0 and not fake.uploads
