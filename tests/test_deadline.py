"""Deadlines: one total time limit per outbound call, also on a kept-alive connection, and a name
look-up that gives up leaves nothing queued behind it."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import requests

from relay import deadline
from relay.errors import UpstreamTimeout
from relay.useapi import Useapi

from . import servers
from .conftest import fast_settings

PAGE = b'{"records": [], "hasNext": false, "cursor": ""}'


def answers_once_then_drips(conn, stop):
    """A first answer on a kept-alive connection, then the second answer one byte at a time."""
    conn.sendall(servers.headers(Content_Type="application/json", Content_Length=str(len(PAGE))) + PAGE)
    conn.recv(65536)  # the second request, on the same connection
    servers.drips_headers(0.2)(conn, stop)


def test_a_reused_connection_is_under_the_deadline_of_the_call_that_reuses_it(tmp_path):
    with servers.RawServer(answers_once_then_drips, host="127.0.0.1") as upstream:
        settings = fast_settings(upstream.url("/v1"), tmp_path, connect_timeout=0.5, read_timeout=1)
        with Useapi(settings, "token") as client:
            assert client.list_voices(None)["records"] == []
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                client.list_voices(None)  # the same socket, dripping: cut at connect + read = 1.5 s
            took = time.monotonic() - started
        assert upstream.connections == 1  # it really was the kept-alive connection
    assert took < 5


def test_a_look_up_that_gave_up_does_not_hold_the_resolver(monkeypatch):
    # Look-ups that time out are cancelled while still queued, so a burst of hopeless names
    # (every pool thread stuck) does not starve the look-ups that come after it.
    slow_started = []

    def slow(host, port, **kwargs):
        slow_started.append(host)
        time.sleep(1.0)
        return socket.getaddrinfo("127.0.0.1", port, **kwargs)

    monkeypatch.setattr(deadline.socket, "getaddrinfo", slow)  # the seam: the system resolver
    for n in range(40):
        with deadline.bounded(0.01), pytest.raises(TimeoutError):
            deadline.resolve(f"slow{n}.example", 80)
    assert len(slow_started) <= 16  # the queued ones were cancelled, never run
    monkeypatch.undo()
    time.sleep(1.2)  # the ones already running finish
    with deadline.bounded(2):
        assert deadline.resolve("localhost", 80)


# --- kept-alive connections to useapi --------------------------------------------------------------


def answers_every_request(received: list[bytes]):
    """A keep-alive useapi stand-in: reads each request whole and answers it, on one connection."""

    def behave(conn, stop):
        data = conn.received
        while not stop.is_set():
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, data = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(data) < length:
                more = conn.recv(1 << 20)
                if not more:
                    return
                data += more
            body, data = data[:length], data[length:]
            received.append(body)
            n = len(received)
            answer = (
                f'{{"result": true, "itemId": "{n}", "clonedVoiceItemId": "user:1-tempolor:x-voice:{n}"}}'.encode()
                if head.startswith(b"POST")
                else PAGE
            )
            conn.sendall(servers.headers(Content_Type="application/json", Content_Length=str(len(answer))) + answer)

    return behave


def test_look_ups_share_a_connection_and_every_upload_gets_a_new_one(tmp_path):
    recording = tmp_path / "voice.wav"
    recording.write_bytes(bytes(range(256)) * 12_289)  # ~3 MiB: several pieces, a partial last one
    received: list[bytes] = []
    with servers.RawServer(answers_every_request(received), host="127.0.0.1") as upstream:
        settings = fast_settings(upstream.url("/v1"), tmp_path)
        for _ in range(3):  # three clones' look-ups, each with its own client, as the workers make them
            with Useapi(settings, "token") as client:
                assert client.list_voices(None)["records"] == []
        assert upstream.connections == 1
        for _ in range(3):
            with Useapi(settings, "token") as client:
                size = recording.stat().st_size
                result = client.upload_voice(str(recording), size, "audio/wav", "Kept", None)
                assert result.status == "ready"
        # A reused connection the peer closes as the body goes out would look like a lost answer.
        assert upstream.connections == 1 + 3
    assert received[3:] == [recording.read_bytes()] * 3


def test_a_connection_idle_longer_than_its_limit_is_not_reused(tmp_path):
    received: list[bytes] = []
    with servers.RawServer(answers_every_request(received), host="127.0.0.1") as upstream:
        with requests.Session() as session:
            session.mount("http://", deadline.DeadlineAdapter(max_idle=0.2))
            assert session.get(upstream.url("/a"), timeout=5).status_code == 200
            assert session.get(upstream.url("/b"), timeout=5).status_code == 200
            assert upstream.connections == 1
            time.sleep(0.3)
            assert session.get(upstream.url("/c"), timeout=5).status_code == 200
            assert upstream.connections == 2


def test_a_piece_handed_whole_to_the_kernel_returns_at_once_even_with_a_full_buffer(tmp_path):
    # A peer that reads slowly: after the last piece, the send buffer is too full to be "writable".
    # socket.sendfile would then wait once more, up to the timeout, and report a timeout for a body
    # that went out whole — an upload then looks incomplete and would be sent again.
    sender, reader = socket.socketpair()
    with sender, reader:
        sender.setblocking(False)
        filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += sender.send(b"x" * 4096)
        drained = 0
        while drained < filled // 5:  # room for a small piece, not enough to be writable again
            drained += len(reader.recv(65536))
        sender.settimeout(1.0)
        piece = tmp_path / "piece"
        piece.write_bytes(b"y" * 4096)
        with open(piece, "rb") as body:
            deadline.FileRange(body, 0, 4096).send_to(sender)  # returns: no TimeoutError
        received = b""
        with contextlib.suppress(BlockingIOError):
            reader.setblocking(False)
            while chunk := reader.recv(1 << 20):
                received += chunk
        assert received.endswith(b"y" * 4096)
