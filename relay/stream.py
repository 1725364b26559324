"""Early upload: send a large file to useapi.net while it is still downloading, and let the last
bytes go only once the whole file has been validated.

Sequentially, a clone takes the download time plus the upload time; overlapped, about the longer
of the two. Nothing is given away by starting early: the upload declares the file's full length
and its last bytes (:data:`TAIL`) are held back until :meth:`EarlyUpload.finish`. If the download
breaks or the file turns out not to be valid audio, :meth:`EarlyUpload.abandon` closes the
connection short of that length, and an HTTP request whose body never completed is not a request
useapi.net can act on: no voice is created.

Only downloads whose host declares a length of at least ``RELAY_STREAM_MIN_BYTES`` and whose first
bytes are already one of the accepted formats start early; anything else is uploaded after the
download as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

from . import audio

log = logging.getLogger("relay.stream")
TAIL = 64 * 1024  # bytes held back until the file is known to be valid
_HEAD = 64 * 1024  # bytes needed before the format is judged


class Withheld(Exception):  # noqa: N818 - it is an outcome, not a fault
    """Raised inside the upload's body when the upload is abandoned: the request stays incomplete."""


class GrowingFile:
    """A spool file that is still being written, read by the upload. :meth:`ready` waits for
    bytes that have not arrived, never offers the last :data:`TAIL` bytes before :meth:`release`,
    and raises :class:`Withheld` once :meth:`abort` was called (or ``patience`` seconds pass with
    nothing new).

    The download thread reports each write (:meth:`wrote`) under a lock, but wakes the upload only
    when it waits and what it asked for is there: one hand-off per upload step (a megabyte), not
    one per downloaded chunk."""

    def __init__(self, path: str, size: int, patience: float):
        self.size = size
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._tail = min(TAIL, size // 2)
        self._patience = patience
        self._changed = threading.Condition()
        self._written = 0
        self._sent = 0  # for read()
        self._released = False
        self._aborted = False
        self._wants = 0  # a waiting reader needs bytes up to here (0: nobody waits)

    def __len__(self) -> int:
        return self.size

    def _limit(self) -> int:
        return min(self._written, self.size if self._released else self.size - self._tail)

    def wrote(self, total: int) -> None:
        with self._changed:
            self._written = total
            if self._wants and (self._limit() >= self._wants or total >= self.size):
                self._changed.notify_all()

    def release(self) -> None:
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def wait_released(self) -> None:
        """Until :meth:`release` (the file is valid); raises :class:`Withheld` once :meth:`abort`
        was called, or after ``patience`` seconds without either."""
        with self._changed:
            while not self._released:
                if self._aborted or not self._changed.wait(self._patience) and not self._released:
                    raise Withheld()

    def abort(self) -> None:
        with self._changed:
            self._aborted = True
            self._changed.notify_all()

    def ready(self, position: int, want: int, least: int | None = None) -> int:
        """Wait until at least ``least`` (default: ``want``) bytes after ``position`` may be sent,
        or all that ever will before :meth:`release`; how many (at most ``want``), 0 at the end."""
        least = want if least is None else min(least, want)
        with self._changed:
            try:
                while True:
                    if self._aborted:
                        raise Withheld()
                    if position >= self.size:
                        return 0
                    limit = self._limit()
                    if limit - position >= least or (limit > position and self._written >= self.size):
                        return min(limit - position, want)
                    self._wants = position + min(least, self.size - position)
                    if not self._changed.wait(self._patience):
                        if self._limit() <= position:
                            raise Withheld()  # the download side went quiet: never send the rest
                        return min(self._limit() - position, want)  # a slow download: send what there is
            finally:
                self._wants = 0

    def read(self, amount: int = -1) -> bytes:
        want = self.size - self._sent if amount is None or amount < 0 else amount
        count = self.ready(self._sent, want, least=1) if want else 0
        if not count:
            return b""
        chunk = os.pread(self.file.fileno(), count, self._sent)
        self._sent += len(chunk)
        return chunk

    def close(self) -> None:
        self.file.close()


class EarlyUpload:
    """Watches a download (pass :meth:`progress` to :func:`relay.fetch.download`) and starts the
    upload as soon as the file qualifies.

    ``begin()`` runs once, in the upload's thread, just before the first byte is sent (the
    worker commits its "uploading" phase there; the download goes on meanwhile).
    ``send(growing_file, size, content_type, before_tail)`` runs in that thread and returns the
    upload's result; it calls ``before_tail()`` when all but the held-back tail has gone (as
    :class:`relay.useapi.UploadBody` does). That waits until :meth:`finish` found the file valid,
    then runs ``before_release()`` (the worker writes down that the body is about to complete):
    in the upload's thread, once the body really is that far — never while most of it is still
    to go. If it raises, the upload ends short and that error is raised from :meth:`finish`.
    """

    def __init__(
        self,
        min_bytes: int,
        patience: float,
        begin: Callable[[], None],
        send: Callable[[BinaryIO, int, str], object],
        before_release: Callable[[], None] | None = None,
    ):
        self.min_bytes, self.patience = min_bytes, patience
        self._begin, self._send, self._before_release = begin, send, before_release
        self.path = ""  # the spool file being downloaded into, set before the download starts
        self._decided = False
        self._ended = False
        self._body: GrowingFile | None = None
        self._thread: threading.Thread | None = None
        self._result: object = None
        self._error: BaseException | None = None
        self._begin_over = threading.Event()  # begin() returned or raised
        self._begun = False  # begin() committed: the tail may be released after it
        self.content_type: str | None = None

    @property
    def started(self) -> bool:
        return self._body is not None

    def progress(self, size: int, declared: int | None) -> None:
        if not self._decided:
            if not declared or declared < self.min_bytes:
                self._decided = True
                return
            if size < min(_HEAD, declared):
                return  # too little to judge the format yet
            self._decided = True
            with open(self.path, "rb") as handle:
                kind = audio.sniff_start(handle.read(_HEAD))
            if kind not in audio.CONTENT_TYPES:
                return  # the validation after the download says what is wrong
            self.content_type = audio.CONTENT_TYPES[kind][0]
            self._body = GrowingFile(self.path, declared, self.patience)
            self._thread = threading.Thread(target=self._run, name="early-upload", daemon=True)
            self._thread.start()
        if self._body is not None:
            self._body.wrote(size)

    def _run(self) -> None:
        assert self._body is not None and self.content_type is not None
        try:
            try:
                self._begin()  # here, not in the download thread: its write does not hold the download up
                self._begun = True
            finally:
                self._begin_over.set()
            self._result = self._send(self._body, self._body.size, self.content_type, self._at_tail)
        except BaseException as err:  # noqa: BLE001 - handed to finish()
            self._error = err
        finally:
            if self._ended and self._body is not None:  # given up on while this thread was stuck
                self._body.close()

    def _at_tail(self) -> None:
        """In the upload's thread, all but the tail sent: wait for the file to be found valid, then
        let the worker write down that the body is about to complete."""
        assert self._body is not None
        self._body.wait_released()
        if self._before_release is not None:
            self._before_release()

    @property
    def size(self) -> int | None:
        """The length the upload declares (the download's ``Content-Length``), once started."""
        return None if self._body is None else self._body.size

    def finish(self) -> object:
        """The file is valid: send the rest and return the upload's result (or raise its error)."""
        assert self._body is not None and self._thread is not None
        # "uploading" (begin) must be committed before the tail may go (and "body complete" is
        # written after it, in the same thread): the other way round, the first would erase it.
        if not self._begin_over.wait(self.patience):  # still writing "uploading": send nothing more
            self._ended = True
            self._body.abort()
            raise RuntimeError(f"the upload's start was not written within {self.patience:g} s")
        if not self._begun:  # begin() failed: nothing was sent
            self.abandon()
            raise self._error or RuntimeError("the early upload ended before it began")
        if not self._thread.is_alive():
            # It ended while the tail was held (an early answer, a broken connection): the body never
            # completed, so nothing is written down as "complete" and its error is the answer.
            self._ended = True
            self._body.close()
            if self._error is None and self._result is not None:
                return self._result
            raise self._error or RuntimeError("the early upload ended before its last bytes were sent")
        self._ended = True
        self._body.release()  # the upload's thread writes "body complete" when it reaches the tail
        self._thread.join()
        self._body.close()
        if self._error is not None:
            raise self._error
        return self._result

    def withdraw(self) -> None:
        """Abandon the upload and forget it: :attr:`started` is False again, so the caller
        uploads another file (a converted one) the ordinary way."""
        self.abandon()
        self._body = self._thread = None
        self._ended = False

    def abandon(self) -> None:
        """Stop the upload short of its declared length (no-op when none started or it finished)."""
        if self._body is None or self._thread is None or self._ended:
            return
        self._ended = True
        self._body.abort()
        self._thread.join()
        self._body.close()
        if self._error is not None and not isinstance(self._error, Withheld):
            log.info("early upload ended before it was abandoned", extra={"fields": {"error": repr(self._error)}})
