"""The relay's gunicorn worker: gthread, except that a request is read whole before a thread serves it.

gunicorn's gthread worker hands a connection to a thread as soon as its first bytes arrive, and the
thread then reads the rest of the request: a client that sends its request slowly (a slowloris, or
just a bad mobile link straight to a Docker host) holds a thread all that time, and a few dozen of
them take every thread. Here the worker's event loop reads the request line, headers and body
itself, without blocking, into a bounded buffer; only a complete request goes to a thread, which
then parses it from memory. A request not complete within ``RELAY_REQUEST_READ_TIMEOUT`` seconds
is answered 408 ``request_timeout`` in the relay's one error shape, and the connection is closed.

Requests bigger than the buffer (a head over 64 KiB, a body over ``RELAY_MAX_JSON_BYTES``) go to a
thread as soon as that is known: the app refuses them without reading them. TLS connections (the
relay sits behind the host's TLS-terminating router) keep gthread's own behaviour.
"""

from __future__ import annotations

import json
import re
import selectors
import time
import uuid
from functools import partial

from gunicorn import http
from gunicorn.workers.gthread import ThreadWorker

from . import answers
from .errors import RequestTimeout
from .settings import Settings

HEAD_LIMIT = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:.*chunked", re.IGNORECASE | re.MULTILINE)
_EXPECT = re.compile(rb"^expect[ \t]*:[ \t]*100-continue[ \t]*\r?\n", re.IGNORECASE | re.MULTILINE)
_STOP_GRACE = 2.0  # a stopping worker still takes a request that is arriving, for this long


def request_state(buffer: bytes, body_limit: int) -> str:
    """``"complete"`` when ``buffer`` holds a whole request, ``"oversized"`` when it will not fit
    the buffer (hand it over as it is), else ``"partial"``."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return "oversized" if len(buffer) > HEAD_LIMIT else "partial"
    head, body = buffer[: end + 2], buffer[end + 4 :]
    if _CHUNKED.search(head):
        if len(body) > body_limit + 4096:
            return "oversized"
        # The last chunk and an empty trailer section; a request with trailers waits for its timeout.
        return "complete" if body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n") else "partial"
    match = _CONTENT_LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    if length > body_limit:
        return "oversized"
    return "complete" if len(body) >= length else "partial"


def timeout_response() -> bytes:
    """The 408 answer, in the relay's one JSON error shape."""
    status, answer = answers.failure(RequestTimeout(), answers.blank(uuid.uuid4().hex))
    body = json.dumps(answer, separators=(",", ":")).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {answer['request_id']}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class RelayWorker(ThreadWorker):
    """gunicorn's gthread worker whose event loop reads each request whole before a thread serves it.

    Select it with ``worker_class = "relay.server.RelayWorker"`` (``relay/gunicorn_conf.py`` does).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = Settings.from_env()
        self.read_timeout = settings.request_read_timeout
        self.body_limit = settings.max_json_bytes
        self.reading: dict[object, tuple[bytearray, float]] = {}  # conn -> (bytes so far, deadline)

    def handle_exit(self, sig, frame):
        """SIGTERM: requests waiting for a clone answer now (202 + ``status_url``) instead of being
        cut off when the host's SIGKILL follows; then gunicorn's graceful stop."""
        runtime = getattr(getattr(self, "wsgi", None), "extensions", {}).get("relay.runtime")
        if runtime is not None:
            runtime.stopping.set()
            runtime.notifier.job_changed()  # wake the waiters now, not at their next poll
        super().handle_exit(sig, frame)

    def enqueue_req(self, conn):
        if self.cfg.is_ssl or getattr(conn, "relay_buffered", False):
            conn.relay_buffered = False
            return super().enqueue_req(conn)
        # Bytes a previous request's body drain read ahead (a pipelined request) start the buffer.
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        self.reading[conn] = (bytearray(ahead), time.monotonic() + self.read_timeout)
        conn.sock.setblocking(False)
        # A kept-alive connection is handed here because it is readable, and a new one has often
        # received its request already: read at once, and wait on the poller only for the rest.
        if not self._receive(conn) or self._check(conn):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _receive(self, conn) -> bool:
        """Read what has arrived; False (and the connection dropped) when the client went away."""
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._drop(conn)
            return False
        self.reading[conn][0].extend(data)
        return True

    def _on_readable(self, conn, _sock):
        if self._receive(conn):
            self._check(conn, registered=True)

    def _check(self, conn, registered: bool = False) -> bool:
        """Hand ``conn`` to a thread if its request is complete (or too big to buffer)."""
        buffer = self.reading[conn][0]
        if request_state(bytes(buffer), self.body_limit) == "partial":
            if _EXPECT.search(buffer) and b"\r\n\r\n" in buffer:
                # The client waits for a go-ahead before it sends the body: give it here, once.
                head_end = buffer.find(b"\r\n\r\n") + 2
                head = _EXPECT.sub(b"", bytes(buffer[:head_end]))
                buffer[:head_end] = head
                try:
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            return False
        if registered:
            self.poller.unregister(conn.sock)
        del self.reading[conn]
        if conn.parser is None:
            # What TConn.init would build in the thread (plain HTTP/1.x); the thread then reads
            # the request from this buffer instead of the socket.
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(buffer))
        conn.data_ready = True  # nothing more may arrive on the socket: do not wait for it
        conn.relay_buffered = True
        conn.sock.setblocking(True)
        self.enqueue_req(conn)
        return True

    def _drop(self, conn, answer: bytes | None = None):
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        if answer:
            try:
                conn.sock.send(answer)  # small: fits the socket buffer, or is lost with the client
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, (_buffer, deadline) in list(self.reading.items()):
            if not self.alive and deadline > now + _STOP_GRACE:
                self.reading[conn] = (self.reading[conn][0], now + _STOP_GRACE)
            elif deadline <= now:
                # A connection that never sent a byte is closed quietly (a browser's pre-connect).
                self._drop(conn, timeout_response() if self.reading[conn][0] else None)
