"""Logs: one JSON object per line on stdout (what Heroku and Render collect), secrets never included."""

from __future__ import annotations

import json
import logging
import sys
import time

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


def configure(level: str) -> None:
    """Send the ``relay`` loggers to stdout as JSON lines (once per process)."""
    logger = logging.getLogger("relay")
    logger.setLevel(level)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
