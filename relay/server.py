"""The relay's gunicorn worker: gthread, except that a request is read whole before a thread serves it.

gunicorn's gthread worker hands a connection to a thread as soon as its first bytes arrive, and the
thread then reads the rest of the request: a client that sends its request slowly (a slowloris, or
just a bad mobile link straight to a Docker host) holds a thread all that time, and a few dozen of
them take every thread. Here the worker's event loop reads the request line, headers and body
itself, without blocking, into a bounded buffer; only a complete request goes to a thread, which
then parses it from memory. A request not complete within ``RELAY_REQUEST_READ_TIMEOUT`` seconds
is answered 408 ``request_timeout`` in the relay's one error shape, and the connection is closed.

A body larger than the buffer (``RELAY_MAX_JSON_BYTES``: a recording sent as a file) is written by
the event loop to a temporary file as it arrives, and the request goes to a thread once it is all
there, read from that file: a slow upload holds no thread either. Before a byte of it is written,
the request must show the relay key (else 401 at once) and fit what this process is receiving
(``RELAY_UPLOAD_STORE_BYTES``, else 503); it then has ``RELAY_REQUEST_READ_TIMEOUT`` seconds plus
one second per 64 KiB it declares to arrive (408 after that), and its connection is closed once
it is answered. A head over 64 KiB, or a body declared larger than ``RELAY_MAX_BYTES`` and a form
around it, is answered 413 at once, unread. TLS connections (the relay sits behind the host's
TLS-terminating router) keep gthread's own behaviour.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import resource
import selectors
import socket
import struct
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO
from urllib.parse import urlsplit

from gunicorn import http
from gunicorn.workers.gthread import _DEFER, ThreadWorker

from . import answers
from .errors import (
    InvalidRequest,
    RelayError,
    RelayRestarting,
    RequestTimeout,
    RequestTooLarge,
    Unauthorized,
    UploadStorageFull,
)
from .settings import Settings

HEAD_LIMIT = 64 * 1024
MIN_UPLOAD_RATE = 64 * 1024  # bytes per second a large body is given, beyond RELAY_REQUEST_READ_TIMEOUT
_SPOOL_CHUNK = 256 * 1024
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:.*chunked", re.IGNORECASE | re.MULTILINE)
_EXPECT = re.compile(rb"^expect[ \t]*:[ \t]*100-continue[ \t]*\r?\n", re.IGNORECASE | re.MULTILINE)
_CONNECTION = re.compile(rb"^connection[ \t]*:[^\n]*\n", re.IGNORECASE | re.MULTILINE)
_STOP_GRACE = 2.0  # a stopping worker still takes a request that is arriving, for this long
# Unfinished requests the event loop holds at most, in bytes of buffered heads and JSON bodies and as
# a share of gunicorn's worker_connections (past which it stops accepting connections at all): past
# either, the oldest unfinished one is answered 408 so that complete requests are always taken.
ARRIVAL_BYTES = 32 * 1024 * 1024
ARRIVAL_SHARE = 0.75
# What the kernel does not take of an answer at once is kept here and sent by the event loop, so a
# thread never waits on a client that reads slowly or not at all; beyond these (per connection, per
# process) a thread waits after all, for at most RELAY_REQUEST_READ_TIMEOUT without progress.
KEPT_PER_ANSWER = 4 * 1024 * 1024
KEPT_BYTES = 64 * 1024 * 1024
LINGER = 2.0  # after the last answer, how long a closing connection's late bytes are read and dropped
ACCEPT_PAUSE = 0.5  # out of file descriptors: how long the worker leaves new connections in the kernel's queue
FILES_WANTED = 65536  # the soft open-file limit a worker raises itself to (up to the hard limit)


def request_state(buffer: bytes, body_limit: int, upload_limit: int, chunks: Chunks | None = None) -> str:
    """What ``buffer`` (a request's first bytes) holds: ``"complete"`` a whole request that fits
    the buffer, ``"spool"`` a head whose body is larger than ``body_limit`` (received into a file),
    ``"too_large"`` a head over 64 KiB or a body declared over ``upload_limit``, ``"bad"`` a chunked
    body that is not one, else ``"partial"``. ``chunks``: the framing seen in earlier calls for this
    request (fed only the bytes since), so a body is not parsed again at every read."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return "too_large" if len(buffer) > HEAD_LIMIT else "partial"
    head, body = buffer[: end + 2], buffer[end + 4 :]
    if _CHUNKED.search(head):
        chunks = chunks if chunks is not None else Chunks()
        chunks.feed(body[chunks.fed :])
        if chunks.bad:
            return "bad"
        if chunks.done:
            return "complete"
        return "spool" if len(body) > body_limit + 4096 else "partial"
    length = declared_length(head)
    if length > upload_limit:
        return "too_large"
    if length > body_limit:
        return "spool"
    return "complete" if len(body) >= length else "partial"


def declared_length(head: bytes) -> int:
    """The Content-Length a head declares (0 without one; one past any limit when it has more
    digits than a length can: ``int()`` of thousands of digits would raise in the event loop)."""
    match = _CONTENT_LENGTH.search(head)
    if not match:
        return 0
    digits = match.group(1)
    return int(digits) if len(digits) <= 18 else 10**18


class Chunks:
    """Follows a chunked body's framing as it arrives (size lines with any ``;extension``, data,
    the last chunk and trailer lines, every line ended by CRLF): ``done`` once it has ended,
    ``bad`` once it cannot be a chunked body (answered 400 by the event loop: gunicorn's parser
    would wait for more on a thread). ``fed``: how many body bytes it has seen."""

    LINE_LIMIT = 4096

    def __init__(self) -> None:
        self.state = "size"  # size | data | crlf | trailer
        self.left = 0
        self.line = b""
        self.done = self.bad = False
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        i, end = 0, len(data)
        while i < end and not (self.done or self.bad):
            if self.state == "data":
                taken = min(self.left, end - i)
                self.left -= taken
                i += taken
                if not self.left:
                    self.state = "crlf"
                continue
            newline = data.find(b"\n", i)
            if newline < 0:
                self.line += data[i:]
                self.bad = len(self.line) > self.LINE_LIMIT
                return
            whole, self.line, i = self.line + data[i:newline], b"", newline + 1
            if not whole.endswith(b"\r") or len(whole) > self.LINE_LIMIT:
                self.bad = True  # a bare LF, or a line no chunked body has
                return
            line = whole[:-1]
            if self.state == "crlf":
                self.state, self.bad = "size", bool(line)
            elif self.state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    self.bad = True
                elif int(size, 16):
                    self.left, self.state = int(size, 16), "data"
                else:
                    self.state = "trailer"
            elif not line:  # the empty line after the trailers
                self.done = True


def error_response(err: RelayError, request_id: str | None = None) -> bytes:
    """``err`` as a whole HTTP answer in the relay's one JSON error shape, closing the connection."""
    status, answer = answers.failure(err, answers.blank(request_id or uuid.uuid4().hex))
    body = json.dumps(answer, separators=(",", ":")).encode("utf-8")
    retry = f"Retry-After: {err.retry_after}\r\n" if getattr(err, "retry_after", None) else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {answer['request_id']}\r\n{retry}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


access_log = logging.getLogger("relay.access")


def _log_refusal(arrival: _Arrival | None, refusal: RelayError, request_id: str) -> None:
    """The access line of an answer the event loop gave (the app's lines have the same fields)."""
    line = (arrival.line or bytes(arrival.buffer[:HEAD_LIMIT]).split(b"\r\n", 1)[0]) if arrival else b""
    parts = line.decode("latin-1", "replace").split(" ")
    method = parts[0][:16] if parts and parts[0] else "-"
    target = parts[1] if len(parts) > 1 else "-"
    try:
        path = urlsplit(target).path or "-"
    except ValueError:  # not a URL at all ("http://[/"): what comes before any query
        path = target.split("?", 1)[0]
    path = path.split("?", 1)[0][:512]  # no query: it may carry secrets
    fields = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": refusal.http_status,
        "duration_ms": round((time.monotonic() - arrival.started) * 1000, 1) if arrival else None,
        "error_code": refusal.error_code,
        "received_by": "event loop",
    }
    access_log.info("%s %s %s", method, path, refusal.http_status, extra={"fields": fields})


