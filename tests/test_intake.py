"""New jobs written in groups (group commit), on SQLite and PostgreSQL.

Each test holds the database's write lock from a second connection, lets requests pile up behind
the first one, then lets go: what was waiting is written together, and every request still gets
its own job, its own conflict or its own error.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading

import psycopg
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError

from relay import db
from relay.jobs import QUEUE_COUNT_LIMIT, WORK_CHANNEL, JobStore, _GroupInsert

from .conftest import wait_until


@pytest.fixture
def store(job_settings):
    engine = db.connect(db.database_url(job_settings.database_url, job_settings.data_dir))
    db.migrate(engine)
    yield JobStore(engine)
    db.dispose(engine)


@contextlib.contextmanager
def writes_blocked(store: JobStore):
    """Hold the jobs table's write lock from outside the store until the block ends."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite":
        other = sqlite3.connect(url.database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
    else:
        with store.engine.connect() as other:
            other.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
            yield
            other.rollback()


def new_job(store: JobStore, n: int, **values):
    request = {"audio_url": "https://example.org/a.wav", "name": f"voice {n}"}
    defaults = {"request": request, "token_kind": "server", "answer": {}, "account_key": "account-a"}
    return store.create(f"{n:032x}", **{**defaults, **values})


def piled_up(store: JobStore, extra: list[dict]) -> list:
    """Job 0 starts writing and blocks; jobs 1..len(extra) queue behind it; then the lock goes.

    Returns what each create returned (or raised), in job order."""
    results: list = [None] * (len(extra) + 1)

    def run(n: int, values: dict):
        try:
            results[n] = new_job(store, n, **values)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[n] = err

    intake: _GroupInsert = store._intake
    threads = [threading.Thread(target=run, args=(0, {}))]
    with writes_blocked(store):
        threads[0].start()
        wait_until(lambda: intake._writing and not intake._queue, timeout=10)
        threads += [threading.Thread(target=run, args=(n + 1, values)) for n, values in enumerate(extra)]
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: len(intake._queue) == len(extra), timeout=10)
    for thread in threads:
        thread.join(30)
    return results


def count_writes(store: JobStore) -> list[int]:
    """How many statements insert into jobs (each is, or ends, a transaction of its own)."""
    writes = [0]

    def seen(_conn, _cursor, statement, *_args):
        if "INSERT INTO jobs" in statement:
            writes[0] += 1

    event.listen(store.engine, "before_cursor_execute", seen)
    return writes


def test_jobs_that_arrive_together_share_transactions_and_keep_their_order(store):
    writes = count_writes(store)
    results = piled_up(store, [{}] * 69)  # 1 writing, then 69 waiting: groups of 64 and 5
    assert writes[0] == 3
    jobs = sorted((job for job, created in results if created), key=lambda job: job.created_at)
    assert len(jobs) == 70 and jobs[0].id == f"{0:032x}"
    assert [job.queue_position for job in jobs] == list(range(1, 71))
    assert [store.queue_position(store.get(job.id)) for job in jobs] == list(range(1, 71))
    with db.reader(store.engine) as conn:
        assert conn.scalar(select(func.count()).select_from(db.jobs)) == 70


def test_a_taken_idempotency_key_in_a_group_answers_with_the_existing_job(store):
    results = piled_up(store, [{"idempotency_key": "same"}, {}, {"idempotency_key": "same"}, {}])
    created = [result for result in results if result[1]]
    first, repeat = results[1], results[3]
    assert len(created) == 4
    assert first[1] is True and repeat[1] is False and repeat[0].id == first[0].id
    assert store.get(f"{3:032x}") is None


def test_a_bad_job_in_a_group_fails_alone(store):
    results = piled_up(store, [{}, {"token_kind": None}, {}])
    assert isinstance(results[2], IntegrityError)
    assert all(results[n][1] for n in (0, 1, 3))
    assert store.get(f"{2:032x}") is None and store.get(f"{3:032x}") is not None


@pytest.mark.parametrize("jobs_ahead, shown", [(0, 1), (41, 42), (QUEUE_COUNT_LIMIT - 1, 100), (150, 101)])
def test_queue_positions_are_counted_up_to_the_limit(store, jobs_ahead, shown):
    ahead = [
        {
            "id": f"{n:032x}",
            "phase": "received",
            "request": "{}",
            "token_kind": "server",
            "account_key": "account-a",
            "next_run_at": db.utcnow(),
            "created_at": db.utcnow(),
            "updated_at": db.utcnow(),
        }
        for n in range(jobs_ahead)
    ]
    if ahead:
        with store.engine.begin() as conn:  # the jobs ahead, written in one go
            conn.execute(db.jobs.insert(), ahead)
    job, created = new_job(store, 10_000)
    assert created and job.queue_position == shown
    assert store.queue_position(store.get(job.id)) == shown


def test_new_jobs_are_written_in_one_round_trip_and_announced_on_postgresql(store):
    """PostgreSQL: a group's rows and its queue count go in one statement; once it committed, the
    other processes are told how many jobs arrived (NOTIFY, sent by the store's announcer thread)."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("the cross-process wake-up is a PostgreSQL case")
    url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {WORK_CHANNEL}")
        statements = count_statements(store)
        job, created = new_job(store, 100)
        assert created and job.queue_position == 1
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["1"]
        # the row and the count: one statement, committed alone (the NOTIFY comes after, apart)
        assert [word for thread, word in statements if thread != "relay-announcer"] == ["WITH"]
        results = piled_up(store, [{}] * 4)  # 1 writing, then a group of 4
        announced = 0
        for note in listener.notifies(timeout=10):
            announced += int(note.payload)  # one notification per batch: "1" and "4", or "5"
            if announced >= 5:
                break
        assert announced == 5
    assert sorted(job.queue_position for job, _created in results) == [2, 3, 4, 5, 6]


def count_statements(store: JobStore) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    event.listen(
        store.engine,
        "before_cursor_execute",
        lambda *args: seen.append((threading.current_thread().name, args[2].split()[0])),
    )
    return seen
