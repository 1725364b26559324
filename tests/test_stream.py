"""Early uploads: a large file goes up while it comes down, and its upload completes only once
the whole file is valid (relay/stream.py), on both databases."""

from __future__ import annotations

import gzip
import threading
import time

import pytest

from relay.stream import TAIL, EarlyUpload, GrowingFile, Withheld

from . import servers
from .conftest import HEADERS, audio_bytes, post, wait_until

STREAM_FROM = 10_000  # bytes: the fixtures below are larger


@pytest.fixture
def streaming(make_app, job_settings):
    return make_app(job_settings.replace(stream_min_bytes=STREAM_FROM)).test_client()


def test_a_large_file_is_uploading_before_its_download_ends(streaming, fake):
    body, sent_at = audio_bytes("wav_pcm24_stereo.wav"), []
    with servers.RawServer(servers.in_pieces(body, pieces=12, interval=0.1, sent_at=sent_at)) as host:
        response = post(streaming, {"audio_url": host.url("/a.wav"), "name": "Early", "wait_seconds": 20})
    assert response.status_code == 200, response.json
    assert response.json["status"] == "ready" and response.json["audio_bytes"] == len(body)
    [upload] = fake.uploads
    assert upload["bytes"] == len(body) and not fake.incomplete
    assert upload["started"] < sent_at[0] - 0.2  # the upload began while the download went on


@pytest.mark.parametrize(
    "name, pieces, reset_after, error_code",
    [
        # valid first bytes, so the upload starts; the header promises more samples than the file has
        ("wav_truncated.wav", 4, None, "audio_corrupt"),
        # the audio host breaks the connection two thirds of the way through
        ("wav_pcm24_stereo.wav", 12, 96_000, "download_failed"),
    ],
)
def test_an_upload_whose_file_fails_is_left_incomplete(streaming, fake, name, pieces, reset_after, error_code):
    body = audio_bytes(name)
    with servers.RawServer(servers.in_pieces(body, pieces, 0.05, reset_after=reset_after)) as host:
        response = post(streaming, {"audio_url": host.url("/a.wav"), "name": "Bad", "wait_seconds": 20})
    assert response.json["status"] == "failed" and response.json["error_code"] == error_code, response.json
    wait_until(lambda: fake.incomplete, timeout=10)
    assert fake.upload_count() == 0 and not fake.uploads


def test_files_below_the_threshold_upload_after_the_download(make_app, job_settings, fake):
    client = make_app(job_settings.replace(stream_min_bytes=1_000_000)).test_client()
    body, sent_at = audio_bytes("wav_pcm24_stereo.wav"), []
    with servers.RawServer(servers.in_pieces(body, pieces=4, interval=0.1, sent_at=sent_at)) as host:
        response = post(client, {"audio_url": host.url("/a.wav"), "name": "Later", "wait_seconds": 20})
    assert response.json["status"] == "ready"
    assert fake.uploads[0]["started"] >= sent_at[0]


# --- the reader the upload sends from ------------------------------------------------------


def growing(tmp_path, size: int = 200_000, patience: float = 5.0):
    path = tmp_path / "spool"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"\0" * (size % 256))
    return GrowingFile(str(path), size, patience), path.read_bytes()


def read_all(reader: GrowingFile, into: list, errors: list) -> None:
    try:
        while chunk := reader.read(16_384):
            into.append(chunk)
    except Withheld as err:
        errors.append(err)


def test_the_reader_follows_the_download_and_holds_back_the_tail(tmp_path):
    reader, data = growing(tmp_path)
    got, errors = [], []
    thread = threading.Thread(target=read_all, args=(reader, got, errors))
    thread.start()
    reader.wrote(50_000)
    wait_until(lambda: sum(map(len, got)) == 50_000, timeout=5)
    reader.wrote(len(data))  # all downloaded, but not yet validated
    wait_until(lambda: sum(map(len, got)) == len(data) - TAIL, timeout=5)
    time.sleep(0.1)
    assert sum(map(len, got)) == len(data) - TAIL and thread.is_alive()
    reader.release()
    thread.join(5)
    reader.close()
    assert b"".join(got) == data and not errors


@pytest.mark.parametrize("end", ["abort", "silence"])
def test_the_reader_never_gives_the_tail_of_an_abandoned_file(tmp_path, end):
    reader, data = growing(tmp_path, patience=0.3)
    got, errors = [], []
    thread = threading.Thread(target=read_all, args=(reader, got, errors))
    thread.start()
    reader.wrote(len(data))
    if end == "abort":
        reader.abort()
    thread.join(5)
    reader.close()
    assert isinstance(errors[0], Withheld) and sum(map(len, got)) <= len(data) - TAIL


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("wav_pcm24_stereo.wav", "audio/wav"),
        ("mp3_vbr_id3v2.mp3", "audio/mpeg"),  # the ID3v2 tag ends inside the first bytes
        ("flac_mono.flac", "audio/flac"),
        ("m4a_aac.m4a", "audio/mp4"),
        ("ogg_vorbis.ogg", None),
        ("drive_interstitial.html", None),
        ("random.bin", None),
    ],
)
def test_only_accepted_formats_start_early_and_send_every_byte_once(tmp_path, name, content_type):
    data = audio_bytes(name)
    (tmp_path / "spool").write_bytes(data)
    begun = []

    def send(body, size, sent_as, before_tail):
        pieces = []
        while piece := body.read(4096):
            pieces.append(piece)
        return sent_as, size, b"".join(pieces)

    early = EarlyUpload(min_bytes=1, patience=5, begin=lambda: begun.append(True), send=send)
    early.path = str(tmp_path / "spool")
    early.progress(len(data), len(data))
    assert early.started == bool(begun) == (content_type is not None)
    if content_type is not None:
        assert early.finish() == (content_type, len(data), data)
    early.abandon()  # after finish, or with nothing started: nothing happens


