"""Jobs: the durable record of every clone, and how workers claim, lease and update it.

Phases: received → uploading → uploaded → ready | failed. A phase is written *before*
the step it names has side effects (``uploading`` is committed before the first byte goes to
useapi), so whoever resumes a job after a crash knows what may already have happened.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, bindparam, case, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import DataError, IntegrityError

from .db import PG_CONNECT, STATEMENT_TIMEOUT_MS, accounts, heartbeats, job_events, jobs, reader, utcnow

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
MEMORY_TOKEN = "memory"  # tokens.MEMORY: a per-request token held in one process's memory
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
    body_sent_at: datetime | None = None
    token_holder: str | None = None
    name_key: str | None = None
    exclusive_key: str | None = None
    made_voice_id: str | None = None
    follows: str | None = None
    callback_sealed: str | None = None
    audio_url_sealed: str | None = None
    # Not columns: the place in its account's queue, known when the job was just written; and,
    # for a request that did not create it, why it got this job ("key" or "name").
    queue_position: int | None = field(default=None, compare=False)
    matched: str | None = field(default=None, compare=False)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def failed_before_upload(self) -> bool:
        """Failed before a whole upload body went out: useapi made nothing, so trying again is safe.
        Not a job that ended as the job it waited for (a clone of its name) whose upload is in doubt:
        it made no upload of its own to judge by, and that voice may exist."""
        return (
            self.phase == FAILED
            and VOICE_IN_DOUBT not in (self.answer or {})
            and self.body_sent_at is None
            and self.cloned_voice_item_id is None
            and self.item_id is None
        )

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


_COLUMN_FIELDS = tuple(f.name for f in fields(Job) if f.name not in ("queue_position", "matched"))


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
_BY_EXCLUSIVE = select(jobs).where(jobs.c.exclusive_key == bindparam("key"))
_ACTIVE_BY_NAME = (
    select(jobs)
    .where(jobs.c.name_key == bindparam("key"), jobs.c.phase.not_in(("ready", "failed")))
    .order_by(jobs.c.created_at)
    .limit(1)
)
_DEFAULTS = {column.name: None for column in jobs.c} | {"dry_run": False}
# A queue position counts at most this many jobs ahead: counting is a scan of the account's part
# of an index, and an exact "4,713th" is worth less than an answer whose cost does not grow with
# the backlog (with 6,000 jobs waiting, the exact count took longer than the insert).
QUEUE_COUNT_LIMIT = 100
# In a failed job's answer (hidden): it ended as the job it waited for, whose upload is in doubt.
VOICE_IN_DOUBT = "_voice_in_doubt_of"
# A process whose heartbeat is older than this is gone: jobs pinned to its memory may be taken
# (they then fail with token_unavailable instead of waiting forever).
HOLDER_STALE_SECONDS = 30
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
def _pick(limited: bool, pinned_accounts: bool, lock: bool = True):
    """The next due job: unfinished work of an account that may take more (under its limit, not
    backing off) — or whose wait in the queue is over, to be failed —, or a finished job whose
    callback is due. Accounts take turns (least recently served first). A job whose token lives
    in one process's memory is only for that process, unless that process is gone.
    Built once per shape (building it costs more than running it)."""
    now = bindparam("now")
    free = or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now)
    not_backing_off = or_(accounts.c.backoff_until.is_(None), accounts.c.backoff_until <= now)
    account_ok = not_backing_off
    if limited:
        busy = (
            select(jobs.c.account_key)
            .where(jobs.c.account_key.is_not(None), _useapi_job(now))
            .group_by(jobs.c.account_key)
            .having(func.count() >= bindparam("account_limit"))
        )
        account_ok = and_(account_ok, or_(jobs.c.account_key.is_(None), jobs.c.account_key.not_in(busy)))
    if pinned_accounts:  # accounts whose limit was found reached in this claim (PostgreSQL)
        account_ok = and_(account_ok, jobs.c.account_key.not_in(bindparam("skip", expanding=True)))
    alive = select(heartbeats.c.worker_id).where(heartbeats.c.seen_at > bindparam("alive_after"))
    token_ok = or_(
        jobs.c.token_kind != MEMORY_TOKEN,
        jobs.c.token_holder.is_(None),
        jobs.c.token_holder == bindparam("holder"),
        jobs.c.token_holder.not_in(alive),
    )
    # next_run_at is NULL once a job has nothing left to do, so this is a range scan of its
    # index, whatever the number of finished jobs kept for their idempotency keys.
    due = and_(
        jobs.c.next_run_at <= now,
        token_ok,
        or_(
            and_(jobs.c.phase.not_in(TERMINAL), or_(account_ok, _queue_expired(), and_(_looking(), not_backing_off))),
            and_(jobs.c.phase.in_(TERMINAL), jobs.c.callback_status == PENDING),
        ),
    )
    pick = (
        select(
            jobs.c.id, jobs.c.account_key, jobs.c.phase, _queue_expired().label("expired"), _looking().label("looking")
        )
        .select_from(jobs.outerjoin(accounts, accounts.c.account_key == jobs.c.account_key))
        .where(due, free)
        # Looks at what useapi already has come first: behind an account's backlog of new uploads,
        # they ran past their window and failed voices that were ready.
        .order_by(
            case((_looking(), 0), else_=1),
            func.coalesce(accounts.c.last_claimed_at, _EPOCH),
            jobs.c.next_run_at,
            jobs.c.created_at,
        )
        .limit(1)
    )
    # lock=False: only to learn whether anything (else) is due, taking no row.
    return pick.with_for_update(of=jobs, skip_locked=True) if lock else pick


def _looking():
    """A job that only looks at useapi (polls a voice useapi accepted, or lists the voices for an
    upload whose answer was lost): it starts no useapi job, so the account's limit does not hold it."""
    return or_(jobs.c.phase == UPLOADED, and_(jobs.c.phase == UPLOADING, jobs.c.body_sent_at.is_not(None)))


