"""Hostile inputs: generated requests against the documented API, random and mutated audio bytes, and
URL variants aimed at forbidden addresses. Bounded and derandomized, so the suite stays fast and
repeatable."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from mutagen.flac import FLAC
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4
from mutagen.wave import WAVE
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from relay import audio, urlguard
from relay.errors import RelayError
from relay.openapi import build_spec

from .conftest import AUDIO, RELAY_KEY, TOKEN, over_http, serve_file

BOUNDED = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# --- the API against its own document ---------------------------------------------------------


@pytest.fixture
def live_relay(make_app, job_settings):
    with over_http(make_app(job_settings.replace(max_wait_seconds=0.5, default_wait_seconds=0.2))) as base:
        yield base


def _keep_on_loopback(body, audio_url: str, callback_url: str):
    """Generated URLs would point anywhere on the internet: aim them at this machine's test hosts."""
    if isinstance(body, dict):
        if isinstance(body.get("audio_url"), str):
            body["audio_url"] = audio_url
        if isinstance(body.get("callback_url"), str):
            body["callback_url"] = callback_url
    return body


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_generated_requests_never_get_a_5xx_and_answers_match_the_document(
    live_relay, fake, audio_host, receiver, mode
):
    receiver.expect_request("/hook").respond_with_data("", status=204)
    audio_url = serve_file(audio_host, "wav_pcm16_mono.wav", path="/voice.wav")
    callback_url = receiver.url_for("/hook")
    schema = schemathesis.openapi.from_dict(build_spec())
    headers = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}
    seen = 0
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @BOUNDED
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case):
            case.body = _keep_on_loopback(case.body, audio_url, callback_url)
            response = case.call(base_url=live_relay, headers=headers, timeout=20)
            statuses.append(response.status_code)
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            exercise()
        except Unsatisfiable:
            # Nothing to make invalid in an operation without inputs (GET /healthz).
            assert mode is GenerationMode.NEGATIVE and not operation.path_parameters and not operation.query
            continue
        seen += 1
    assert seen >= (8 if mode is GenerationMode.POSITIVE else 5)  # the documented operations were exercised
    assert len(statuses) >= 10 * seen
    assert any(400 <= s < 500 for s in statuses)  # invalid input was generated, and refused
    if mode is GenerationMode.POSITIVE:
        assert any(s in (200, 202) for s in statuses)


# --- audio: random and mutated bytes ------------------------------------------------------------

_READERS = {"wav": WAVE, "mp3": MP3, "flac": FLAC, "m4a": MP4}
_FIXTURES = [p for p in sorted(AUDIO.iterdir()) if p.suffix in (".wav", ".mp3", ".flac", ".m4a", ".mp4")]


def _accepted_only_if_mutagen_reads_it(path: Path) -> None:
    try:
        info = audio.probe(str(path))
    except RelayError:
        return  # refused cleanly, with a documented error_code
    reader = _READERS[info.format](str(path))  # must not raise
    assert reader.info.length > 0
    assert info.duration_seconds > 0


@BOUNDED
@given(data=st.binary(min_size=0, max_size=4096))
def test_random_bytes_never_crash_the_sniffer_or_pass_as_audio(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("random") / "blob"
    path.write_bytes(data)
    _accepted_only_if_mutagen_reads_it(path)


@settings(BOUNDED, max_examples=60)
@given(
    fixture=st.sampled_from(_FIXTURES),
    cut=st.floats(min_value=0.0, max_value=1.0),
    flips=st.lists(st.tuples(st.floats(min_value=0.0, max_value=0.999), st.integers(0, 255)), max_size=8),
    prefix=st.binary(max_size=64),
)
def test_mutated_real_audio_is_refused_cleanly_or_really_readable(tmp_path_factory, fixture, cut, flips, prefix):
    data = bytearray(fixture.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    data = prefix + bytes(data[: max(1, int(cut * len(data)))])
    path = tmp_path_factory.mktemp("mutated") / fixture.name
    path.write_bytes(data)
    _accepted_only_if_mutagen_reads_it(path)


# --- URLs: variants of forbidden addresses ----------------------------------------------------

_FORBIDDEN_HOSTS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0",
    "localhost",
    "169.254.169.254",
    "10.0.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::]",
    "[fe80::1]",
    "0.0.0.0",
    "255.255.255.255",
]


def _variant(host: str, draw) -> str:
    if draw(st.booleans()):
        host = host.upper()
    if draw(st.booleans()) and not host.startswith("["):
        host += "."
    if draw(st.booleans()) and not host.startswith("["):
        # full-width digits and dots: IDNA maps them back to ASCII
        host = host.translate({ord(c): 0xFEE0 + ord(c) for c in "0123456789"}).replace(".", "\u3002")
    return host


@BOUNDED
@given(data=st.data())
def test_url_variants_never_resolve_to_a_forbidden_address(data):
    host = _variant(data.draw(st.sampled_from(_FORBIDDEN_HOSTS)), data.draw)
    scheme = data.draw(st.sampled_from(["http", "https", "HTTP", "hTtPs"]))
    port = data.draw(st.sampled_from(["", ":80", ":8080", ":65535", ":0"]))
    userinfo = data.draw(st.sampled_from(["", "user@", "a:b@", "%40@"]))
    path = data.draw(st.sampled_from(["/", "/a.wav", "/%2e%2e/x", "?x=1", "#f"]))
    url = f"{scheme}://{userinfo}{host}{port}{path}"
    try:
        target = urlguard.check(url)
    except RelayError:
        return
    # Whatever got through must be an address the guard allows.
    assert urlguard.is_allowed(ipaddress.ip_address(target.address)), (url, target)