_CROWDED = (
    "The relay was holding too many unfinished requests, and this one was the oldest: send the whole "
    "request in one go, then retry."
)


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    408: "Request Timeout",
    413: "Content Too Large",
    503: "Service Unavailable",
}


def _malformed() -> RelayError:
    return InvalidRequest(
        "The request's chunked body is malformed (each line must end in CRLF; sizes are hexadecimal). "
        "Send it with a Content-Length, or as a well-formed chunked body."
    )


def _parse_refusal(exc: BaseException) -> RelayError | None:
    """The relay's answer to a request gunicorn's parser refused, or None for gunicorn's own."""
    errors = http.errors
    if isinstance(exc, errors.LimitRequestLine):
        return InvalidRequest(
            f"The request line is too long ({exc}): the URL with its query string may be at most 4094 bytes. "
            "Send long fields (metadata, a long name) in a JSON or multipart body instead of the query string."
        )
    if isinstance(exc, errors.LimitRequestHeaders):
        return InvalidRequest(
            f"The request's headers are too large ({exc}): each may be at most 8190 bytes, and 100 of them in "
            "all. Check what the tool maps into headers (an Idempotency-Key is at most 255 characters)."
        )
    parse_errors = (
        errors.InvalidRequestLine,
        errors.InvalidRequestMethod,
        errors.InvalidHTTPVersion,
        errors.InvalidHeader,
        errors.InvalidHeaderName,
        errors.ObsoleteFolding,
        errors.InvalidChunkSize,
        errors.ChunkMissingTerminator,
    )
    if isinstance(exc, parse_errors):
        return InvalidRequest(f"The request is not well-formed HTTP/1.1 ({type(exc).__name__}: {exc}).")
    return None


