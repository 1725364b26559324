"""Jobs: the durable record of every clone, and how workers claim, lease and update it.

Phases: received → uploading → uploaded → ready | failed. A phase is written *before*
the step it names has side effects (``uploading`` is committed before the first byte goes to
useapi), so whoever resumes a job after a crash knows what may already have happened.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from .db import accounts, heartbeats, job_events, jobs, reader, utcnow

log = logging.getLogger("relay.jobs")

# DOWNLOADED is no longer written (the worker goes from received to uploading in one write); rows
# an earlier version left in it are resumed like received ones.
RECEIVED, DOWNLOADED, UPLOADING, UPLOADED, READY, FAILED = (
    "received",
    "downloaded",
    "uploading",
    "uploaded",
    "ready",
    "failed",
)
TERMINAL = (READY, FAILED)
_EPOCH = datetime(1970, 1, 1)
PENDING, DELIVERED, GIVEN_UP = "pending", "delivered", "given_up"


@dataclass
class Job:
    """One row of ``jobs``, with ``request`` and ``answer`` decoded."""

    id: str
    phase: str
    request: dict[str, Any]
    status_url: str | None
    token_kind: str
    token_sealed: str | None
    token_fingerprint: str | None
    idempotency_key: str | None
    request_hash: str | None
    answer: dict[str, Any] | None
    http_status: int | None
    attempts: int
    upload_attempts: int
    upload_started_at: datetime | None
    accepted_at: datetime | None
    cloned_voice_item_id: str | None
    item_id: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    next_run_at: datetime | None
    callback_url: str | None
    callback_status: str | None
    callback_attempts: int
    callback_next_at: datetime | None
    callback_last_error: str | None
    webhook_id: str | None
    dry_run: bool
    account_key: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    # Not a column: the place in its account's queue, known when the job was just written.
    queue_position: int | None = field(default=None, compare=False)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls.from_values(dict(row._mapping))

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Job:
        """A job from column values as stored (``request`` and ``answer`` as JSON text)."""
        values = {name: values[name] for name in _COLUMN_FIELDS}
        values["request"] = json.loads(values["request"])
        values["answer"] = json.loads(values["answer"]) if values["answer"] else None
        return cls(**values)


_COLUMN_FIELDS = tuple(f.name for f in fields(Job) if f.name != "queue_position")


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    encoded = dict(values)
    for key in ("request", "answer"):
        if key in encoded and encoded[key] is not None and not isinstance(encoded[key], str):
            encoded[key] = json.dumps(encoded[key], separators=(",", ":"), ensure_ascii=False)
    return encoded


# Statements built once: the intake path runs them on every request.
_INSERT = insert(jobs).returning(*jobs.c)
_INSERT_MANY = insert(jobs)
_BY_ID = select(jobs).where(jobs.c.id == bindparam("id"))  # status polls run this on every request
_BY_KEY = select(jobs).where(jobs.c.idempotency_key == bindparam("key"))
_DEFAULTS = {column.name: None for column in jobs.c} | {"dry_run": False}
# A queue position counts at most this many jobs ahead: counting is a scan of the account's part
# of an index, and an exact "4,713th" is worth less than an answer whose cost does not grow with
# the backlog (with 6,000 jobs waiting, the exact count took longer than the insert).
QUEUE_COUNT_LIMIT = 100
_QUEUE_AHEAD = select(func.count()).select_from(
    select(jobs.c.id)
    .where(
        jobs.c.account_key == bindparam("account"),
        jobs.c.phase == RECEIVED,
        or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < bindparam("now")),
        jobs.c.created_at < bindparam("created"),
    )
    .limit(QUEUE_COUNT_LIMIT)
    .subquery()
)


@functools.cache
def _claim_statement(limited: bool):
    """The claim, built once per shape (building it costs more than running it)."""
    now = bindparam("now")
    free = or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now)
    account_ok = or_(accounts.c.backoff_until.is_(None), accounts.c.backoff_until <= now)
    if limited:
        busy = (
            select(jobs.c.account_key)
            .where(jobs.c.lease_expires_at > now, jobs.c.phase.not_in(TERMINAL), jobs.c.account_key.is_not(None))
            .group_by(jobs.c.account_key)
            .having(func.count() >= bindparam("account_limit"))
        )
        account_ok = and_(account_ok, or_(jobs.c.account_key.is_(None), jobs.c.account_key.not_in(busy)))
    # next_run_at is NULL once a job has nothing left to do, so this is a range scan of its
    # index, whatever the number of finished jobs kept for their idempotency keys.
    due = and_(
        jobs.c.next_run_at <= now,
        or_(
            and_(jobs.c.phase.not_in(TERMINAL), account_ok),
            and_(jobs.c.phase.in_(TERMINAL), jobs.c.callback_status == PENDING),
        ),
    )
    pick = (
        select(jobs.c.id)
        .select_from(jobs.outerjoin(accounts, accounts.c.account_key == jobs.c.account_key))
        .where(due, free)
        .order_by(func.coalesce(accounts.c.last_claimed_at, _EPOCH), jobs.c.next_run_at, jobs.c.created_at)
        .limit(1)
        .with_for_update(of=jobs, skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(jobs)
        .where(jobs.c.id == pick, free)
        .values(
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("lease_until"),
            attempts=jobs.c.attempts + 1,
            updated_at=now,
        )
        .returning(*jobs.c)
    )


@dataclass(eq=False)
class _NewJob:
    """A job waiting to be written with others; ``done`` is set once it was (or failed)."""

    row: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to write the next group rather than because it was written
    result: tuple[Job, bool] | None = None
    error: BaseException | None = None


class _GroupInsert:
    """Writes new jobs in groups: every job that arrived while one transaction committed goes
    into the next one (group commit). The writer lock, BEGIN and COMMIT cost the same for one
    row or fifty, so under a burst each job pays a share; a job that arrives alone is written at
    once, as it would be without grouping.

    No thread of its own: a request that finds nobody writing writes its group; those arriving
    meanwhile wait, and the first of them writes the next group when woken. Each request is
    answered only after the transaction holding its job committed.
    """

    MAX_GROUP = 64

    def __init__(self, store: JobStore):
        self.store = store
        self._lock = threading.Lock()
        self._queue: list[_NewJob] = []
        self._writing = False

    def write(self, new: _NewJob) -> tuple[Job, bool]:
        with self._lock:
            # Stamped in queue order, so creation times, groups and queue positions agree.
            now = self.store.clock()
            new.row.update(created_at=now, updated_at=now, next_run_at=now)
            self._queue.append(new)
            leading, self._writing = not self._writing, True
        if not leading:
            new.done.wait()
            leading = new.lead
        if leading:  # the oldest waiting job is ours, so our group holds it
            with self._lock:
                group, self._queue = self._queue[: self.MAX_GROUP], self._queue[self.MAX_GROUP :]
            try:
                self._write_group(group)
            finally:
                with self._lock:
                    if self._queue:
                        successor = self._queue[0]
                        successor.lead = True
                        successor.done.set()
                    else:
                        self._writing = False
        if new.error is not None:
            raise new.error
        assert new.result is not None
        return new.result

    def _write_group(self, group: list[_NewJob]) -> None:
        try:
            if len(group) == 1:
                group[0].result = self.store._insert_one(group[0].row)
            else:
                try:
                    with self.store.engine.begin() as conn:
                        conn.execute(_INSERT_MANY, [new.row for new in group])
                    for new in group:
                        new.result = Job.from_values(new.row), True
                except IntegrityError:  # an idempotency key already taken: one by one, then
                    for new in group:
                        try:
                            new.result = self.store._insert_one(new.row)
                        except Exception as err:  # noqa: BLE001 - handed to the request it belongs to
                            new.error = err
            self._place(group)
        except Exception as err:  # noqa: BLE001 - every waiting request gets the failure
            for new in group:
                if new.result is None and new.error is None:
                    new.error = err
        finally:
            for new in group:
                new.done.set()

    def _place(self, group: list[_NewJob]) -> None:
        """Queue positions of the group's new jobs: one count per account, then their order."""
        placed: dict[str | None, list[Job]] = {}
        for new in group:
            if new.result is not None and new.result[1]:
                placed.setdefault(new.result[0].account_key, []).append(new.result[0])
        for account, created in placed.items():
            if account is None:
                continue
            created.sort(key=lambda job: job.created_at)
            try:
                first = self.store.queue_position(created[0])
            except Exception:  # noqa: BLE001 - a position is a courtesy: the answer asks again
                log.warning("queue position unavailable", exc_info=True)
                continue
            if first is not None:
                for rank, job in enumerate(created):
                    job.queue_position = min(first + rank, QUEUE_COUNT_LIMIT + 1)


