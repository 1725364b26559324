"""Events: what happened to each job, and when — the timeline the console shows.

Workers note an event at each step (download, validation, upload, reconciliation, polls, the
end, every callback attempt) and write the ones noted since their last write of the job in that
write's transaction: a clone's timeline costs no transactions of its own. An event is a courtesy
to the person reading the console: recording one never fails a job (a database error is logged
and dropped). A job's "crashed" events, written with the write that reschedules it, also count its
crashes (:meth:`relay.worker.CloneWorker.crashed`). Details are plain words; anything
that looks like a URL loses its query string here, so a signed link or a token in a query never
reaches the table. Events are deleted with their job (:meth:`relay.jobs.JobStore.purge`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import Engine, func, insert, select

from .db import job_events, reader, utcnow

log = logging.getLogger("relay.events")

MAX_DETAIL = 500
_URL_QUERY = re.compile(r"(https?://[^\s?#\"'<>]+)[?#][^\s\"'<>]*", re.IGNORECASE)


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    detail: str | None


def row(job_id: str, kind: str, detail: str | None = None) -> dict:
    """One event, stamped now, ready to be written (with :func:`record_rows` or in the
    transaction of a job's own write: see :meth:`relay.jobs.JobStore.update`)."""
    return {"job_id": job_id, "at": utcnow(), "kind": kind[:32], "detail": scrub(detail)}


def record(engine: Engine, job_id: str, kind: str, detail: str | None = None) -> None:
    """Add one event to ``job_id``'s timeline now (never raises)."""
    record_rows(engine, [row(job_id, kind, detail)])


def record_rows(engine: Engine, rows: list[dict]) -> None:
    """Write events made by :func:`row` (never raises)."""
    if not rows:
        return
    try:
        with engine.begin() as conn:
            conn.execute(insert(job_events), rows)
    except Exception:  # noqa: BLE001 - a timeline entry is never worth a failed job
        log.warning("events not recorded", exc_info=True, extra={"fields": {"job_id": rows[0]["job_id"]}})


def count(engine: Engine, job_id: str, kind: str, since: datetime | None = None) -> int:
    """How many events of ``kind`` the job has had (crashes, say), ``since`` a moment if given."""
    where = [job_events.c.job_id == job_id, job_events.c.kind == kind]
    if since is not None:
        where.append(job_events.c.at >= since)
    with reader(engine) as conn:
        return conn.scalar(select(func.count()).select_from(job_events).where(*where))


def for_job(engine: Engine, job_id: str) -> list[Event]:
    """The job's events, oldest first."""
    with reader(engine) as conn:
        rows = conn.execute(
            select(job_events.c.at, job_events.c.kind, job_events.c.detail)
            .where(job_events.c.job_id == job_id)
            .order_by(job_events.c.id)
        ).all()
    return [Event(row.at, row.kind, row.detail) for row in rows]


def scrub(detail: str | None) -> str | None:
    """``detail`` with URL query strings and fragments cut, at most :data:`MAX_DETAIL` characters."""
    if not detail:
        return None
    return _URL_QUERY.sub(r"\1", detail)[:MAX_DETAIL]


def host(url: str | None) -> str:
    """The host of an audio URL, for a timeline ("from www.dropbox.com")."""
    try:
        return urlsplit(url or "").hostname or "an unknown host"
    except ValueError:
        return "an unknown host"


def audio(info) -> str:
    """One line for a validated file (an :class:`relay.audio.AudioInfo`)."""
    parts = [info.format.upper(), f"{info.duration_seconds:.1f} s"]
    if info.sample_rate:
        parts.append(f"{info.sample_rate} Hz")
    if info.channels:
        parts.append(f"{info.channels} ch")
    return ", ".join(parts) + f", sent as {info.content_type}"