def _useapi_job(now):
    """A job that counts against its account's limit (useapi's maxJobs): worked on by a worker
    now, or one useapi is making: accepted (202) and still cloning, or whose whole body went out
    and whose answer was lost (waiting to be found in the listing)."""
    return or_(
        and_(jobs.c.lease_expires_at > now, jobs.c.phase.not_in(TERMINAL)),
        jobs.c.phase == UPLOADED,
        and_(jobs.c.phase == UPLOADING, jobs.c.body_sent_at.is_not(None)),
    )


def _queue_expired():
    """Never started, and waiting longer than ``RELAY_QUEUE_TIMEOUT_SECONDS``."""
    return and_(jobs.c.phase == RECEIVED, jobs.c.upload_attempts == 0, jobs.c.created_at < bindparam("queue_cutoff"))


@functools.cache
def _claim_statement(limited: bool):
    """Pick and lease in one statement (SQLite, where claims are serialized by BEGIN IMMEDIATE)."""
    pick = _pick(limited, False).with_only_columns(jobs.c.id).scalar_subquery()
    return _lease(jobs.c.id == pick)


def _lease(where):
    now = bindparam("now")
    free = or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now)
    return (
        update(jobs)
        .where(where, free)
        .values(
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("lease_until"),
            attempts=jobs.c.attempts + 1,
            updated_at=now,
        )
        .returning(*jobs.c)
    )


_LEASE_BY_ID = _lease(jobs.c.id == bindparam("job"))
_IN_FLIGHT = select(func.count()).where(jobs.c.account_key == bindparam("account"), _useapi_job(bindparam("now")))
_ACCOUNT_LOCK = select(func.pg_try_advisory_xact_lock(724390119, func.hashtext(bindparam("account"))))


WORK_CHANNEL = "relay_work"  # new jobs (payload: how many)
CHANGE_CHANNEL = "relay_job"  # a job's step ended (payload: its id)


# PostgreSQL intake (see _GroupInsert._write_group_pg): a group's rows, passed as one JSON array,
# and how many of its first account's waiting jobs are ahead (as _QUEUE_AHEAD counts).
_JOB_COLUMNS = ", ".join(column.name for column in jobs.c)
_PG_INTAKE = text(
    f"WITH new AS (INSERT INTO jobs ({_JOB_COLUMNS}) SELECT {_JOB_COLUMNS} "
    "FROM json_populate_recordset(NULL::jobs, CAST(:rows AS json))) "
    "SELECT (SELECT count(*) FROM (SELECT id FROM jobs "
    f"WHERE account_key = :account AND phase = '{RECEIVED}' "
    "AND (lease_expires_at IS NULL OR lease_expires_at < :now) AND created_at < :created "
    f"LIMIT {QUEUE_COUNT_LIMIT}) AS waiting) AS ahead"
)