class JobStore:
    """All reads and writes of jobs. Writes by workers are guarded by their lease."""

    def __init__(self, engine: Engine, clock=utcnow):
        self.engine = engine
        self.clock = clock
        self._intake = _GroupInsert(self)

    # --- creating and reading -------------------------------------------------------------

    def create(self, job_id: str, **values: Any) -> tuple[Job, bool]:
        """Insert a new job; ``(job, True)``. With an idempotency key already taken: ``(existing, False)``.

        The job is committed when this returns. Jobs created at the same moment by other threads
        of this process are written in the same transaction (see :class:`_GroupInsert`); the job
        comes back with its ``queue_position``."""
        row = {
            **_DEFAULTS,
            **_encode(
                {"id": job_id, "phase": RECEIVED, "attempts": 0, "upload_attempts": 0, "callback_attempts": 0, **values}
            ),
        }
        return self._intake.write(_NewJob(row))

    def _insert_one(self, row: dict[str, Any]) -> tuple[Job, bool]:
        """One job in a transaction of its own."""
        try:
            with self.engine.begin() as conn:
                created = conn.execute(_INSERT, row).first()
        except IntegrityError:
            key = row.get("idempotency_key")
            existing = self.get_by_key(key) if key else None
            if existing is None:
                raise
            return existing, False
        return Job.from_row(created), True

    def get(self, job_id: str) -> Job | None:
        with reader(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": job_id}).first()
        return Job.from_row(row) if row else None

    def get_by_key(self, key: str) -> Job | None:
        with reader(self.engine) as conn:
            row = conn.execute(_BY_KEY, {"key": key}).first()
        return Job.from_row(row) if row else None

    # --- leases ---------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float, account_limit: int = 0) -> Job | None:
        """Lease the next due job to ``owner``; None when nothing is due.

        Due: unfinished work whose time has come, or a finished job whose callback is due.
        Unfinished work is only taken from accounts with fewer than ``account_limit`` jobs in
        flight (0: no limit) and not backing off after a 429, and accounts take turns: the one
        served least recently goes first. Claims are serialized (an advisory lock on PostgreSQL,
        ``BEGIN IMMEDIATE`` on SQLite) so limits hold across any number of worker processes.
        """
        now = self.clock()
        params = {
            "now": now,
            "owner": owner,
            "lease_until": now + timedelta(seconds=lease_seconds),
            "account_limit": account_limit,
        }
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(724390118)"))
            row = conn.execute(_claim_statement(bool(account_limit)), params).first()
            if row is not None and row.account_key and row.phase not in TERMINAL:
                self._touch_account(conn, row.account_key, last_claimed_at=now)
        return Job.from_row(row) if row else None

    def back_off(self, account_key: str | None, seconds: float) -> None:
        """Hold every job of ``account_key`` for ``seconds`` (useapi said 429); others go on."""
        if account_key:
            with self.engine.begin() as conn:
                self._touch_account(conn, account_key, backoff_until=self.clock() + timedelta(seconds=seconds))

    @staticmethod
    def _touch_account(conn, account_key: str, **values: Any) -> None:
        changed = conn.execute(update(accounts).where(accounts.c.account_key == account_key).values(**values)).rowcount
        if not changed:
            conn.execute(insert(accounts).values(account_key=account_key, **values))

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a waiting job among its account's waiting jobs (None if not waiting);
        ``QUEUE_COUNT_LIMIT + 1`` when at least that many are ahead."""
        if job.terminal or job.phase != RECEIVED or not job.account_key:
            return None
        with reader(self.engine) as conn:
            ahead = conn.scalar(
                _QUEUE_AHEAD, {"account": job.account_key, "now": self.clock(), "created": job.created_at}
            )
        return (ahead or 0) + 1

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease; False when the lease was lost to another worker."""
        now = self.clock()
        return self._guarded(job_id, owner, lease_expires_at=now + timedelta(seconds=lease_seconds))

    def update(self, job_id: str, owner: str, **values: Any) -> bool:
        """Write ``values`` if ``owner`` still holds the lease."""
        return self._guarded(job_id, owner, **values)

    def release(self, job_id: str, owner: str, **values: Any) -> bool:
        """Write ``values`` and give the lease up."""
        return self._guarded(job_id, owner, lease_owner=None, lease_expires_at=None, **values)

    def _guarded(self, job_id: str, owner: str, **values: Any) -> bool:
        values = _encode({"updated_at": self.clock(), **values})
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner).values(**values))
        return result.rowcount == 1

    def voice_taken(self, cloned_voice_item_id: str, job_id: str) -> bool:
        """True when another job already holds this voice (so two lost uploads never adopt one voice)."""
        with reader(self.engine) as conn:
            found = conn.scalar(
                select(jobs.c.id)
                .where(jobs.c.cloned_voice_item_id == cloned_voice_item_id, jobs.c.id != job_id)
                .limit(1)
            )
        return found is not None

    # --- housekeeping ---------------------------------------------------------------------

    def heartbeat(self, worker_id: str) -> None:
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(heartbeats).where(heartbeats.c.worker_id == worker_id).values(seen_at=now)
            ).rowcount
            if not changed:
                conn.execute(insert(heartbeats).values(worker_id=worker_id, seen_at=now))

    def last_heartbeat(self) -> datetime | None:
        with reader(self.engine) as conn:
            return conn.scalar(select(heartbeats.c.seen_at).order_by(heartbeats.c.seen_at.desc()).limit(1))

    def purge(self, older_than: datetime) -> int:
        """Delete finished jobs (callbacks settled) completed before ``older_than``; the count."""
        settled = or_(jobs.c.callback_status.is_(None), jobs.c.callback_status.in_((DELIVERED, GIVEN_UP)))
        done = and_(jobs.c.phase.in_(TERMINAL), settled, jobs.c.completed_at < older_than)
        with self.engine.begin() as conn:
            conn.execute(delete(job_events).where(job_events.c.job_id.in_(select(jobs.c.id).where(done))))
            gone = conn.execute(delete(jobs).where(done)).rowcount
            conn.execute(delete(heartbeats).where(heartbeats.c.seen_at < older_than))
        return gone

    def resend_callback(self, job_id: str) -> bool:
        """Deliver a finished job's callback again, from the start of the schedule (same
        ``webhook-id``). False when the job has not ended, has no callback URL, or a worker is
        delivering it right now."""
        now = self.clock()
        free = or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.phase.in_(TERMINAL), jobs.c.callback_url.is_not(None), free)
                .values(
                    callback_status=PENDING,
                    callback_attempts=0,
                    callback_last_error=None,
                    callback_next_at=now,
                    next_run_at=now,
                    updated_at=now,
                )
            ).rowcount
        return changed == 1
