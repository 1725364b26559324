"""Database: the engine (embedded SQLite or PostgreSQL), the tables, and their migrations.

The schema is versioned: each migration runs once, in order, inside one transaction, under a lock
(PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``), so web and worker processes starting
together migrate exactly once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# The database did not answer (refused, dropped, restarting, locked, every pooled connection busy),
# as opposed to a statement it answered with an error (a bug): answered 503 database_unavailable.
# These classes also carry bugs (SQLite's "no such column" is an OperationalError): see unavailable().
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
_SQLITE_UNAVAILABLE = ("locked", "unable to open", "disk i/o error", "busy", "disk is full", "readonly")
# PostgreSQL SQLSTATE classes of a database that cannot be used just now: connection, transaction
# rolled back (deadlock, serialization), insufficient resources, lock not available, operator
# intervention, system (I/O) error.
_PG_UNAVAILABLE = ("08", "40", "53", "55P03", "57", "58")


def unavailable(err: BaseException) -> bool:
    """Whether ``err`` says the database could not be reached or used just now (retry later),
    rather than that a statement was wrong (a bug, with its traceback)."""
    if isinstance(err, (PoolTimeout, InterfaceError)):
        return True
    if not isinstance(err, OperationalError):
        return False
    if err.connection_invalidated:
        return True
    orig = err.orig
    code = getattr(orig, "sqlstate", None)  # PostgreSQL (psycopg): the SQLSTATE's class says which
    if code:
        return code.startswith(_PG_UNAVAILABLE)
    if type(orig).__module__.startswith("sqlite3"):
        said = str(orig).lower()
        return any(word in said for word in _SQLITE_UNAVAILABLE)
    return True  # a driver error without a code: a connection that failed before any statement


metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("phase", String(16), nullable=False),
    Column("request", Text, nullable=False),  # the clone request as JSON, never a token
    Column("status_url", Text, nullable=True),
    Column("token_kind", String(8), nullable=False),  # server | sealed | memory | none
    Column("token_sealed", Text, nullable=True),  # Fernet ciphertext, erased when the job ends
    Column("token_fingerprint", String(16), nullable=True),
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("answer", Text, nullable=True),  # the latest normalized answer as JSON
    Column("http_status", Integer, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("upload_attempts", Integer, nullable=False, default=0),
    Column("upload_started_at", DateTime, nullable=True),
    Column("accepted_at", DateTime, nullable=True),
    Column("cloned_voice_item_id", String(300), nullable=True),
    Column("item_id", String(200), nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", DateTime, nullable=True),
    Column("next_run_at", DateTime, nullable=True),
    Column("callback_url", Text, nullable=True),
    Column("callback_status", String(12), nullable=True),  # pending | delivered | given_up
    Column("callback_attempts", Integer, nullable=False, default=0),
    Column("callback_next_at", DateTime, nullable=True),
    Column("callback_last_error", Text, nullable=True),
    Column("webhook_id", String(64), nullable=True),
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("account_key", String(64), nullable=True),  # hash of (token, user_id): never the token
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("completed_at", DateTime, nullable=True),
    # When the upload's last bytes were about to go: NULL while uploading means the body never
    # completed (safe to send again); set means useapi may have the voice (reconcile, never resend).
    Column("body_sent_at", DateTime, nullable=True),
    Column("token_holder", String(64), nullable=True),  # the process whose memory holds the token
    # hash(account, name) while the job runs: if_exists=reuse|fail requests attach to a running
    # job of the same name instead of making a second voice; exclusive_key (unique) settles races.
    Column("name_key", String(64), nullable=True),
    Column("exclusive_key", String(64), nullable=True, unique=True),
    # The voice this job adopted after its upload's answer was lost; unique, so two jobs whose
    # answers were lost can never both adopt one voice. (Answered and reused voices are not set here.)
    Column("made_voice_id", String(300), nullable=True, unique=True),
    # The job this one waits for: it makes a voice of the same name for the account (if_exists=
    # reuse|fail), and this one then answers with that voice, or makes it if that job made none.
    Column("follows", String(32), nullable=True),
    # Once the callback settled: the whole callback URL sealed (RELAY_SECRET_KEY), as the stored one
    # keeps no query; "" when it had one the relay could not keep. A re-send needs it.
    Column("callback_sealed", Text, nullable=True),
    # The same for the audio link once the job no longer needs it (the stored one keeps no query):
    # the console's "Repeat this request" shows it, its secret-looking parameters masked.
    Column("audio_url_sealed", Text, nullable=True),
    Index("ix_jobs_next_run_at", "next_run_at"),
    Index("ix_jobs_created_at", "created_at", "id"),  # the console's newest-first pages
    # Clones useapi accepted and is still making: they count against the account's limit.
    Index(
        "ix_jobs_processing",
        "account_key",
        sqlite_where=text("phase = 'uploaded'"),
        postgresql_where=text("phase = 'uploaded'"),
    ),
    Index("ix_jobs_follows", "follows"),
    Index("ix_jobs_name_key", "name_key"),
    Index("ix_jobs_callback_next_at", "callback_next_at"),
    Index("ix_jobs_account_key", "account_key"),
)

accounts = Table(
    "accounts",
    metadata,
    Column("account_key", String(64), primary_key=True),
    Column("last_claimed_at", DateTime, nullable=True),  # round-robin: least recently served first
    Column("backoff_until", DateTime, nullable=True),  # after a 429 from useapi
)

heartbeats = Table(
    "heartbeats",
    metadata,
    Column("worker_id", String(64), primary_key=True),
    Column("seen_at", DateTime, nullable=False),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("detail", Text, nullable=True),  # plain words: never a token, a key or a URL's query
    Index("ix_job_events_job_id", "job_id", "id"),
)

# Files sent in the request body (multipart or raw), kept until their job no longer needs them, so
# that any worker process can work the job (relay/uploads.py).
uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("complete", Boolean, nullable=False, default=False),  # all chunks written
    Column("created_at", DateTime, nullable=False),
    Column("account_key", String(64), nullable=True),  # whose: one account holds at most half the store
)

upload_chunks = Table(
    "upload_chunks",
    metadata,
    Column("upload_id", String(32), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied_at", DateTime, nullable=False),
)


def utcnow() -> datetime:
    """Now, in UTC, without tzinfo (how every timestamp is stored)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[jobs, heartbeats])


