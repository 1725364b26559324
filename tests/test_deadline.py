"""Deadlines: one total time limit per outbound call, also on a kept-alive connection, and a name
look-up that gives up leaves nothing queued behind it."""

from __future__ import annotations

import socket
import time

import pytest

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
