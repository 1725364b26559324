"""Deadlines: one total time limit for an outbound call, however slowly the peer answers.

A socket timeout bounds each wait, not the call: a peer that sends one byte per second never
trips a 2 s read timeout. A :class:`Deadline` bounds the whole call — DNS, connect, TLS, the
request, the headers and the body. Sockets opened while it is current (see :func:`open_socket`)
are shut down by one watchdog thread when it passes, which wakes whatever read or write is
blocked on them; the caller then sees :attr:`Deadline.expired` and reports a timeout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import itertools
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

_local = threading.local()
# Name look-ups run here so a hung resolver costs a pool thread, not the caller's deadline.
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="relay-dns")


class Deadline:
    """A point in time after which every socket of the call is shut down."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self.key = 0  # set by the watchdog
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def adopt(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it already has)."""
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def __enter__(self) -> Deadline:
        stack = _stack()
        stack.append(self)
        _watchdog.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _watchdog.remove(self)
        _stack().remove(self)
        with self._lock:
            self._sockets = []


def current() -> Deadline | None:
    """The innermost deadline of this thread, if any."""
    stack = _stack()
    return stack[-1] if stack else None


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[Deadline]:
    """``with bounded(s) as d:`` — a :class:`Deadline` of ``s`` seconds for the block, or of what
    is left of the deadline around it, when that is sooner (a call inside a walk of several)."""
    outer = current()
    if outer is not None:
        seconds = min(seconds, outer.remaining())
    with Deadline(seconds) as limit:
        yield limit


def resolve(host: str, port: int, limit: Deadline | None = None) -> list[str]:
    """``getaddrinfo`` for TCP, within ``limit`` (or the current deadline); raises ``TimeoutError``."""
    limit = limit or current()
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=None if limit is None else limit.remaining())
    except concurrent.futures.TimeoutError:
        future.cancel()  # still queued: never run it (a caller that gave up must not hold the pool)
        raise TimeoutError(f"resolving {host} took too long") from None
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


def open_socket(address: str, port: int, timeout: float | None, source_address=None) -> socket.socket:
    """Connect to ``(address, port)`` (an address, not a name) within the current deadline, and
    put the socket under it."""
    limit = current()
    if limit is not None:
        left = limit.remaining()
        if left <= 0:
            raise TimeoutError("the deadline passed before connecting")
        timeout = left if timeout is None else min(timeout, left)
    sock = socket.create_connection((address, port), timeout, source_address)
    if limit is not None:
        limit.adopt(sock)
    return sock


def _stack() -> list[Deadline]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS sockets: it wakes a blocked read at once without
    # touching the TLS object another thread is inside.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One thread for every deadline of the process: sleeps until the nearest one passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._live: set[int] = set()
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, limit: Deadline) -> None:
        with self._changed:
            limit.key = next(self._order)
            heapq.heappush(self._heap, (limit.at, limit.key, limit))
            self._live.add(limit.key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="relay-deadlines")
                self._thread.start()
            self._changed.notify()

    def remove(self, limit: Deadline) -> None:
        with self._changed:
            self._live.discard(limit.key)

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait(60)
                    continue
                at, _, limit = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(limit.key)
            limit.expire()


_watchdog = _Watchdog()


@dataclass(frozen=True)
class FileRange:
    """Part of a request body: ``count`` bytes of ``file`` from ``offset``. A connection of
    :class:`DeadlineAdapter` sends it with ``sendfile`` (the kernel copies file to socket; Python
    never holds the bytes), or over TLS, which encrypts in this process, in ``block``-sized reads."""

    file: BinaryIO
    offset: int
    count: int
    block: int = 256 * 1024

    def __len__(self) -> int:  # a non-empty chunk to urllib3
        return self.count

    def send_to(self, sock: socket.socket) -> None:
        """Hand all ``count`` bytes to the kernel, or raise. Returns as soon as the last byte is
        handed over (``socket.sendfile`` would then wait once more for the socket to be writable,
        up to its timeout, and could report a timeout for a body that was in fact sent whole)."""
        if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
            _sendfile(sock, self.file.fileno(), self.offset, self.count)
            return
        position, end, fd = self.offset, self.offset + self.count, self.file.fileno()
        while position < end:
            chunk = os.pread(fd, min(self.block, end - position), position)
            if not chunk:
                raise OSError(f"the file ended at byte {position}")
            sock.sendall(chunk)
            position += len(chunk)


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    timeout = sock.gettimeout()  # a timeout makes the socket non-blocking underneath
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    position, end = offset, offset + count
    while position < end:
        try:
            sent = os.sendfile(sock.fileno(), fd, position, end - position)
        except BlockingIOError:  # the send buffer is full: wait for room, within the timeout
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TimeoutError("timed out sending the body") from None
            continue
        if not sent:
            raise OSError(f"the file ended at byte {position}")
        position += sent


def _send(base):
    """``send`` of a connection class that also takes :class:`FileRange` pieces of a body."""

    def send(conn, data):
        if isinstance(data, FileRange):
            data.send_to(conn.sock)
        else:
            base.send(conn, data)

    return send


class DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connections live under the current :class:`Deadline`: the name
    look-up, the connect, TLS and every read and write.

    ``address``/``port``: connect there whatever the URL says (an address the URL guard checked;
    TLS still verifies the URL's host name). ``blocksize``: how much of a file body each send takes.
    A body that yields :class:`FileRange` pieces is sent from its file without Python copying it.
    ``max_idle``: a kept-alive connection idle longer than this many seconds is not reused.
    """

    def __init__(
        self,
        address: str | None = None,
        port: int | None = None,
        blocksize: int | None = None,
        max_idle: float | None = None,
        **kwargs,
    ):
        self._address, self._port, self._blocksize, self._max_idle = address, port, blocksize, max_idle
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        if self._blocksize:
            kwargs["blocksize"] = self._blocksize
        super().init_poolmanager(*args, **kwargs)
        pinned, pinned_port = self._address, self._port

        def new_conn(conn):
            timeout = conn.timeout if isinstance(conn.timeout, (int, float)) else None
            port = pinned_port or conn.port
            try:
                addresses = [pinned] if pinned else resolve(conn._dns_host, port)
                sock = None
                for number, address in enumerate(addresses):
                    try:
                        sock = open_socket(address, port, timeout, conn.source_address)
                        break
                    except OSError:
                        if number == len(addresses) - 1:
                            raise
            except TimeoutError as err:
                raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from err
            except OSError as err:
                raise NewConnectionError(conn, f"Failed to establish a new connection: {err}") from err
            if sock is None:
                raise NewConnectionError(conn, f"{conn.host} has no addresses")
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            return sock

        max_idle = self._max_idle

        def get_conn(pool, timeout=None):
            conn = HTTPConnectionPool._get_conn(pool, timeout)
            sock = getattr(conn, "sock", None)
            if sock is not None and max_idle is not None and time.monotonic() - conn.relay_idle_since >= max_idle:
                # Idle long enough that the peer may be closing it: a new connection, not a race.
                conn.close()
                sock = None
            limit = current()
            if sock is not None and limit is not None:
                limit.adopt(sock)  # a kept-alive connection goes under the deadline of the call reusing it
            return conn

        def put_conn(pool, conn):
            if conn is not None:
                if max_idle == 0:  # never reused: closed now rather than left open in the pool
                    conn.close()
                conn.relay_idle_since = time.monotonic()
            HTTPConnectionPool._put_conn(pool, conn)

        http_conn = type(
            "DeadlineHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn, "send": _send(HTTPConnection)}
        )
        https_conn = type(
            "DeadlineHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn, "send": _send(HTTPSConnection)}
        )
        self.poolmanager.pool_classes_by_scheme = {
            "http": type(
                "DeadlineHTTPPool",
                (HTTPConnectionPool,),
                {"ConnectionCls": http_conn, "_get_conn": get_conn, "_put_conn": put_conn},
            ),
            "https": type(
                "DeadlineHTTPSPool",
                (HTTPSConnectionPool,),
                {"ConnectionCls": https_conn, "_get_conn": get_conn, "_put_conn": put_conn},
            ),
        }