def _disk_full(err: OSError) -> RelayError:
    where = (
        "as it has no file left to open (too many connections and uploads at once)"
        if err.errno in (errno.EMFILE, errno.ENFILE)
        else f"on its temporary disk ({err.strerror or err})"
    )
    return UploadStorageFull(
        f"The relay could not keep the file {where}. Retry in a few seconds, or send a link (audio_url) instead.",
        retry_after=10,
    )


def _header(head: bytes, name: bytes) -> str:
    match = re.search(rb"^" + name + rb"[ \t]*:[ \t]*([^\r\n]*)", head, re.IGNORECASE | re.MULTILINE)
    return match.group(1).strip().decode("latin-1") if match else ""


@dataclass(eq=False)
class _Arrival:
    """A request being received by the event loop: in ``buffer``, or, once its body is known to be
    large, in ``spool`` (head and body as they came, the head rewritten to close the connection)."""

    buffer: bytearray
    deadline: float
    counted: int = 0  # bytes of ``buffer`` counted in the worker's ``buffered``
    spool: BinaryIO | None = None
    left: int | None = None  # body bytes still to come; None for a chunked body
    chunks: Chunks | None = None  # a spooled chunked body's framing, followed to its end
    framing: Chunks = field(default_factory=Chunks)  # a chunked body's framing while in the buffer
    received: int = 0  # body bytes spooled
    charged: int = 0  # bytes counted against what this process receives at once
    waits_to_send: bool = False  # the client sent "Expect: 100-continue" and waits for the go-ahead
    line: bytes = b""  # the request line, once the body went to the spool (for the access log)
    started: float = field(default_factory=time.monotonic)

    def whole(self) -> bool:
        if self.left is not None:
            return self.left <= 0
        return self.chunks is not None and self.chunks.done