def _v2(conn: Connection) -> None:
    # Databases made by v1 lack jobs.account_key; new ones got it from v1's create_all.
    if "account_key" not in {column["name"] for column in inspect(conn).get_columns("jobs")}:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN account_key VARCHAR(64)"))
        conn.execute(text("CREATE INDEX ix_jobs_account_key ON jobs (account_key)"))
    metadata.create_all(conn, tables=[accounts])


def _v3(conn: Connection) -> None:
    # queue_position counts an account's waiting jobs; the claim counts its jobs in flight.
    conn.execute(text("CREATE INDEX ix_jobs_account_queue ON jobs (account_key, phase, created_at, lease_expires_at)"))
    conn.execute(text("CREATE INDEX ix_jobs_lease_expires_at ON jobs (lease_expires_at)"))


def _v4(conn: Connection) -> None:
    columns = {column["name"] for column in inspect(conn).get_columns("jobs")}
    added = {
        "body_sent_at": "TIMESTAMP",
        "token_holder": "VARCHAR(64)",
        "name_key": "VARCHAR(64)",
        "exclusive_key": "VARCHAR(64)",
    }
    for name, kind in added.items():
        if name not in columns:
            conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))
    found = inspect(conn)
    indexes = found.get_indexes("jobs")
    if not any(index["name"] == "ix_jobs_name_key" for index in indexes):
        conn.execute(text("CREATE INDEX ix_jobs_name_key ON jobs (name_key)"))
    unique = [c["column_names"] for c in found.get_unique_constraints("jobs")]
    unique += [index["column_names"] for index in indexes if index.get("unique")]
    if ["exclusive_key"] not in unique:
        conn.execute(text("CREATE UNIQUE INDEX ux_jobs_exclusive_key ON jobs (exclusive_key)"))
    # A job left mid-upload by an earlier version: whether its body completed is unknown, so it
    # counts as maybe uploaded (reconciled, never sent again).
    conn.execute(text("UPDATE jobs SET body_sent_at = upload_started_at WHERE phase = 'uploading'"))
    # Idempotency keys become per account: stored as a hash of (account, key).
    rows = conn.execute(text("SELECT id, account_key, idempotency_key FROM jobs WHERE idempotency_key IS NOT NULL"))
    for job_id, account, key in rows.fetchall():
        conn.execute(
            text("UPDATE jobs SET idempotency_key = :key WHERE id = :id"),
            {"key": scoped_key(account, key), "id": job_id},
        )