def test_body_complete_is_written_only_when_the_body_reached_its_tail_and_the_file_is_valid(tmp_path):
    # begin() ("uploading") and before_release() ("body complete") are two writes of one row, in the
    # upload's thread: the second never overwritten by the first. And "body complete" waits until
    # the body has really reached its tail: written when the file was found valid while most of a
    # large body was still to go, a worker killed then left a job that never uploaded again
    # (it took the truncated request for one useapi may have) and ended upload_unconfirmed.
    order: list[str] = []
    path = tmp_path / "spool"
    data = audio_bytes("wav_pcm24_stereo.wav")
    path.write_bytes(data)
    halfway, go_on = threading.Event(), threading.Event()

    def begin():
        order.append("begin-start")
        time.sleep(0.3)  # a database write that takes a while
        order.append("begin-committed")

    def send(body, size, content_type, before_tail):
        position = 0
        while position < size - TAIL and (count := body.ready(position, min(4096, size - TAIL - position), least=1)):
            position += count
            if position >= size // 4 and not halfway.is_set():
                halfway.set()
                go_on.wait(10)  # a slow useapi: the validation is over long before the body gets here
        before_tail()
        while count := body.ready(position, 65536, least=1):
            position += count
        return position

    early = EarlyUpload(10_000, 5.0, begin, send, lambda: order.append("before_release"))
    early.path = str(path)
    early.progress(len(data), len(data))
    assert early.started and halfway.wait(10)
    finished: list = []
    finishing = threading.Thread(target=lambda: finished.append(early.finish()))
    finishing.start()  # the file is valid now
    time.sleep(0.2)
    assert "before_release" not in order  # a quarter of the body is out: nothing is "complete"
    go_on.set()
    finishing.join(10)
    assert finished == [len(data)]
    assert order == ["begin-start", "begin-committed", "before_release"]


def test_a_body_the_host_compresses_is_uploaded_whole_not_at_its_compressed_length(make_app, job_settings, fake):
    client = make_app(job_settings.replace(stream_min_bytes=1000)).test_client()
    body = audio_bytes("flac_mono.flac")
    packed = gzip.compress(body)  # about half: the declared length is not the file's

    def gzipped(conn, stop):
        conn.sendall(servers.headers(Content_Encoding="gzip", Content_Length=str(len(packed)), Connection="close"))
        for start in range(0, len(packed), 2_000):
            conn.sendall(packed[start : start + 2_000])
            time.sleep(0.02)

    with servers.RawServer(gzipped) as host:
        response = post(client, {"audio_url": host.url("/a.flac"), "name": "Packed", "wait_seconds": 20})
    assert response.json["status"] == "ready", response.json
    assert [upload["bytes"] for upload in fake.uploads] == [len(body)]


def test_an_early_answer_before_the_tail_went_is_a_refusal_not_a_body_useapi_may_have(make_app, job_settings):
    # A proxy answers 502 (an HTML page) right after the request's head and closes, while the relay
    # streams the file and holds its tail: the body never completed, so the upload is tried again
    # (never "useapi received the whole recording… may have been charged" after a reconcile).
    page = b"<html>502 Bad Gateway</html>"

    def early_502(conn, stop):
        conn.sendall(servers.headers("502 Bad Gateway", Content_Type="text/html", Content_Length=str(len(page))) + page)

    body = audio_bytes("wav_pcm24_stereo.wav")
    with servers.RawServer(early_502, host="127.0.0.1") as upstream:
        settings = job_settings.replace(
            stream_min_bytes=STREAM_FROM, useapi_base_url=upstream.url("/v1"), max_attempts=2, retry_base_seconds=0.05
        )
        client = make_app(settings).test_client()
        with servers.RawServer(servers.in_pieces(body, pieces=12, interval=0.05)) as host:
            first = post(client, {"audio_url": host.url("/a.wav"), "name": "Early answer", "wait_seconds": 0})
            job_id = first.json["job_id"]

            def ended():
                answer = client.get(f"/v1/voice-clones/{job_id}", headers=HEADERS).json
                return answer if answer["status"] == "failed" else None

            answer = wait_until(ended, timeout=30)
        requests_seen = list(upstream.requests)
    assert answer["error_code"] == "upstream_unavailable", answer
    assert sum(1 for seen in requests_seen if seen.startswith(b"POST")) == 2  # tried again, as a refusal is
    assert not any(seen.startswith(b"GET") for seen in requests_seen)  # nothing to look for