def _json_moment(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _add_events(conn, events: list[dict] | None) -> None:
    if events:
        conn.execute(_INSERT_EVENTS, events)


_INSERT_EVENTS = insert(job_events)
_GUARDS = {  # which row a write may change: the lease holder's job, one upload attempt's, an account
    "lease": lambda: (jobs, jobs.c.id == bindparam("_job"), jobs.c.lease_owner == bindparam("_owner")),
    "attempt": lambda: (
        jobs,
        jobs.c.id == bindparam("_job"),
        jobs.c.phase == UPLOADING,
        jobs.c.upload_attempts == bindparam("_attempt"),
    ),
    "account": lambda: (accounts, accounts.c.account_key == bindparam("_account")),
}


@functools.lru_cache(maxsize=256)
def _set(guard: str, columns: tuple[str, ...]):
    """``UPDATE <table> SET <columns> WHERE <guard>``, built once per shape: building a statement
    (and its cache key) costs more than running it. Values go in as ``_v_<column>``."""
    table, *where = _GUARDS[guard]()
    values = {column: bindparam(f"_v_{column}", type_=table.c[column].type) for column in columns}
    return update(table).where(*where).values(values)


def _set_params(values: dict[str, Any], **where: Any) -> dict[str, Any]:
    return {**where, **{f"_v_{column}": value for column, value in values.items()}}


class _Announcer:
    """Tells the other processes (on PostgreSQL; see :class:`relay.runner.Listener`) about new jobs
    and ended steps, once the writes that made them have committed: from a thread of its own, a
    batch per transaction. A ``NOTIFY`` inside the job's own transaction would hold PostgreSQL's
    notification lock until that commit ended, so every job write of every process would queue
    behind the others' commits. The thread ends when idle for a while and starts again when needed."""

    IDLE_SECONDS = 5.0
    BATCH = 200

    def __init__(self, engine: Engine):
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def jobs_arrived(self, count: int) -> None:
        self._put(WORK_CHANNEL, str(count))

    def job_changed(self, job_id: str) -> None:
        self._put(CHANGE_CHANNEL, job_id)

    def close(self, timeout: float = 3.0) -> None:
        """Send what is queued, then stop (before the engine is disposed: a later send would open
        a connection nobody closes)."""
        with self._lock:
            self.enabled, thread = False, self._thread
        if thread is not None:
            self._queue.put(("", ""))  # wakes it at once
            thread.join(timeout)

    def _put(self, channel: str, payload: str) -> None:
        """Never raises: the write it follows has committed, and its request must hear so."""
        with self._lock:  # with _run's exit under the same lock, no message is ever left behind
            if not self.enabled:
                return
            self._queue.put((channel, payload))
            if self._thread is None:
                thread = threading.Thread(target=self._run, daemon=True, name="relay-announcer")
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had now: the next message tries again
                    log.warning("notifications delayed: no thread for them", exc_info=True)
                    return
                self._thread = thread

    def _run(self) -> None:
        conn = None  # the thread's own connection: closed when it ends, whatever became of the engine
        try:
            while True:
                try:  # once closing, what is left is sent at once and the thread ends
                    batch = [self._queue.get(timeout=self.IDLE_SECONDS if self.enabled else 0)]
                except queue.Empty:
                    batch = []
                if not batch or not self.enabled:
                    with self._lock:
                        if self._queue.empty() or not self.enabled:
                            while True:  # closing: what is queued still goes out
                                try:
                                    batch.append(self._queue.get_nowait())
                                except queue.Empty:
                                    break
                            conn = self._send(conn, [item for item in batch if item[0]])
                            self._thread = None
                            return
                    continue
                while len(batch) < self.BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                conn = self._send(conn, batch)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _connect(self):
        """A connection of the thread's own, outside the engine's pool (no pool slot to wait for;
        the pool may be disposed while the thread still runs): it closes it itself."""
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = psycopg.connect(url, autocommit=True, **PG_CONNECT)  # a silent peer is noticed, as on the pool's
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        return conn

    def _send(self, conn, batch: list[tuple[str, str]]):
        """Send ``batch`` in one transaction on ``conn`` (opened if None); the connection to use next."""
        if not batch:
            return conn
        arrived = sum(int(payload) for channel, payload in batch if channel == WORK_CHANNEL)
        changed = dict.fromkeys(payload for channel, payload in batch if channel == CHANGE_CHANNEL)
        notes = [{"channel": WORK_CHANNEL, "payload": str(arrived)}] if arrived else []
        notes += [{"channel": CHANGE_CHANNEL, "payload": job_id} for job_id in changed]
        try:
            conn = conn or self._connect()
            with conn.transaction():
                for note in notes:
                    conn.execute("SELECT pg_notify(%(channel)s, %(payload)s)", note)
            return conn
        except Exception:  # noqa: BLE001 - others then find out by polling, a little later
            log.warning("notifications not sent; other processes poll meanwhile", exc_info=True)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            return None


class Contended(Exception):
    """Nothing was claimed only because other claimers held the accounts with due work at that
    moment: try again in a few milliseconds, not after an idle poll."""


@dataclass(eq=False)
class Claim:
    """A claim made by the transaction that inserts a new job, for an idle worker of this process
    (:meth:`JobStore.create`): what :meth:`JobStore.claim` would be given, and, once that
    transaction has committed, the job it leased (None when nothing was due for that worker, or
    the job was not written in a group). The claim takes the queue's next job, as any claim would:
    the new one, or one that waited longer."""

    owner: str
    lease_seconds: float
    account_limit: int = 0
    holder: str | None = None
    queue_timeout: float = 3600.0
    job: Job | None = None


@dataclass(eq=False)
class _NewJob:
    """A job waiting to be written with others; ``done`` is set once it was (or failed)."""

    row: dict[str, Any]
    claim: Claim | None = None
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
            try:
                created = [Job.from_values(new.row) for new in group]
                if self.store.engine.dialect.name == "postgresql":
                    self._write_group_pg(group, created)
                else:
                    # One transaction: the rows and the queue positions (counted on the writer's
                    # connection, so no second checkout and round trip per group).
                    claimed: dict[str, tuple[_NewJob, Job]] = {}
                    with self.store.engine.begin() as conn:
                        conn.execute(_INSERT_MANY, [new.row for new in group] if len(group) > 1 else group[0].row)
                        # Idle workers reserved for these jobs are given theirs by this transaction:
                        # no claim transaction of their own, no wake-up before it.
                        for new in group:
                            if new.claim is not None and (row := self._claim(conn, new.claim)) is not None:
                                claimed[row.id] = new, Job.from_row(row)
                        created = [claimed[job.id][1] if job.id in claimed else job for job in created]
                        self._place(created, conn)
                    for new, job in claimed.values():  # once committed
                        assert new.claim is not None
                        new.claim.job = job
                    self.store.announcer.jobs_arrived(len(group))
                for new, job in zip(group, created, strict=True):
                    new.result = job, True
            except (IntegrityError, DataError, UnicodeError):  # a key taken, a bad row: one by one, then
                for new in group:
                    try:
                        new.result = self.store._insert_one(new.row)
                    except Exception as err:  # noqa: BLE001 - handed to the request it belongs to
                        new.error = err
                self._place([new.result[0] for new in group if new.result is not None and new.result[1]])
        except Exception as err:  # noqa: BLE001 - every waiting request gets the failure
            for new in group:
                if new.result is None and new.error is None:
                    new.error = err
        finally:
            for new in group:
                new.done.set()

    def _claim(self, conn, claim: Claim):
        """A claim for an idle worker inside the insert's transaction; if it fails, the jobs are
        written all the same and wait for a worker as any job does."""
        try:
            with conn.begin_nested():
                return self.store._lease_next(conn, claim)
        except Exception:  # noqa: BLE001 - the new jobs matter more than the shortcut
            log.warning("claim at insert failed; the jobs are queued", exc_info=True)
            return None

    def _write_group_pg(self, group: list[_NewJob], created: list[Job]) -> None:
        """PostgreSQL: the group's rows and the queue count of its first account in one statement,
        committed on its own (autocommit): one round trip instead of four (BEGIN, INSERT, count,
        COMMIT). A statement is atomic: all rows or none. Other processes are told once it committed."""
        first = min((job for job in created if job.account_key), key=lambda job: job.created_at, default=None)
        params = {
            "rows": json.dumps([new.row for new in group], default=_json_moment, ensure_ascii=False),
            "account": first.account_key if first else "",
            "now": self.store.clock(),
            "created": first.created_at if first else _EPOCH,
        }
        with self.store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            ahead = conn.execute(_PG_INTAKE, params).one().ahead
        self.store.announcer.jobs_arrived(len(group))
        if first is None:
            return
        same = sorted((job for job in created if job.account_key == first.account_key), key=lambda job: job.created_at)
        for rank, job in enumerate(same):
            job.queue_position = min(ahead + 1 + rank, QUEUE_COUNT_LIMIT + 1)
        # Jobs of other accounts in the same group (rare): counted after the commit, as a courtesy.
        self._place([job for job in created if job.account_key not in (None, first.account_key)])

    def _place(self, created: list[Job], conn=None) -> None:
        """Queue positions of new jobs: one count per account, then their order. ``conn``: the
        transaction that wrote them (a failed count then fails it, as a lost connection would)."""
        placed: dict[str, list[Job]] = {}
        for job in created:
            if job.account_key is not None and job.lease_owner is None:  # a job claimed at once waits for nobody
                placed.setdefault(job.account_key, []).append(job)
        for jobs_of_account in placed.values():
            jobs_of_account.sort(key=lambda job: job.created_at)
            if conn is not None:
                first = self.store._queue_position(conn, jobs_of_account[0])
            else:
                try:
                    first = self.store.queue_position(jobs_of_account[0])
                except Exception:  # noqa: BLE001 - a position is a courtesy: the answer asks again
                    log.warning("queue position unavailable", exc_info=True)
                    continue
            if first is not None:
                for rank, job in enumerate(jobs_of_account):
                    job.queue_position = min(first + rank, QUEUE_COUNT_LIMIT + 1)


class JobStore:
    """All reads and writes of jobs. Writes by workers are guarded by their lease."""

    def __init__(self, engine: Engine, clock=utcnow):
        self.engine = engine
        self.clock = clock
        self._intake = _GroupInsert(self)
        self.announcer = _Announcer(engine)
        # Told the id of a job whose step just ended (its releasing write committed): the runtime
        # wakes this process's requests waiting for it at once, before the step's loose ends.
        self.on_change: Callable[[str], None] | None = None
        # Whether another process's old heartbeat may be taken as that process gone (its memory
        # tokens lost): not after this process's own heartbeats stalled or its clock jumped (a
        # database outage ages every heartbeat alike). Set by the worker pool.
        self.trusts_heartbeats: Callable[[], bool] = lambda: True

    # --- creating and reading -------------------------------------------------------------

    def create(self, job_id: str, claim: Claim | None = None, **values: Any) -> tuple[Job, bool]:
        """Insert a new job; ``(job, True)``. With an idempotency key already taken: ``(existing, False)``.

        The job is committed when this returns. Jobs created at the same moment by other threads
        of this process are written in the same transaction (see :class:`_GroupInsert`); the job
        comes back with its ``queue_position``. ``claim``: on SQLite, that transaction also
        claims the queue's next job for an idle worker (:class:`Claim`); the new job then comes
        back leased if it was the one claimed."""
        row = {
            **_DEFAULTS,
            **_encode(
                {"id": job_id, "phase": RECEIVED, "attempts": 0, "upload_attempts": 0, "callback_attempts": 0, **values}
            ),
        }
        return self._intake.write(_NewJob(row, claim))

    def _insert_one(self, row: dict[str, Any]) -> tuple[Job, bool]:
        """One job in a transaction of its own."""
        try:
            with self.engine.begin() as conn:
                created = conn.execute(_INSERT, row).first()
            self.announcer.jobs_arrived(1)
        except IntegrityError:
            key, exclusive = row.get("idempotency_key"), row.get("exclusive_key")
            existing = self.get_by_key(key) if key else None
            if existing is not None:
                existing.matched = "key"
                return existing, False
            existing = self._get(_BY_EXCLUSIVE, exclusive) if exclusive else None
            if existing is None:
                raise
            existing.matched = "name"
            return existing, False
        return Job.from_row(created), True

    def take_name(self, job_id: str, owner: str, name_key: str) -> tuple[bool, str | None]:
        """Make the job (leased by ``owner``) the one that makes its voice name's voice for its
        account (its ``exclusive_key``): ``(True, None)`` when it is now; ``(False, holder)`` when
        job ``holder`` already is; ``(False, None)`` when the lease passed to another worker."""
        for _ in range(3):  # the holder may end between the refusal and the look
            try:
                with self.engine.begin() as conn:
                    taken = conn.execute(
                        update(jobs)
                        .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
                        .values(exclusive_key=name_key, updated_at=self.clock())
                    ).rowcount
            except IntegrityError:
                holder = self._get(_BY_EXCLUSIVE, name_key)
                if holder is not None:
                    return False, holder.id
                continue
            return bool(taken), None
        return False, None

    def wake_followers(self, job_id: str) -> int:
        """Jobs waiting for ``job_id`` (which just ended) are due now; how many. A read first: most
        jobs have none, and a write would queue behind every other (SQLite)."""
        waiting = (jobs.c.follows == job_id) & jobs.c.phase.not_in(TERMINAL)
        with reader(self.engine) as conn:
            if conn.execute(select(jobs.c.id).where(waiting).limit(1)).first() is None:
                return 0
        with self.engine.begin() as conn:
            woken = conn.execute(
                update(jobs)
                .where(jobs.c.follows == job_id, jobs.c.phase.not_in(TERMINAL))
                .values(next_run_at=self.clock())
            ).rowcount
        if woken:
            self.announcer.jobs_arrived(woken)
        return woken

    def active_by_name(self, name_key: str) -> Job | None:
        """The oldest unfinished job making a voice of this name for this account, if any."""
        job = self._get(_ACTIVE_BY_NAME, name_key)
        if job is not None:
            job.matched = "name"
        return job

    def _get(self, statement, key: str) -> Job | None:
        with reader(self.engine) as conn:
            row = conn.execute(statement, {"key": key}).first()
        return Job.from_row(row) if row else None

    def record_upload(self, job_id: str, attempt: int, events: list[dict] | None = None, **values: Any) -> bool:
        """Write what upload number ``attempt`` brought back, whoever holds the lease now: a late
        answer is never thrown away (a worker that lost its lease mid-upload still records the
        voice), and the lease is released so a worker reconciling meanwhile stops at its next write.
        False when the job has moved past that attempt."""
        values = _encode({"updated_at": self.clock(), "lease_owner": None, "lease_expires_at": None, **values})
        statement = _set("attempt", tuple(sorted(values)))
        with self.engine.begin() as conn:
            result = conn.execute(statement, _set_params(values, _job=job_id, _attempt=attempt))
            _add_events(conn, events)
        self._step_ended(job_id)
        return result.rowcount == 1

    def get(self, job_id: str) -> Job | None:
        with reader(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": job_id}).first()
        return Job.from_row(row) if row else None

    def get_by_key(self, key: str) -> Job | None:
        """The job of a stored (account-scoped, see :func:`relay.db.scoped_key`) idempotency key."""
        return self._get(_BY_KEY, key)

    def retire_key(self, job_id: str, key: str) -> bool:
        """Take ``key`` from a failed job the caller judged by :attr:`Job.failed_before_upload` (a
        failed job changes no more), so a new request with it starts afresh; True when this call
        took it (a concurrent request may have)."""
        with self.engine.begin() as conn:
            retired = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.idempotency_key == key, jobs.c.phase == FAILED)
                .values(idempotency_key=None)
            )
        return retired.rowcount == 1

    # --- leases ---------------------------------------------------------------------------

    def claim(
        self,
        owner: str,
        lease_seconds: float,
        account_limit: int = 0,
        *,
        holder: str | None = None,
        queue_timeout: float = 3600.0,
    ) -> Job | None:
        """Lease the next due job to ``owner``; None when nothing is due (see :func:`_pick`).

        ``holder``: the process (pool) claiming, which alone may take jobs whose token is in its
        memory. Unfinished work is only taken from accounts with fewer than ``account_limit``
        jobs in flight (0: no limit). On SQLite claims are serialized (``BEGIN IMMEDIATE``); on
        PostgreSQL only claims of one account are (an advisory lock per account), so the limit
        holds across processes while accounts never wait for each other. Raises
        :class:`Contended` when due work was passed over only because another claim of its
        account was under way.
        """
        with self.engine.begin() as conn:
            row = self._lease_next(conn, Claim(owner, lease_seconds, account_limit, holder, queue_timeout))
        return None if row is None else Job.from_row(row)

    def _lease_next(self, conn, claim: Claim):
        """The claim itself, in ``conn``'s transaction: the leased row, or None."""
        params = self._claim_params(claim.account_limit, claim.holder, claim.queue_timeout)
        now = params["now"]
        params.update(owner=claim.owner, lease_until=now + timedelta(seconds=claim.lease_seconds))
        if conn.dialect.name == "postgresql":
            row = self._claim_pg(conn, params, claim.account_limit)
        else:
            row = conn.execute(_claim_statement(bool(claim.account_limit)), params).first()
        if row is not None and row.account_key:  # a callback delivery takes its turn too
            self._touch_account(conn, row.account_key, last_claimed_at=now)
        return row

    def due(self, account_limit: int = 0, *, holder: str | None = None, queue_timeout: float = 3600.0) -> bool:
        """Whether :meth:`claim` (same arguments) would find a job now. A read: no lock, no write
        transaction (an empty claim is one, and queues behind every other write). It may say yes
        for work another claim is about to take, never no for work that is due."""
        params = self._claim_params(account_limit, holder, queue_timeout)
        with reader(self.engine) as conn:
            postgres = conn.dialect.name == "postgresql"
            extra = {"skip": []} if postgres else {}
            return conn.execute(_pick(bool(account_limit), postgres, False), {**params, **extra}).first() is not None

    def _claim_params(self, account_limit: int, holder: str | None, queue_timeout: float) -> dict[str, Any]:
        now = self.clock()
        return {
            "now": now,
            "account_limit": account_limit,
            "holder": holder or "",
            # Not trusted: every process with a heartbeat row counts as alive (a stopped one removed its row).
            "alive_after": now - timedelta(seconds=HOLDER_STALE_SECONDS) if self.trusts_heartbeats() else _EPOCH,
            "queue_cutoff": now - timedelta(seconds=queue_timeout),
        }

    @staticmethod
    def _claim_pg(conn, params: dict[str, Any], account_limit: int):
        skip: list[str] = []
        contended = False
        for _ in range(8):  # each round rules out one account that turned out to be full
            candidate = conn.execute(_pick(bool(account_limit), True), {**params, "skip": skip}).first()
            if candidate is None:
                if contended:
                    raise Contended()
                return None
            if (
                account_limit
                and candidate.account_key
                and candidate.phase not in TERMINAL
                and not candidate.expired
                and not candidate.looking
            ):
                # One claim per account at a time (another claimer holding it: try another account,
                # never wait — two claimers each holding one account's lock would deadlock); then
                # count what is really in flight.
                locked = conn.scalar(_ACCOUNT_LOCK, {"account": candidate.account_key})
                in_flight = locked and conn.scalar(_IN_FLIGHT, {"account": candidate.account_key, "now": params["now"]})
                if not locked or in_flight >= account_limit:
                    contended = contended or not locked
                    skip.append(candidate.account_key)
                    continue
            return conn.execute(_LEASE_BY_ID, {**params, "job": candidate.id}).first()
        if contended:
            raise Contended()
        return None

    def back_off(self, account_key: str | None, seconds: float) -> None:
        """Hold every job of ``account_key`` for ``seconds`` (useapi said 429); others go on."""
        if account_key:
            with self.engine.begin() as conn:
                self._touch_account(conn, account_key, backoff_until=self.clock() + timedelta(seconds=seconds))

    @staticmethod
    def _touch_account(conn, account_key: str, **values: Any) -> None:
        statement = _set("account", tuple(sorted(values)))
        changed = conn.execute(statement, _set_params(values, _account=account_key)).rowcount
        if not changed:
            conn.execute(insert(accounts).values(account_key=account_key, **values))

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a waiting job among its account's waiting jobs (None if not waiting);
        ``QUEUE_COUNT_LIMIT + 1`` when at least that many are ahead."""
        if job.terminal or job.phase != RECEIVED or not job.account_key:
            return None
        with reader(self.engine) as conn:
            return self._queue_position(conn, job)

    def _queue_position(self, conn, job: Job) -> int | None:
        """:meth:`queue_position`, read on ``conn`` (the transaction that wrote ``job``, say)."""
        if job.terminal or job.phase != RECEIVED or not job.account_key:
            return None
        ahead = conn.scalar(_QUEUE_AHEAD, {"account": job.account_key, "now": self.clock(), "created": job.created_at})
        return (ahead or 0) + 1

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease; False when the lease was lost to another worker."""
        now = self.clock()
        return self._guarded(job_id, owner, lease_expires_at=now + timedelta(seconds=lease_seconds))

    def update(self, job_id: str, owner: str, events: list[dict] | None = None, **values: Any) -> bool:
        """Write ``values`` if ``owner`` still holds the lease. ``events``: timeline rows
        (:func:`relay.events.row`) written in the same transaction, whatever the lease says
        (they say what this worker did)."""
        return self._guarded(job_id, owner, events, **values)

    def release(self, job_id: str, owner: str, events: list[dict] | None = None, **values: Any) -> bool:
        """Write ``values`` and give the lease up (``events`` as for :meth:`update`); requests
        waiting for the job in other processes are woken."""
        return self._guarded(job_id, owner, events, lease_owner=None, lease_expires_at=None, **values)

    def _guarded(self, job_id: str, owner: str, events: list[dict] | None = None, **values: Any) -> bool:
        values = _encode({"updated_at": self.clock(), **values})
        statement = _set("lease", tuple(sorted(values)))
        with self.engine.begin() as conn:
            result = conn.execute(statement, _set_params(values, _job=job_id, _owner=owner))
            _add_events(conn, events)
        if "lease_owner" in values and values["lease_owner"] is None:
            self._step_ended(job_id)
        return result.rowcount == 1

    def _step_ended(self, job_id: str) -> None:
        self.announcer.job_changed(job_id)  # other processes
        if self.on_change is not None:
            self.on_change(job_id)  # this one

    def uploads_in_doubt(self, account_key: str | None, job_id: str, name_key: str | None = None) -> int:
        """How many other jobs of the account have an upload whose outcome is not known yet (with
        ``name_key``: of the same voice name)."""
        same_name = [jobs.c.name_key == name_key] if name_key is not None else []
        with reader(self.engine) as conn:
            return conn.scalar(
                select(func.count()).where(
                    jobs.c.account_key == account_key, jobs.c.id != job_id, jobs.c.phase == UPLOADING, *same_name
                )
            )

    def voice_taken(self, cloned_voice_item_id: str, job_id: str) -> bool:
        """True when another job already holds this voice (a cheap first look; ``made_voice_id``'s
        unique index is what finally keeps two lost uploads from adopting one voice)."""
        with reader(self.engine) as conn:
            found = conn.scalar(
                select(jobs.c.id)
                .where(
                    or_(
                        jobs.c.cloned_voice_item_id == cloned_voice_item_id,
                        jobs.c.made_voice_id == cloned_voice_item_id,
                    ),
                    jobs.c.id != job_id,
                )
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

    def forget_heartbeat(self, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(heartbeats).where(heartbeats.c.worker_id == worker_id))

    def last_heartbeat(self) -> datetime | None:
        with reader(self.engine) as conn:
            return conn.scalar(select(heartbeats.c.seen_at).order_by(heartbeats.c.seen_at.desc()).limit(1))

    def purge(self, older_than: datetime) -> int:
        """Delete finished jobs (callbacks settled) completed before ``older_than``; the count."""
        settled = or_(jobs.c.callback_status.is_(None), jobs.c.callback_status.in_((DELIVERED, GIVEN_UP)))
        done = and_(jobs.c.phase.in_(TERMINAL), settled, jobs.c.completed_at < older_than)
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # a day's jobs at once may take longer than a request's bound
                conn.exec_driver_sql("SET LOCAL statement_timeout = '300s'")
            conn.execute(delete(job_events).where(job_events.c.job_id.in_(select(jobs.c.id).where(done))))
            gone = conn.execute(delete(jobs).where(done)).rowcount
            conn.execute(delete(heartbeats).where(heartbeats.c.seen_at < older_than))
        return gone

    def resend_callback(self, job_id: str, url: str | None = None) -> bool:
        """Deliver a finished job's callback again, from the start of the schedule (same
        ``webhook-id``), to ``url`` when given (the whole URL, opened from ``callback_sealed``).
        False when the job has not ended, has no callback URL, or a worker is delivering it now."""
        now = self.clock()
        restored = {"callback_url": url, "callback_sealed": None} if url else {}
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
                    **restored,
                )
            ).rowcount
        return changed == 1
