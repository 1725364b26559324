"""Fetch: download a user-supplied URL safely into a temporary spool file.

Every hop goes through :mod:`relay.urlguard`, and the TCP connection is made to the address the
guard checked (an adapter pins it), so a second DNS answer cannot point the relay elsewhere.
Redirects are followed by hand, each one checked again. Size and time are bounded while the
body streams to disk; memory use does not grow with the file.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin

import requests
import urllib3

from . import __version__, deadline, urlguard
from .deadline import DeadlineAdapter
from .errors import DownloadFailed, DownloadTooLarge, StorageFull, UrlNotAllowed
from .settings import Settings

log = logging.getLogger("relay.fetch")
# Most bytes one read takes from the socket: a 40 MB download on loopback took 32 ms in 64 KiB
# reads, 23 ms in 256 KiB reads (bench/), with no gain beyond.
CHUNK = 1024 * 1024  # read size: fewer system calls (and GIL hand-offs) per megabyte
USER_AGENT = f"voice-clone-relay/{__version__}"
_REDIRECTS = {301, 302, 303, 307, 308}
Progress = Callable[[int, int | None], None]


@dataclass
class Spool:
    """A downloaded file on disk. ``close()`` removes it; use :func:`download` as a context."""

    path: str
    size: int
    url: str  # the final URL, redacted (no query string)
    server_content_type: str | None
    redirects: int

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def new_spool_path(directory: str | None = None) -> str:
    """A new, empty spool file in ``directory`` (``RELAY_SPOOL_DIR``; default: the system's temp
    folder), named so that :func:`sweep_stale_spools` finds it if abandoned."""
    try:
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="relay-", suffix=".audio", dir=directory or None)
    except OSError as err:
        raise _storage_full(directory or tempfile.gettempdir(), err) from None
    os.close(fd)
    return path


@contextlib.contextmanager
def download(
    url: str,
    settings: Settings,
    resolve: urlguard.Resolver | None = None,
    progress: Progress | None = None,
    path: str | None = None,
    tap: Callable[[memoryview], None] | None = None,
) -> Iterator[Spool]:
    """Download ``url`` into a spool file, yield it, and remove the file afterwards.

    ``progress(bytes_so_far, declared_total_or_None)`` is called as the body arrives, each time
    after those bytes were handed to the operating system (so another reader of ``path`` sees
    them). ``path``: a file from :func:`new_spool_path` to write into (removed all the same).
    ``tap(piece)`` sees each piece of the body as it is written (it must not keep the view).
    Raises :class:`UrlNotAllowed`, :class:`DownloadFailed` or :class:`DownloadTooLarge`.
    """
    path = path or new_spool_path(settings.spool_dir)
    try:
        with open(path, "wb", buffering=0) as sink, deadline.bounded(settings.download_timeout) as limit:
            spool = _download_into(sink, path, url, settings, resolve, progress, limit, tap)
        yield spool
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sweep_stale_spools(older_than_seconds: float, directory: str | None = None) -> int:
    """Remove spool files left behind by a process that was killed mid-job; return how many.

    Only files older than any download plus upload could take are touched, so a live job's spool
    (in this or another process) is never removed.
    """
    directory = directory or tempfile.gettempdir()
    cutoff = time.time() - older_than_seconds
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:  # RELAY_SPOOL_DIR not made yet (the first download makes it): nothing left
        return 0
    for name in names:
        if name.startswith("relay-") and name.endswith(".audio"):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
    return removed


def _download_into(sink, path: str, url: str, settings: Settings, resolve, progress, limit, tap=None) -> Spool:
    for hop in range(settings.max_redirects + 1):
        target = urlguard.check(url, settings.allowed_networks, resolve or deadline.resolve)
        with pinned_session(target) as session:
            response = _get(session, target, settings, limit)
            with response:
                if response.status_code in _REDIRECTS and response.headers.get("Location"):
                    try:
                        url = urljoin(url, response.headers["Location"])
                    except ValueError as err:
                        raise DownloadFailed(
                            f"The audio host {target.host} redirected to an address that cannot be parsed ({err})."
                        ) from None
                    continue
                _raise_for_status(response, target)
                size = _stream(response, sink, settings, limit, target, progress, tap)
                return Spool(
                    path=path,
                    size=size,
                    url=urlguard.redact(url),
                    server_content_type=response.headers.get("Content-Type"),
                    redirects=hop,
                )
    raise DownloadFailed(
        f"The audio link redirected more than {settings.max_redirects} times; use the file's direct download link."
    )


def _get(session: requests.Session, target: urlguard.Target, settings: Settings, limit: deadline.Deadline):
    remaining = max(limit.remaining(), 0.001)
    try:
        return session.get(
            target.url,
            stream=True,
            allow_redirects=False,
            timeout=(min(settings.connect_timeout, remaining), min(settings.read_timeout, remaining)),
            headers={"User-Agent": USER_AGENT, "Accept": "audio/*, */*;q=0.5", "Accept-Encoding": "identity"},
        )
    except requests.Timeout:
        raise DownloadFailed(f"The audio host {target.host} did not answer in time.") from None
    except requests.RequestException as err:
        if limit.expired:
            raise _too_slow(settings) from None
        raise DownloadFailed(f"Could not connect to the audio host {target.host}: {_reason(err)}.") from None
    except ValueError as err:  # requests parses a redirect's Location even when it does not follow it
        raise DownloadFailed(
            f"The audio host {target.host} answered with a redirect to an address that cannot be parsed ({err})."
        ) from None


def _raise_for_status(response: requests.Response, target: urlguard.Target) -> None:
    status = response.status_code
    if status == 200:
        return
    where = urlguard.redact(target.url)
    if status in (401, 403):
        hint = "The file is not public: share it as 'anyone with the link' or use a signed URL."
    elif status == 404:
        hint = "The file was not found: check the link."
    elif status == 429 or status >= 500:
        hint = "The audio host is busy or failing: try again later."
    else:
        hint = "Use a link that downloads the file directly."
    raise DownloadFailed(f"The audio host answered HTTP {status} for {where}. {hint}")


def _stream(response: requests.Response, sink, settings: Settings, due, target, progress=None, tap=None) -> int:
    limit = settings.max_bytes
    text = response.headers.get("Content-Length")
    declared = int(text) if text and text.isascii() and text.isdigit() else None  # "²".isdigit() too
    if declared is not None and declared > limit:
        raise DownloadTooLarge(too_large_message(declared, limit))
    size = 0
    read_into, exact = _body_reader(response)
    # Only a body sent as is has the declared length on disk (an early upload declares it too).
    length = declared if exact else None
    view = memoryview(bytearray(CHUNK))  # one buffer for the whole body: no allocation per chunk
    try:
        # Each read waits at most the read timeout; the deadline's watchdog ends the download of a
        # server that drips bytes (its socket is shut, the read returns, the check below sees it).
        while got := read_into(view):
            size += got
            if size > limit:
                raise DownloadTooLarge(too_large_message(None, limit))
            _write(sink, view[:got])
            if progress is not None:
                progress(size, length)
            if tap is not None:  # after progress: an early upload need not wait for it
                tap(view[:got])
    except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as err:
        if due.expired:
            raise _too_slow(settings) from None
        raise DownloadFailed(f"The download from {target.host} broke off after {size} bytes: {_reason(err)}.") from None
    if due.expired:  # the watchdog shut the socket: what looked like the end was the deadline
        raise _too_slow(settings)
    return size


def _body_reader(response: requests.Response) -> tuple[Callable[[memoryview], int], bool]:
    """``read_into(buffer) -> bytes read`` (0 at the end) for the response's body, returning what
    has arrived (so an early upload follows a slow download closely). A body of a declared length,
    sent as is, goes straight from the socket into the buffer; anything else (chunked, compressed
    by the host anyway, no length) is read and decoded by urllib3. The flag: the body on disk will
    have the declared length."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    plain = getattr(response.raw, "_fp", None)
    if (
        encoding in ("", "identity")
        and isinstance(plain, http.client.HTTPResponse)
        and not plain.chunked
        and plain.length is not None
        and plain.fp is not None
    ):
        stream, left = plain.fp, plain.length

        def direct(view: memoryview) -> int:
            nonlocal left
            if left <= 0:
                return 0
            got = stream.readinto1(view[: min(len(view), left)])
            if not got:  # closed before the length it announced
                raise http.client.IncompleteRead(b"", left)
            left -= got
            return got

        return direct, True
    raw = response.raw

    def decoded(view: memoryview) -> int:
        chunk = raw.read1(len(view), decode_content=True)
        view[: len(chunk)] = chunk
        return len(chunk)

    return decoded, False


