"""Uploads: recordings sent in the request body, kept in the database until their job is done.

A file sent as multipart or as the raw body must outlive the request the way a URL does: a worker
in another process (another dyno, after a kill -9) must be able to read it. So its bytes go into
the database, in chunks of :data:`CHUNK` bytes (``upload_chunks``), written in one short
transaction once the whole body is on local disk (a slow client never holds a transaction open).

Stored bytes are bounded by ``RELAY_UPLOAD_STORE_BYTES`` across all uploads (over it: 503
``upload_storage_full``). A job's upload is deleted as soon as the job no longer needs it — when
useapi accepted the file, or the job ended — and :func:`sweep` removes what a crash left behind.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from sqlalchemy import Engine, delete, func, insert, select

from .db import jobs, upload_chunks, uploads, utcnow
from .errors import DownloadFailed, UploadStorageFull

log = logging.getLogger("relay.uploads")
CHUNK = 1024 * 1024
_NEEDED_BY = ("received", "downloaded", "uploading")  # job phases that may still read their upload


@dataclass(frozen=True)
class Stored:
    id: str
    size: int
    sha256: str


def save(engine: Engine, source: BinaryIO, size: int, job_id: str, limit: int, account: str | None = None) -> Stored:
    """Store ``size`` bytes read from ``source`` (a local file) for job ``job_id`` of ``account``.

    Raises :class:`UploadStorageFull` when the stored uploads would exceed ``limit`` bytes, or
    ``account``'s would exceed half of it (one account's backlog never takes every other's room)."""
    upload_id = job_id  # one upload per job: the job's id names it, so a sweep can find its job
    digest = hashlib.sha256()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # the capacity check and the insert, one at a time
            # Others' files may be being stored (a few seconds each): wait longer than for a row lock.
            conn.exec_driver_sql("SET LOCAL lock_timeout = '20s'")
            conn.exec_driver_sql("SET LOCAL statement_timeout = '25s'")  # or the statement bound cuts the wait first
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724390118)")
        stored = conn.scalar(select(func.coalesce(func.sum(uploads.c.size), 0))) or 0
        if stored + size > limit:
            raise UploadStorageFull(
                f"The relay holds {stored / 1048576:.0f} MiB of uploaded files waiting for their jobs; this "
                f"one ({size / 1048576:.1f} MiB) would pass RELAY_UPLOAD_STORE_BYTES "
                f"({limit / 1048576:.0f} MiB). Retry in a minute, or send a link (audio_url) instead.",
                retry_after=60,
            )
        if account is not None:
            # Counted in this locked transaction (a burst of one account's files is counted whole);
            # an account may always store one file that fits the store.
            # A file an older process stored names no account: its job does.
            own = (
                conn.scalar(
                    select(func.coalesce(func.sum(uploads.c.size), 0))
                    .select_from(uploads.outerjoin(jobs, jobs.c.id == uploads.c.id))
                    .where(func.coalesce(uploads.c.account_key, jobs.c.account_key) == account)
                )
                or 0
            )
            if own and own + size > limit // 2:
                raise UploadStorageFull(
                    f"This account's uploaded files waiting for their jobs take {own / 1048576:.0f} MiB; one account "
                    f"may hold at most half of RELAY_UPLOAD_STORE_BYTES ({limit // 2 / 1048576:.0f} MiB), so that "
                    "others can send files too. Retry once some of its clones have started, or send a link "
                    "(audio_url) instead.",
                    retry_after=60,
                )
        conn.execute(
            insert(uploads).values(
                id=upload_id, size=size, sha256="", complete=False, created_at=utcnow(), account_key=account
            )
        )
        seq = 0
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            conn.execute(insert(upload_chunks).values(upload_id=upload_id, seq=seq, data=chunk))
            seq += 1
        conn.execute(uploads.update().where(uploads.c.id == upload_id).values(sha256=digest.hexdigest(), complete=True))
    return Stored(upload_id, size, digest.hexdigest())


def spool(engine: Engine, upload_id: str, path: str) -> int:
    """Write the stored upload into the file at ``path``; its size. Raises :class:`DownloadFailed`
    when the upload is gone (it outlived its job's need, or was never completed)."""
    with engine.connect() as conn:
        row = conn.execute(select(uploads.c.size, uploads.c.complete).where(uploads.c.id == upload_id)).first()
        if row is None or not row.complete:
            raise DownloadFailed("The uploaded file is no longer stored on the relay. Send it again.")
        written = 0
        with open(path, "wb") as sink:
            seq = 0
            while True:  # chunk by chunk: memory stays at one chunk whatever the file's size
                data = conn.scalar(
                    select(upload_chunks.c.data).where(
                        upload_chunks.c.upload_id == upload_id, upload_chunks.c.seq == seq
                    )
                )
                if data is None:
                    break
                sink.write(data)
                written += len(data)
                seq += 1
    if written != row.size:
        raise DownloadFailed("The uploaded file is incomplete on the relay. Send it again.")
    return written


def delete_upload(engine: Engine, upload_id: str) -> None:
    """Forget an upload's bytes (idempotent)."""
    with engine.begin() as conn:
        conn.execute(delete(upload_chunks).where(upload_chunks.c.upload_id == upload_id))
        conn.execute(delete(uploads).where(uploads.c.id == upload_id))


def sweep(engine: Engine, older_than: datetime) -> int:
    """Delete uploads made before ``older_than`` that no job still needs (a crash between a
    job's last phase and its upload's deletion, or a request that died before its job was
    written); the count."""
    needed = select(jobs.c.id).where(jobs.c.phase.in_(_NEEDED_BY))
    with engine.begin() as conn:
        gone = list(
            conn.scalars(select(uploads.c.id).where(uploads.c.created_at < older_than, uploads.c.id.not_in(needed)))
        )
        for upload_id in gone:
            conn.execute(delete(upload_chunks).where(upload_chunks.c.upload_id == upload_id))
            conn.execute(delete(uploads).where(uploads.c.id == upload_id))
    return len(gone)


def stored_bytes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.coalesce(func.sum(uploads.c.size), 0))) or 0)