def scoped_key(account_key: str | None, idempotency_key: str) -> str:
    """An ``Idempotency-Key`` as stored: bound to its account, so two accounts never share one."""
    material = f"voice-clone-relay idempotency v1\0{account_key or '-'}\0{idempotency_key}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _v5(conn: Connection) -> None:
    # The timeline of each job that the console shows (relay/events.py).
    metadata.create_all(conn, tables=[job_events])


def _v6(conn: Connection) -> None:
    # Recordings sent in the request body, until their job no longer needs them (relay/uploads.py).
    metadata.create_all(conn, tables=[uploads, upload_chunks])


def _v7(conn: Connection) -> None:
    found = inspect(conn)
    if "made_voice_id" not in {column["name"] for column in found.get_columns("jobs")}:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN made_voice_id VARCHAR(300)"))
    unique = [c["column_names"] for c in found.get_unique_constraints("jobs")]
    unique += [index["column_names"] for index in found.get_indexes("jobs") if index.get("unique")]
    if ["made_voice_id"] not in unique:
        conn.execute(text("CREATE UNIQUE INDEX ux_jobs_made_voice_id ON jobs (made_voice_id)"))


def _v8(conn: Connection) -> None:
    found = inspect(conn)
    if "follows" not in {column["name"] for column in found.get_columns("jobs")}:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN follows VARCHAR(32)"))
    if not any(index["name"] == "ix_jobs_follows" for index in found.get_indexes("jobs")):
        conn.execute(text("CREATE INDEX ix_jobs_follows ON jobs (follows)"))


def _v9(conn: Connection) -> None:
    if "callback_sealed" not in {column["name"] for column in inspect(conn).get_columns("jobs")}:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN callback_sealed TEXT"))


def _v10(conn: Connection) -> None:
    found = inspect(conn)
    if "audio_url_sealed" not in {column["name"] for column in found.get_columns("jobs")}:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN audio_url_sealed TEXT"))
    indexes = {index["name"] for index in found.get_indexes("jobs")}
    if "ix_jobs_created_at" not in indexes:
        conn.execute(text("CREATE INDEX ix_jobs_created_at ON jobs (created_at, id)"))


def _v11(conn: Connection) -> None:
    found = inspect(conn)
    if "ix_jobs_processing" not in {index["name"] for index in found.get_indexes("jobs")}:
        conn.execute(text("CREATE INDEX ix_jobs_processing ON jobs (account_key) WHERE phase = 'uploaded'"))
    if "account_key" not in {column["name"] for column in found.get_columns("uploads")}:
        conn.execute(text("ALTER TABLE uploads ADD COLUMN account_key VARCHAR(64)"))
    # Files stored before: their job's account (a file whose job is not written yet stays unnamed).
    conn.execute(
        text(
            "UPDATE uploads SET account_key = (SELECT jobs.account_key FROM jobs WHERE jobs.id = uploads.id) "
            "WHERE account_key IS NULL"
        )
    )


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs and worker heartbeats", _v1),
    (2, "per-account fairness, limits and back-off", _v2),
    (3, "indexes for queue positions and leases", _v3),
    (4, "uploads that may have been taken, pinned tokens, per-account keys and names", _v4),
    (5, "job events: each job's timeline", _v5),
    (6, "uploaded files, stored in chunks until their job is done with them", _v6),
    (7, "one job per adopted voice", _v7),
    (8, "jobs that wait for a job making a voice of the same name", _v8),
    (9, "callback URLs kept sealed for a re-send", _v9),
    (10, "audio links kept sealed for the console; jobs by creation time", _v10),
    (11, "clones useapi is making, by account; uploaded files by account", _v11),
]
LATEST = MIGRATIONS[-1][0]


