"""Downloads: pinned to checked addresses, redirects re-checked, size and time bounded, nothing left behind."""

from __future__ import annotations

import glob
import gzip
import os
import time
from pathlib import Path

import pytest

from relay import fetch
from relay.errors import DownloadFailed, DownloadTooLarge, UrlNotAllowed

from . import servers
from .conftest import audio_bytes, serve_file


@pytest.fixture(autouse=True)
def no_spool_left_behind(settings):
    """Every download here spools into the test's own folder (``settings.spool_dir``): it must be empty after."""
    yield
    assert glob.glob(os.path.join(settings.spool_dir, "*")) == []


def test_download_streams_the_exact_bytes_to_a_spool_file(audio_host, settings):
    url = serve_file(audio_host, "flac_mono.flac")
    with fetch.download(url, settings) as spool:
        with open(spool.path, "rb") as handle:
            assert handle.read() == audio_bytes("flac_mono.flac")
        assert spool.size == len(audio_bytes("flac_mono.flac"))
        path = spool.path
    assert not os.path.exists(path)


def test_redirects_are_followed_and_rechecked(audio_host, settings):
    target = serve_file(audio_host, "wav_pcm16_mono.wav")
    audio_host.expect_request("/share").respond_with_data("", status=302, headers={"Location": "/hop"})
    audio_host.expect_request("/hop").respond_with_data("", status=307, headers={"Location": target})
    with fetch.download(audio_host.url_for("/share"), settings) as spool:
        assert spool.redirects == 2
        assert spool.size == len(audio_bytes("wav_pcm16_mono.wav"))


def test_a_redirect_to_a_forbidden_address_is_refused_before_connecting(audio_host, useapi, settings):
    audio_host.expect_request("/share").respond_with_data(
        "", status=302, headers={"Location": useapi.url_for("/latest/meta-data")}
    )
    with pytest.raises(UrlNotAllowed):
        with fetch.download(audio_host.url_for("/share"), settings):
            pass
    assert useapi.log == []


@pytest.mark.parametrize("location", ["http://[::1/x.wav", "http://[127.0.0.1]/x.wav", "http://a..b/x.wav"])
def test_a_redirect_to_an_address_that_cannot_be_parsed_is_a_failed_download(audio_host, settings, location):
    audio_host.expect_request("/share").respond_with_data("", status=302, headers={"Location": location})
    with pytest.raises((DownloadFailed, UrlNotAllowed)) as caught:
        with fetch.download(audio_host.url_for("/share"), settings):
            pass
    assert caught.value.http_status == 422


def test_a_redirect_loop_stops_after_the_limit(settings):
    with servers.RawServer(servers.redirects_to(lambda n: f"/loop/{n}")) as server:
        with pytest.raises(DownloadFailed, match="redirected more than 5 times"):
            with fetch.download(server.url("/loop/0"), settings):
                pass
        assert server.connections == 6


def test_declared_size_over_the_limit_is_refused_before_the_body(audio_host, settings):
    url = serve_file(audio_host, "wav_pcm16_mono.wav")
    with pytest.raises(DownloadTooLarge, match="limit is"):
        with fetch.download(url, settings.replace(max_bytes=1000)):
            pass


def test_a_body_without_length_is_cut_at_the_limit(settings):
    with servers.RawServer(servers.chunked_forever()) as server:
        with pytest.raises(DownloadTooLarge):
            with fetch.download(server.url(), settings.replace(max_bytes=1_000_000)):
                pass


def test_a_body_shorter_than_its_content_length_fails_cleanly(settings):
    with servers.RawServer(servers.lies_about_length(declared=50_000, actual=10_000)) as server:
        with pytest.raises(DownloadFailed, match="broke off"):
            with fetch.download(server.url(), settings):
                pass


def test_a_body_longer_than_its_content_length_is_read_only_as_declared(settings):
    with servers.RawServer(servers.lies_about_length(declared=1000, actual=500_000)) as server:
        with fetch.download(server.url(), settings.replace(max_bytes=100_000)) as spool:
            assert spool.size == 1000