def _spooled(spool: BinaryIO):
    """The spooled request, chunk by chunk, for gunicorn's parser; the file goes when it is read
    or dropped."""
    with spool:
        spool.seek(0)
        while chunk := spool.read(_SPOOL_CHUNK):
            yield chunk


class _Answering:
    """A connection's socket as the thread serving it writes the answer: what the kernel takes at
    once is sent, the rest is kept for the event loop to send (:meth:`RelayWorker.finish_request`),
    and the thread goes back to the pool. A client that reads its answer slowly, or never, costs
    memory within ``KEPT_PER_ANSWER``/``KEPT_BYTES``, never a thread. Anything else is the socket's."""

    def __init__(self, sock: socket.socket, worker: RelayWorker):
        self._sock = sock
        self._worker = worker
        self.pending = bytearray()

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def fileno(self) -> int:
        return self._sock.fileno()

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        if not self.pending:
            sent = 0
            try:
                while sent < len(view):
                    sent += self._sock.send(view[sent:], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
            view = view[sent:]
            if not view:
                return
        if len(self.pending) + len(view) <= KEPT_PER_ANSWER and self._worker.keep(len(view)):
            self.pending += view
            return
        # Over what may be kept: wait for the reader (bounded by the socket's send timeout).
        if self.pending:
            self._sock.sendall(self.pending)
            self._worker.unkeep(len(self.pending))
            self.pending = bytearray()
        self._sock.sendall(view)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        """Small files (the pages' assets) go the same way as any answer."""
        file.seek(offset)
        data = file.read(count) if count else file.read()
        self.sendall(data)
        return len(data)

    def send_rest(self) -> bool:
        """From the event loop: send what the kernel takes now; True once nothing is left."""
        try:
            while self.pending:
                sent = self._sock.send(self.pending, socket.MSG_DONTWAIT)
                del self.pending[:sent]
                self._worker.unkeep(sent)
        except (BlockingIOError, InterruptedError):
            pass
        return not self.pending

    def drop(self) -> None:
        self._worker.unkeep(len(self.pending))
        self.pending = bytearray()


class RelayWorker(ThreadWorker):
    """gunicorn's gthread worker whose event loop reads each request whole before a thread serves it.

    Select it with ``worker_class = "relay.server.RelayWorker"`` (``relay/gunicorn_conf.py`` does).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings = Settings.from_env()
        self.read_timeout = settings.request_read_timeout
        self.body_limit = settings.max_json_bytes
        self.upload_limit = settings.upload_request_limit
        self.reading: dict[object, _Arrival] = {}  # in arrival order: the first is the oldest
        self.receiving = 0  # bytes of large bodies this process is receiving, as they declare
        self.buffered = 0  # bytes of unfinished heads and JSON bodies held in buffers
        self.kept = 0  # bytes of answers kept for the event loop to send (see _Answering)
        self._kept_lock = threading.Lock()
        self.closing: dict[object, float] = {}  # connections finishing an answer, then closing: their deadlines
        self.arrival_limit = max(16, int((self.cfg.worker_connections - self.cfg.threads) * ARRIVAL_SHARE))

    def init_process(self):
        """Raise the soft open-file limit to the hard one (1024 is a common soft limit, for systemd
        services and containers): every connection and every upload being received takes a file."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            wanted = FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, FILES_WANTED)
            if soft != resource.RLIM_INFINITY and soft < wanted:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # as it was: the worker still pauses accepting when files run out
        self._accept_paused_until = 0.0
        super().init_process()

    def accept(self, listener):
        """gthread's accept, except that running out of file descriptors pauses accepting for a
        moment (the kernel keeps new connections waiting) instead of raising out of the event loop,
        which ended the worker and every request it served."""
        try:
            super().accept(listener)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.log.warning("out of file descriptors (%s): accepting paused for %g s", err.strerror, ACCEPT_PAUSE)
            self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled):
        if enabled and time.monotonic() < getattr(self, "_accept_paused_until", 0.0):
            return  # the loop asks again at its next round
        super().set_accept_enabled(enabled)

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
        self.reading[conn] = arrival = _Arrival(bytearray(ahead), time.monotonic() + self.read_timeout)
        self._count(arrival, len(ahead))
        conn.sock.setblocking(False)
        # A kept-alive connection is handed here because it is readable, and a new one has often
        # received its request already: read at once, and wait on the poller only for the rest.
        try:
            if not self._receive(conn) or self._check(conn):
                return
        except Exception:  # noqa: BLE001 - as in _on_readable
            self.log.exception("reading a request failed; its connection is closed")
            if conn in self.reading:
                self._drop(conn)
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._shed(keep=conn)

    def on_client_socket_readable(self, conn, client):
        if conn not in self.keepalived_conns:  # closed by _make_room meanwhile (defensive)
            return
        super().on_client_socket_readable(conn, client)

    def _make_room(self) -> None:
        """Near ``worker_connections`` (where gthread stops accepting), close the oldest idle kept-alive
        connections, then the oldest still being answered to clients that do not read: a new request
        matters more than either. Unfinished requests are shed by :meth:`_shed`. Called between
        rounds of events only (:meth:`murder_pending`): a connection closed here has no event left
        to handle in the round being dispatched."""
        spare = max(8, self.worker_connections // 20)
        while self.nr_conns > self.worker_connections - spare and self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            conn.close()
        for conn in list(self.closing):
            if self.nr_conns <= self.worker_connections - spare:
                break
            self._closed(conn)

    def _count(self, arrival: _Arrival, more: int) -> None:
        arrival.counted += more
        self.buffered += more

    def _uncount(self, arrival: _Arrival) -> None:
        self.buffered -= arrival.counted
        arrival.counted = 0

    def _shed(self, keep) -> None:
        """Answer the oldest unfinished requests 408 while more are held than the event loop allows
        (``ARRIVAL_SHARE`` of the connections, ``ARRIVAL_BYTES`` of buffers): one client opening a
        thousand connections and sending a byte now and then must not stop the worker accepting.
        Files being received are bounded by ``RELAY_UPLOAD_STORE_BYTES`` instead, and kept."""
        if len(self.reading) <= self.arrival_limit and self.buffered <= ARRIVAL_BYTES:
            return
        for conn, arrival in list(self.reading.items()):
            if len(self.reading) <= self.arrival_limit and self.buffered <= ARRIVAL_BYTES:
                return
            if conn is keep or arrival.spool is not None:
                continue
            self._drop(conn, RequestTimeout(_CROWDED) if arrival.buffer else None)

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
        arrival = self.reading[conn]
        if arrival.spool is None:
            arrival.buffer.extend(data)
            self._count(arrival, len(data))
            if self.buffered > ARRIVAL_BYTES:
                self._shed(keep=conn)
            return True
        refusal = self._spool(arrival, data)
        if refusal is not None:
            self._drop(conn, refusal)
            return False
        return True

    def _spool(self, arrival: _Arrival, data: bytes) -> RelayError | None:
        """Write ``data`` to the arrival's file; the refusal to answer when it cannot be taken."""
        assert arrival.spool is not None
        if arrival.chunks is not None:  # a chunked body is counted as it comes
            refusal = self._over_budget(len(data))
            if refusal is not None:
                return refusal
            arrival.charged += len(data)
            self.receiving += len(data)
            # What the buffer's look already followed is not fed again.
            arrival.chunks.feed(data[max(arrival.chunks.fed - arrival.received, 0) :])
            if arrival.chunks.bad:
                return _malformed()
        try:
            arrival.spool.write(data)
        except OSError as err:
            return _disk_full(err)
        arrival.received += len(data)
        if arrival.left is not None:
            arrival.left -= len(data)
        return None

    def _over_budget(self, more: int) -> RelayError | None:
        budget = self.settings.upload_store_bytes
        if self.receiving + more <= budget:
            return None
        return UploadStorageFull(
            f"The relay is receiving {self.receiving / 1048576:.0f} MiB of files at once, and RELAY_UPLOAD_STORE_BYTES "
            f"allows {budget / 1048576:.0f} MiB. Retry in a few seconds, or send a link (audio_url) instead.",
            retry_after=10,
        )

    def _on_readable(self, conn, _sock):
        if conn not in self.reading:  # dropped (shed) earlier in the same round of events
            return
        try:
            if self._receive(conn):
                self._check(conn, registered=True)
        except Exception:  # noqa: BLE001 - one connection must never take the event loop (and the worker) down
            self.log.exception("reading a request failed; its connection is closed")
            if conn in self.reading:
                self._drop(conn)

    def _check(self, conn, registered: bool = False) -> bool:
        """Hand ``conn`` to a thread if its request is complete; answer it if it cannot be taken.
        True when ``conn`` left the event loop's hands."""
        arrival = self.reading[conn]
        if arrival.spool is not None:
            if arrival.left is None and arrival.received > self.upload_limit + 4096 and not arrival.whole():
                self._drop(conn, RequestTooLarge(self._too_large()))
                return True
            if not arrival.whole():
                return False
            if registered:
                self.poller.unregister(conn.sock)
            self._release(conn)
            conn.parser = http.get_parser(self.cfg, _spooled(arrival.spool), conn.client)
            self._hand_over(conn)
            return True
        buffer = arrival.buffer
        state = request_state(bytes(buffer), self.body_limit, self.upload_limit, arrival.framing)
        if state == "bad":
            self._drop(conn, _malformed())
            return True
        if state == "too_large":
            self._drop(conn, RequestTooLarge(self._too_large(buffer)))
            return True
        if state == "spool":
            refusal = self._start_spool(arrival)
            if refusal is not None:
                self._drop(conn, refusal)
                return True
            if arrival.waits_to_send:
                self._continue(conn)
            return self._check(conn, registered)
        if state == "partial":
            if _EXPECT.search(buffer) and b"\r\n\r\n" in buffer:
                # The client waits for a go-ahead before it sends the body: give it here, once.
                head_end = buffer.find(b"\r\n\r\n") + 2
                head = _EXPECT.sub(b"", bytes(buffer[:head_end]))
                buffer[:head_end] = head
                self._continue(conn)
            return False
        if registered:
            self.poller.unregister(conn.sock)
        self._uncount(self.reading.pop(conn))
        if conn.parser is None:
            # What TConn.init would build in the thread (plain HTTP/1.x); the thread then reads
            # the request from this buffer instead of the socket.
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(buffer))
        self._hand_over(conn)
        return True

    @staticmethod
    def _continue(conn) -> None:
        """The go-ahead for a client that waits for it before it sends its body."""
        try:
            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            pass

    def _hand_over(self, conn) -> None:
        conn.data_ready = True  # nothing more may arrive on the socket: do not wait for it
        conn.relay_buffered = True
        conn.sock.setblocking(True)
        if not isinstance(conn.sock, _Answering):
            # A thread that must wait for its reader after all (an answer over what may be kept)
            # gives up after this long without progress: the kernel's send timeout, as gthread
            # makes the socket blocking again.
            seconds = self.read_timeout
            conn.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            )
            conn.sock = _Answering(conn.sock, self)
        self.enqueue_req(conn)

    def keep(self, size: int) -> bool:
        """Count ``size`` bytes of an answer as kept, if the process's budget has room (any thread)."""
        with self._kept_lock:
            if self.kept + size > KEPT_BYTES:
                return False
            self.kept += size
            return True

    def unkeep(self, size: int) -> None:
        with self._kept_lock:
            self.kept -= size

    def finish_request(self, conn, fs):
        """After a thread served ``conn``: an answer not yet all sent is sent from here, and a
        connection to close is closed from here without waiting on its client (gthread's own
        graceful close would wait up to 2 s for the client, in the event loop, for every one)."""
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:  # noqa: BLE001 - the thread's failure was logged there; close as gthread does
            result = False
        if isinstance(conn.sock, _Answering) and conn.sock.pending:
            conn.relay_keep = bool(result) and result is not _DEFER
            self._close_later(conn)
            return
        if not result and not self.cfg.is_ssl:
            self._close_later(conn)
            return
        super().finish_request(conn, fs)

    def _close_later(self, conn) -> None:
        """Send what is left of the answer, then close the connection the graceful way (RFC 9112
        section 9.6: end our side, read and drop what the client still sends, then close), all by
        the event loop; the answer has ``RELAY_REQUEST_READ_TIMEOUT`` without progress, the rest
        ``LINGER`` seconds."""
        try:
            conn.sock.setblocking(False)
        except OSError:
            self._closed(conn)
            return
        out = conn.sock if isinstance(conn.sock, _Answering) else None
        if out is not None and out.pending:
            self.closing[conn] = time.monotonic() + self.read_timeout
            self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._on_writable, conn))
        else:
            self._linger(conn)

    def _on_writable(self, conn, _sock) -> None:
        if conn not in self.closing:  # closed earlier in the same round of events
            return
        out = conn.sock
        try:
            before = len(out.pending)
            done = out.send_rest()
        except OSError:  # the client went away
            self._closed(conn)
            return
        if done:
            self.poller.unregister(conn.sock)
            if getattr(conn, "relay_keep", False) and self.alive:
                # The answer announced keep-alive: the connection goes on as gthread keeps it (a
                # pipelined request already read is served at once).
                conn.relay_keep = False
                self.closing.pop(conn, None)
                if conn.parser.unreader.buf.getvalue():
                    self.enqueue_req(conn)
                    return
                conn.set_timeout()
                self.keepalived_conns.append(conn)
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
                return
            self._linger(conn)
        elif len(out.pending) < before:
            self.closing[conn] = time.monotonic() + self.read_timeout

    def _linger(self, conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._closed(conn)
            return
        self.closing[conn] = time.monotonic() + LINGER
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering, conn))

    def _on_lingering(self, conn, _sock) -> None:
        if conn not in self.closing:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed its side too
            self._closed(conn)

    def _closed(self, conn) -> None:
        self.closing.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        if isinstance(conn.sock, _Answering):
            conn.sock.drop()
        self.nr_conns -= 1
        conn.close()

    def handle_error(self, req, client, addr, exc):
        """A request gunicorn's parser refused (a request line or headers over its limits, broken
        HTTP) is answered in the relay's JSON shape with ``invalid_request``, saying what to change,
        instead of gunicorn's HTML page; anything else is gunicorn's to answer."""
        refusal = _parse_refusal(exc)
        if refusal is None:
            return super().handle_error(req, client, addr, exc)
        request_id = uuid.uuid4().hex
        self.log.info("refused a request gunicorn could not parse: %s", type(exc).__name__)
        _log_refusal(None, refusal, request_id)
        try:
            client.sendall(error_response(refusal, request_id))
        except OSError:
            pass
        return None

    def handle_request(self, req, conn):
        try:
            return super().handle_request(req, conn)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            # The send timeout passed: the client took no byte of its answer for that long.
            self.log.info("closed a connection whose client took no byte of its answer in %g s", self.read_timeout)
            return False

    def _start_spool(self, arrival: _Arrival) -> RelayError | None:
        """Receive the rest of a large body into a file; or the refusal to answer instead."""
        buffer = arrival.buffer
        end = buffer.find(b"\r\n\r\n") + 4
        head, body = bytes(buffer[:end]), bytes(buffer[end:])
        if not self.settings.accepts_key(_header(head, b"x-relay-key"), _header(head, b"authorization")):
            return Unauthorized()
        chunked = _CHUNKED.search(head) is not None
        length = None if chunked else declared_length(head)
        budget = self.settings.upload_store_bytes
        if length is not None and length > budget:  # it could never be taken: waiting would not help
            return RequestTooLarge(
                f"The file is {length / 1048576:.1f} MiB; this relay receives at most {budget / 1048576:.1f} MiB "
                "of files at once (RELAY_UPLOAD_STORE_BYTES). Send a link (audio_url) instead."
            )
        refusal = self._over_budget(length or 0)
        if refusal is not None:
            return refusal
        expects = _EXPECT.search(head) is not None
        # The thread reads this request from the file and closes the connection after answering it.
        head = _CONNECTION.sub(b"", _EXPECT.sub(b"", head))
        head = head[:-2] + b"Connection: close\r\n\r\n"
        try:
            arrival.spool = tempfile.TemporaryFile(prefix="relay-request-")
            arrival.spool.write(head)
        except OSError as err:
            if arrival.spool is not None:
                arrival.spool.close()
                arrival.spool = None
            return _disk_full(err)
        # A declared length is counted at once; a chunked body as its bytes arrive.
        arrival.line = head.split(b"\r\n", 1)[0]
        self._uncount(arrival)
        arrival.left, arrival.charged, arrival.buffer = length, length or 0, bytearray()
        arrival.chunks = arrival.framing if chunked else None
        self.receiving += arrival.charged
        arrival.deadline = time.monotonic() + self.read_timeout + (length or self.upload_limit) / MIN_UPLOAD_RATE
        refusal = self._spool(arrival, body)
        if refusal is not None:
            return refusal
        arrival.waits_to_send = expects and not arrival.received
        return None

    def _release(self, conn) -> None:
        arrival = self.reading.pop(conn, None)
        if arrival is not None:
            self.receiving -= arrival.charged
            arrival.charged = 0
            self._uncount(arrival)

    def _too_large(self, buffer: bytes | None = None) -> str:
        if buffer is not None and buffer.find(b"\r\n\r\n") < 0:
            return f"The request's line and headers are over {HEAD_LIMIT // 1024} KiB."
        return (
            f"The request body is over {self.upload_limit / 1048576:.1f} MiB: a recording of up to RELAY_MAX_BYTES "
            f"({self.settings.max_bytes / 1048576:.1f} MiB) and a form around it. Send a smaller recording."
        )

    def _drop(self, conn, refusal: RelayError | None = None):
        """Close a connection whose request no thread will serve, answering ``refusal`` if given
        (and logging it as the app logs every answer: one ``relay.access`` line)."""
        arrival = self.reading.get(conn)
        self._release(conn)
        if arrival is not None and arrival.spool is not None:
            arrival.spool.close()
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            if refusal is not None:
                request_id = uuid.uuid4().hex
                try:
                    conn.sock.send(error_response(refusal, request_id))  # small: fits the socket buffer
                except OSError:
                    pass
                try:
                    _log_refusal(arrival, refusal, request_id)
                except Exception:  # noqa: BLE001 - a log line must never cost the connection count
                    self.log.exception("logging a refused request failed")
        finally:
            self.nr_conns -= 1
            conn.close()

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.closing.items()):
            if deadline <= now:
                self._closed(conn)
        self._make_room()
        for conn, arrival in list(self.reading.items()):
            try:
                if not self.alive and arrival.deadline > now + _STOP_GRACE:
                    arrival.deadline = now + _STOP_GRACE
                elif arrival.deadline <= now:
                    # A connection that never sent a byte is closed quietly (a browser's pre-connect).
                    if not arrival.buffer and arrival.spool is None:
                        self._drop(conn)
                    elif not self.alive:  # the process stops (a deploy, a restart): not the caller's fault
                        self._drop(conn, RelayRestarting(retry_after=10))
                    else:
                        self._drop(conn, RequestTimeout())
            except Exception:  # noqa: BLE001 - as in _on_readable: one connection never takes the loop down
                self.log.exception("closing a timed-out request failed")
                if conn in self.reading:
                    self._drop(conn)