def _write(sink, chunk: bytes) -> None:
    """Write all of ``chunk`` to the spool; a full or unwritable disk is the relay's fault, not the link's."""
    view = memoryview(chunk)
    try:
        while view:  # an unbuffered write may take part of the chunk
            view = view[sink.write(view) :]
    except OSError as err:
        raise _storage_full(sink.name, err) from None


def _storage_full(path: str, err: OSError) -> StorageFull:
    log.error("spool storage failed", extra={"fields": {"path": path, "error": err.strerror or str(err)}})
    return StorageFull(
        f"The relay could not write the audio to its disk ({err.strerror or err}). This is the relay's "
        "problem, not your link's: the operator must free space or fix RELAY_SPOOL_DIR. Try again later."
    )


def _too_slow(settings: Settings) -> DownloadFailed:
    return DownloadFailed(
        f"The download took longer than {settings.download_timeout:g} s (RELAY_DOWNLOAD_TIMEOUT); "
        "host the file somewhere faster or make it smaller."
    )


def too_large_message(declared: int | None, limit: int) -> str:
    """Why a file is refused for its size: its size when known, and RELAY_MAX_BYTES."""
    size = f"{declared / 1048576:.1f} MiB" if declared else f"more than {limit / 1048576:.1f} MiB"
    return f"The file is {size}; the limit is {limit / 1048576:.1f} MiB (RELAY_MAX_BYTES)."


def _reason(err: Exception) -> str:
    text = str(err.__context__ or err) if not str(err) else str(err)
    # urllib3's messages carry pool reprs and URLs (with query strings): name the cause only.
    if "timed out" in text.lower():
        return "it timed out"
    if "refused" in text.lower():
        return "connection refused"
    if "reset" in text.lower() or "aborted" in text.lower():
        return "connection reset"
    if "IncompleteRead" in text or "ended prematurely" in text or "Connection broken" in text:
        return "the connection closed before the whole file arrived"
    if "SSL" in text or "certificate" in text.lower():
        return "TLS handshake or certificate check failed"
    return "network error"


@contextlib.contextmanager
def pinned_session(target: urlguard.Target) -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: they would bypass pinning
    adapter = _PinnedAdapter(target.address, target.port)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    try:
        yield session
    finally:
        session.close()


class _PinnedAdapter(DeadlineAdapter):
    """Connections go to one checked ``(address, port)``, whatever the URL says, under the
    current deadline. TLS still verifies the certificate and sends SNI for the URL's host name."""

    def __init__(self, address: str, port: int):
        super().__init__(address, port, max_retries=0, pool_connections=1, pool_maxsize=1)

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # pragma: no cover - proxies are never used
        raise UrlNotAllowed("Proxies are not used for audio downloads.")
