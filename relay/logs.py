"""Logs: one JSON object per line on stdout (what Heroku and Render collect), secrets never included.

Lines are formatted in the thread that logs and written by a thread of their own
(:class:`DetachedStream`): a stdout nobody reads (a full pipe, a stalled log collector) costs log
lines, never a request's thread.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import TextIO

_HANDLER_NAME = "relay-json-stdout"


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON: time, level, logger, message, and the record's ``fields`` dict."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class DetachedStream(logging.Handler):
    """Writes formatted lines to ``stream`` from a thread of its own. At most ``MAX_WAITING`` lines
    wait for the stream; past that, lines are dropped and counted, and once the stream takes lines
    again a warning says how many were lost. :meth:`flush` (run at exit by :mod:`logging`) waits
    for the waiting lines, at most ``FLUSH_SECONDS``.

    The writer thread starts with the first line of each process: a forked gunicorn worker gets
    its own, and none of its parent's waiting lines or locks."""

    MAX_WAITING = 10_000
    FLUSH_SECONDS = 2.0

    def __init__(self, stream: TextIO):
        super().__init__()
        self.stream = stream
        self._fresh()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (handler := me()) is not None and handler._fresh())

    def _fresh(self) -> None:
        """No lines, no writer (yet), an unheld lock: a new handler, or a forked process's copy."""
        self._changed = threading.Condition(threading.Lock())
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._writing = False
        self._pid: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not fail the caller
            self.handleError(record)
            return
        with self._changed:
            if self._pid is None:  # the first line of this process: its writer
                self._pid = os.getpid()
                threading.Thread(target=self._write, name="log-writer", daemon=True).start()
            if len(self._lines) >= self.MAX_WAITING:
                self._dropped += 1
                return
            self._lines.append(line)
            self._changed.notify_all()

    def _write(self) -> None:
        while True:
            with self._changed:
                while not self._lines and not self._dropped:
                    self._changed.wait()
                lines, dropped = list(self._lines), self._dropped
                self._lines.clear()
                self._dropped, self._writing = 0, True
            if dropped:
                lines.append(self._dropped_line(dropped))
            try:
                for text in _pieces(lines):
                    try:
                        self.stream.write(text)
                    except UnicodeEncodeError:  # a stdout that is not UTF-8: escaped, not lost
                        self.stream.write(text.encode("ascii", "backslashreplace").decode("ascii"))
                    self.stream.flush()
            except (OSError, ValueError):  # stdout closed: nothing can be said about it
                pass
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()

    def _dropped_line(self, count: int) -> str:
        """The warning for ``count`` dropped lines, formatted as any line is."""
        record = logging.makeLogRecord(
            {
                "name": "relay.logs",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": f"{count} log lines were dropped: stdout was not being read (a slow or stuck log collector)",
                "fields": {"dropped_lines": count},
            }
        )
        return self.format(record)

    def flush(self) -> None:
        """Wait until the waiting lines are written, at most ``FLUSH_SECONDS``."""
        if self._pid != os.getpid():
            return
        deadline = time.monotonic() + self.FLUSH_SECONDS
        with self._changed:
            while self._lines or self._dropped or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)


ATOMIC_BYTES = 4096  # a pipe takes a write this size whole (PIPE_BUF): gunicorn's processes share stdout


def _pieces(lines: list[str]):
    """``lines`` as texts of whole lines, each at most :data:`ATOMIC_BYTES` when encoded: one write
    each, which a pipe takes whole, so lines from the processes sharing stdout do not interleave. A
    longer line (a traceback) goes alone, and the pipe may interleave it with another process's."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8", "replace")) + 1
        if piece and size + length > ATOMIC_BYTES:
            yield "\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "\n".join(piece) + "\n"


def configure(level: str) -> None:
    """Send the ``relay`` loggers to stdout as JSON lines (once per process)."""
    logger = logging.getLogger("relay")
    logger.setLevel(level)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = DetachedStream(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