def test_a_content_length_that_is_not_ascii_digits_is_read_as_no_length(settings):
    # "²" (byte 0xB2, read as Latin-1) passes str.isdigit(); int() then raised outside the
    # download's error handling, and the job's step crashed on every retry.
    def behave(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: \xb2\r\n")
        conn.sendall(b"Connection: close\r\n\r\nRIFF....WAVE")

    with servers.RawServer(behave) as server:
        with fetch.download(server.url(), settings) as spool:
            assert spool.size == 12


def test_a_drip_feed_is_stopped_by_the_total_deadline(settings):
    with servers.RawServer(servers.drips(interval=0.05)) as server:
        started = time.monotonic()
        with pytest.raises(DownloadFailed, match="longer than 1 s"):
            with fetch.download(server.url(), settings.replace(download_timeout=1)):
                pass
        assert time.monotonic() - started < 4


def test_a_reset_mid_body_fails_cleanly(settings):
    with servers.RawServer(servers.resets_mid_body()) as server:
        with pytest.raises(DownloadFailed):
            with fetch.download(server.url(), settings):
                pass


@pytest.mark.parametrize(("status", "says"), [(403, "not public"), (404, "not found"), (500, "busy or failing")])
def test_http_errors_at_the_source_say_what_to_do(audio_host, settings, status, says):
    audio_host.expect_request("/gone").respond_with_data("nope", status=status)
    with pytest.raises(DownloadFailed, match=says):
        with fetch.download(audio_host.url_for("/gone") + "?token=secret", settings):
            pass


def test_error_messages_never_carry_the_query_string(audio_host, settings):
    audio_host.expect_request("/gone").respond_with_data("nope", status=404)
    with pytest.raises(DownloadFailed) as caught:
        with fetch.download(audio_host.url_for("/gone") + "?X-Amz-Signature=s3cr3t", settings):
            pass
    assert "s3cr3t" not in caught.value.message


def test_connection_refused_is_a_download_failure(settings):
    with servers.RawServer(lambda conn, stop: None) as server:
        port = server.port
    with pytest.raises(DownloadFailed, match="connection refused"):
        with fetch.download(f"http://127.0.0.2:{port}/a.wav", settings):
            pass


def test_the_connection_goes_to_the_checked_address_whatever_dns_says_later(audio_host, settings):
    # The resolver says "public"; the pinned adapter must then connect to exactly that address.
    url = serve_file(audio_host, "wav_pcm16_mono.wav").replace("127.0.0.2", "voice.example")
    with fetch.download(url, settings, resolve=lambda host, port: ["127.0.0.2"]) as spool:
        assert spool.size == len(audio_bytes("wav_pcm16_mono.wav"))
    assert audio_host.log[-1][0].headers["Host"].startswith("voice.example")


def test_stale_spools_of_killed_processes_are_swept_and_live_ones_kept(tmp_path):
    stale, live, other = tmp_path / "relay-old.audio", tmp_path / "relay-new.audio", tmp_path / "keep.txt"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert fetch.sweep_stale_spools(3600, str(tmp_path)) == 1
    assert not stale.exists() and live.exists() and other.exists()


def test_a_spool_folder_not_made_yet_has_nothing_to_sweep(tmp_path):
    # RELAY_SPOOL_DIR is made by the first download; the hourly clean-up before it raised every 5 s.
    assert fetch.sweep_stale_spools(3600, str(tmp_path / "not-yet")) == 0


def test_a_body_the_host_compresses_anyway_is_stored_decoded(settings):
    original = bytes(range(256)) * 400

    def gzipped(conn, stop):
        body = gzip.compress(original)
        conn.sendall(servers.headers(Content_Encoding="gzip", Content_Length=str(len(body))) + body)

    with servers.RawServer(gzipped) as server:
        with fetch.download(server.url(), settings) as spool:
            assert Path(spool.path).read_bytes() == original


@pytest.mark.parametrize("compressed", [False, True])
def test_a_wav_is_measured_as_it_arrives_sent_as_is_or_compressed(settings, compressed):
    from relay import convert

    original = audio_bytes("wav_pcm24_stereo.wav")

    def host(conn, stop):
        body = gzip.compress(original) if compressed else original
        extra = {"Content_Encoding": "gzip"} if compressed else {}
        head = servers.headers(Content_Length=str(len(body)), **extra)
        conn.sendall(head + body[:1001])  # pieces that split samples and the header
        time.sleep(0.05)
        conn.sendall(body[1001:])

    meter = convert.LevelMeter()
    with servers.RawServer(host) as server, fetch.download(server.url(), settings, tap=meter.feed) as spool:
        measured = meter.levels(spool.size)
        assert measured is not None and measured == convert.wav_levels(spool.path)
