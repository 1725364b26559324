"""A raw TCP server for the misbehaving peers pytest-httpserver cannot imitate.

Each connection is handed to ``behave(sock)`` in a thread; the server listens on loopback only
and stops when the test ends.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time


class RawServer:
    def __init__(self, behave, host: str = "127.0.0.2"):
        self.behave = behave
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()[:2]
        self.connections = 0
        self.requests: list[bytes] = []  # the start of each request received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(5)
            received = conn.recv(65536)  # the request's start; most behaviours ignore it
            self.requests.append(received)
            self.behave(_Conn(conn, received), self._stop)


class _Conn:
    """The accepted socket, with what was read of the request so far as ``received``."""

    def __init__(self, sock: socket.socket, received: bytes):
        self._sock, self.received = sock, received

    def __getattr__(self, name):
        return getattr(self._sock, name)


def headers(status: str = "200 OK", **fields: str) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k.replace('_', '-')}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def lies_about_length(declared: int, actual: int):
    """Declares a small Content-Length but keeps sending (or sends less than declared)."""

    def behave(conn, stop):
        conn.sendall(headers(Content_Length=str(declared), Connection="close"))
        sent = 0
        while sent < actual and not stop.is_set():
            chunk = b"\0" * min(65536, actual - sent)
            conn.sendall(chunk)
            sent += len(chunk)

    return behave


def chunked_forever(chunk: bytes = b"\0" * 65536, limit: int = 200 * 1024 * 1024):
    """A chunked body with no Content-Length that goes on (bounded) past any sane limit."""

    def behave(conn, stop):
        conn.sendall(headers(Transfer_Encoding="chunked"))
        sent = 0
        while sent < limit and not stop.is_set():
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)

    return behave


def drips(interval: float, total: int = 1000):
    """Sends one byte every ``interval`` seconds: each read succeeds, the whole never arrives."""

    def behave(conn, stop):
        conn.sendall(headers(Content_Length=str(total)))
        for _ in range(total):
            if stop.wait(interval):
                return
            conn.sendall(b"\0")

    return behave


def resets_mid_body(sent: int = 10000, declared: int = 100000):
    """Sends part of the body, then resets the connection (RST, not a clean close)."""

    def behave(conn, stop):
        conn.sendall(headers(Content_Length=str(declared)))
        conn.sendall(b"\0" * sent)
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return behave


def pauses(body: bytes, first: int, seconds: float):
    """Declares and sends ``body``'s first ``first`` bytes, waits ``seconds`` (less if the server
    stops), then sends the rest."""

    def behave(conn, stop):
        conn.sendall(headers(Content_Length=str(len(body))))
        conn.sendall(body[:first])
        if not stop.wait(seconds):
            conn.sendall(body[first:])

    return behave


def in_pieces(body: bytes, pieces: int, interval: float, reset_after: int | None = None, sent_at: list | None = None):
    """Sends ``body`` (its full length declared) in ``pieces`` parts ``interval`` s apart; with
    ``reset_after``, resets the connection once that many bytes went out. ``sent_at`` gets the
    time.time() at which the last byte was sent."""

    def behave(conn, stop):
        conn.sendall(headers(Content_Length=str(len(body)), Connection="close"))
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            if start:
                time.sleep(interval)
            if stop.is_set():
                return
            if reset_after is not None and start >= reset_after:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(body[start : start + size])
        if sent_at is not None:
            sent_at.append(time.time())

    return behave


def redirects_to(location_for):
    """Answers every request with a 302 to ``location_for(n)`` (n = connection count)."""
    counter = {"n": 0}

    def behave(conn, stop):
        counter["n"] += 1
        conn.sendall(headers("302 Found", Location=location_for(counter["n"]), Content_Length="0", Connection="close"))

    return behave


def drips_headers(interval: float, total: int = 10000):
    """Starts an answer, then sends its header one byte every ``interval`` seconds: no read ever
    waits long, and the headers never end."""

    def behave(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(total):
            if stop.wait(interval):
                return
            conn.sendall(b"X")

    return behave


def takes_body_then_resets():
    """Reads the whole request body (by its Content-Length), then resets the connection: the
    request arrived, its answer is lost."""

    def behave(conn, stop):
        data = conn.received
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length and not stop.is_set():
            more = conn.recv(65536)
            if not more:
                return
            body += more
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return behave


def forwards_to(address: tuple[str, int], cut: threading.Event):
    """A TCP forwarder to ``address`` (a database, say) whose connections all drop once ``cut`` is
    set; a connection made after that is closed at once, as by a server that went away."""

    def behave(conn, stop):
        if cut.is_set():
            return
        with socket.create_connection(address, timeout=5) as upstream:
            upstream.sendall(conn.received)
            while not (stop.is_set() or cut.is_set()):
                readable, _, _ = select.select([conn, upstream], [], [], 0.05)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is conn else conn).sendall(data)

    return behave


def pooler_in_front_of(address: tuple[str, int]):
    """A forwarder to PostgreSQL that, like PgBouncer and Neon's pooler, refuses a client whose
    startup packet carries the ``options`` parameter (FATAL 08P01), and forwards any other."""

    def behave(conn, stop):
        with socket.create_connection(address, timeout=5) as upstream:
            first, starting = conn.received, 2  # an SSLRequest may come before the startup packet
            while not stop.is_set():
                if first is not None:
                    readable, data = [conn], first
                    first = None
                else:
                    readable, _, _ = select.select([conn, upstream], [], [], 0.05)
                    data = b""
                for source in readable:
                    data = data or source.recv(65536)
                    if not data:
                        return
                    if source is conn and starting:
                        starting -= 1
                        if b"options\x00" in data:
                            said = b"SFATAL\x00C08P01\x00Munsupported startup parameter: options\x00\x00"
                            conn.sendall(b"E" + struct.pack("!I", len(said) + 4) + said)
                            return
                    (upstream if source is conn else conn).sendall(data)
                    data = b""

    return behave