def database_url(url: str | None, data_dir: str) -> str:
    """The SQLAlchemy URL: ``url`` normalized (Heroku's ``postgres://``), else SQLite in ``data_dir``."""
    if not url:
        return f"sqlite:///{os.path.abspath(os.path.join(data_dir, 'relay.db'))}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def connect(url: str, connections: int = 30) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and single-writer transactions.
    A failing statement's error never shows its parameters: they hold signed URLs and secrets.
    ``connections``: the most PostgreSQL connections the engine's pool opens (``RELAY_DATABASE_CONNECTIONS``);
    a thread that finds them all busy waits for one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(parsed.database) or ".", exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        # Writers in this process queue on a lock instead of on SQLite's busy handler, whose
        # back-off sleeps (up to 100 ms) would otherwise set the tail latency of every write.
        writers = threading.Lock()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # One writer at a time, decided when the transaction starts: no lock upgrades, no
            # "database is locked" surprises halfway through a claim. Reads (AUTOCOMMIT, see
            # reader()) take no lock at all: WAL lets them run beside the writer.
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                return
            writers.acquire()
            conn.info["relay_writer"] = True
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                # SQLAlchemy's rollback after the failed BEGIN may have released it already (_sqlite_end).
                if conn.info.pop("relay_writer", None):
                    writers.release()
                raise

        @event.listens_for(engine, "commit")
        @event.listens_for(engine, "rollback")
        def _sqlite_end(conn):
            if conn.info.pop("relay_writer", None):
                writers.release()

        read_engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            isolation_level="AUTOCOMMIT",
            hide_parameters=True,
        )
        event.listen(read_engine, "connect", _sqlite_connect)
        _readers[engine] = read_engine

        return engine
    kept = min(10, connections)
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=kept,
        max_overflow=connections - kept,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        hide_parameters=True,
        connect_args=PG_CONNECT,
    )
    event.listen(engine, "connect", _pg_bounds)
    return engine


def _pg_bounds(dbapi_connection, _record) -> None:
    """The statement and lock bounds, set once per connection. With SET rather than a startup
    ``options`` parameter, which connection poolers (PgBouncer, Neon's) refuse outright."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            cursor.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    finally:
        dbapi_connection.autocommit = autocommit


# Every wait on PostgreSQL has an end, well inside a host router's 30 s: a connection that cannot be
# made, a peer gone without a word (keepalives; unacknowledged writes: tcp_user_timeout), a statement
# that runs or waits for a lock too long (cancelled by the server: SQLSTATE 57014 / 55P03, answered
# 503 database_unavailable), a pooled connection none is free of. `relay migrate` lifts the statement
# bounds for its own transaction (an index on a large table may take longer).
POOL_TIMEOUT_SECONDS = 10
STATEMENT_TIMEOUT_MS = 15_000
LOCK_TIMEOUT_MS = 5_000
PG_CONNECT = {  # libpq's own: nothing a pooler in between sees
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}


def reader(engine: Engine) -> Connection:
    """A connection for reads only: no transaction, so no lock on SQLite."""
    return _readers.get(engine, engine).connect()


# Per engine, a second engine for reads whose connections are in autocommit from the start (so
# checking one out costs no isolation-level round trip). Weak keys: disposing an engine frees its reader.
_readers: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def dispose(engine: Engine) -> None:
    """Close every pooled connection of ``engine`` and of its reader."""
    reader_engine = _readers.pop(engine, None)
    if reader_engine is not None:
        reader_engine.dispose()
    engine.dispose()


def migrate(engine: Engine) -> int:
    """Apply every pending migration; return the schema version now in place."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SET LOCAL lock_timeout = 0"))  # another process migrating: wait for it
            conn.execute(text("SELECT pg_advisory_xact_lock(724390117)"))
        metadata.create_all(conn, tables=[schema_migrations])
        applied = set(conn.scalars(select(schema_migrations.c.version)))
        for version, name, apply in MIGRATIONS:
            if version not in applied:
                apply(conn)
                conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=utcnow()))
    return current_version(engine)


def current_version(engine: Engine) -> int:
    """The highest applied migration (0 when none)."""
    with engine.connect() as conn:
        try:
            version = conn.scalar(select(schema_migrations.c.version).order_by(schema_migrations.c.version.desc()))
        except SQLAlchemyError:  # the table itself is missing
            return 0
    return version or 0
