"""Runner: durable work done by threads — claim a due job with a lease, keep the lease alive,
hand the job to a handler, and keep the process's heartbeat. It knows nothing of voices.

A handler is built per worker thread (``make_handler(worker_id)``) and has ``process(job)``,
which moves the job one step and writes its outcome, and ``crashed(job)``, called when
``process`` raised something unexpected. Every write a handler makes is guarded by the lease
(see :class:`relay.jobs.JobStore`); when it finds the lease gone it raises :class:`LeaseLost` and
the runner drops the job: whoever holds it now goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .jobs import CHANGE_CHANNEL, HOLDER_STALE_SECONDS, WORK_CHANNEL, Claim, Contended, Job, JobStore
from .settings import Settings

log = logging.getLogger("relay.worker")
CLOCK_JUMP_SECONDS = 5  # the wall clock moved this much more (or less) than time did between heartbeats
HEARTBEAT_SECONDS = 5


class LeaseLost(Exception):
    """Another worker holds this job now: stop touching it."""


class Handler(Protocol):
    def process(self, job: Job) -> None: ...

    def crashed(self, job: Job) -> None: ...


class Spot:
    """An idle worker thread's place in line (:meth:`Notifier.wait_for_work`): woken by
    :meth:`Notifier.work_arrived`, or reserved by a request (:meth:`Notifier.reserve`), which then
    always hands it what its insert claimed for it (:meth:`hand`) — None: nothing, and the worker
    waits on as if it had never been reserved."""

    __slots__ = ("worker_id", "reserved", "job", "_called", "_seen")

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.reserved = False
        self.job: Job | None = None
        self._called = threading.Event()
        self._seen = 0  # the work generation when it was reserved

    def hand(self, job: Job | None) -> None:
        """Give the reserved worker ``job``, leased to it (None: nothing was claimed for it)."""
        self.job = job
        self._called.set()


class Notifier:
    """Wakes waiting requests and idle workers in this process when a job changes.

    A waiting request wakes only for a change of its own job (or one that concerns every job): with
    many requests waiting, each change costs one of them a database read, not all of them."""

    REMEMBERED = 4096  # jobs whose last change is remembered; older ones count as changed

    def __init__(self) -> None:
        self._changed = threading.Lock()
        self._waiting: dict[str | None, list[threading.Event]] = {}  # job id (None: any) -> waiting requests
        self._work = threading.Lock()
        self._idle: list[Spot] = []  # workers waiting for work, the most recently idle last
        self.generation = 0  # how many changes so far: read it before looking at a job
        self.work_generation = 0  # how many work_arrived() so far: read it before claiming
        self._touched: OrderedDict[str, int] = OrderedDict()  # job id -> generation of its last change
        self._forgotten = 0  # the newest generation no longer in _touched
        self._everyone = 0  # the last change that concerns every job

    def job_changed(self, job_id: str | None = None) -> None:
        """``job_id`` changed (None: anything may have, e.g. the process is stopping)."""
        with self._changed:
            self.generation += 1
            if job_id is None:
                self._everyone = self.generation
                woken = [event for events in self._waiting.values() for event in events]
            else:
                self._touched[job_id] = self.generation
                self._touched.move_to_end(job_id)
                if len(self._touched) > self.REMEMBERED:
                    _, self._forgotten = self._touched.popitem(last=False)
                woken = self._waiting.get(job_id, []) + self._waiting.get(None, [])
        for event in woken:
            event.set()

    def _concerns(self, job_id: str | None, since: int) -> bool:
        if job_id is None:
            return self.generation > since
        return max(self._everyone, self._forgotten, self._touched.get(job_id, 0)) > since

    def wait_for_change(self, timeout: float, since: int, job_id: str | None = None) -> bool:
        """Wait for a change of ``job_id`` (None: of any job) after ``since`` (a :attr:`generation`
        read earlier): return at once if one already happened, so a change between the read and
        the wait is not missed; else at the latest after ``timeout``. True when one happened.
        Only the requests waiting for the job that changed are woken."""
        with self._changed:
            if self._concerns(job_id, since):
                return True
            event = threading.Event()
            self._waiting.setdefault(job_id, []).append(event)
        try:
            event.wait(timeout)
        finally:
            with self._changed:
                waiting = self._waiting[job_id]
                waiting.remove(event)
                if not waiting:
                    del self._waiting[job_id]
        with self._changed:
            return self._concerns(job_id, since)

    def work_arrived(self, everyone: bool = False) -> None:
        """Wake one idle worker (all of them when stopping); a worker that claims a job while
        more is due wakes the next (see :meth:`Pool.run_once`)."""
        with self._work:
            self.work_generation += 1
            if everyone:
                woken, self._idle = self._idle, []
            else:
                woken = [self._idle.pop()] if self._idle else []
        for spot in woken:
            spot._called.set()

    @property
    def idle(self) -> int:
        """How many workers wait in line."""
        return len(self._idle)

    def wait_for_work(self, timeout: float | None, spot: Spot, since: int | None = None) -> bool:
        """Wait in line (``spot``: the worker's own) until woken by :meth:`work_arrived` or handed
        a job (True; the job is :attr:`Spot.job`), or for ``timeout`` seconds (False; None: until
        woken). ``since``: a :attr:`work_generation` read before looking for work — if work arrived
        after it, return at once (True), so a wake-up between the look and the wait is not lost."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._work:
            if since is not None and self.work_generation != since:
                return True
            self._line_up(spot)
        while True:
            called = spot._called.wait(None if end is None else max(end - time.monotonic(), 0))
            with self._work:
                if not called and spot in self._idle:  # nobody called it
                    self._idle.remove(spot)
                    return False
                if not spot.reserved:
                    return True
            # Reserved (perhaps as the wait ran out): the request that did so hands something over
            # once its insert has ended, whatever happened to it (relay/api.py).
            while not spot._called.wait(60):
                log.warning(
                    "an idle worker still waits for the insert that reserved it",
                    extra={"fields": {"worker": spot.worker_id}},
                )
            if spot.job is not None:
                return True
            with self._work:  # handed nothing: back in line, unless work arrived while it was out
                if self.work_generation != spot._seen:
                    return True
                self._line_up(spot)

    def _line_up(self, spot: Spot) -> None:
        spot.reserved, spot.job = False, None
        spot._called.clear()
        self._idle.append(spot)

    def reserve(self) -> Spot | None:
        """Take an idle worker out of line for a job about to be inserted (None: none is idle).
        The caller must then :meth:`Spot.hand` it something, even None: until then it waits."""
        with self._work:
            if not self._idle:
                return None
            spot = self._idle.pop()
            spot.reserved, spot._seen = True, self.work_generation
            return spot


def new_worker_id() -> str:
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Renewal:
    """Renews a lease every third of its length while a step runs."""

    def __init__(self, store: JobStore, job_id: str, owner: str, seconds: float):
        self.store, self.job_id, self.owner, self.seconds = store, job_id, owner, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{job_id[:8]}")

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.store.renew(self.job_id, self.owner, self.seconds):
                    return
            except Exception:
                log.exception("lease renewal failed", extra={"fields": {"job_id": self.job_id}})


class Listener:
    """On PostgreSQL, carries changes between processes: new jobs wake this process's idle workers
    and a job's change wakes the requests waiting for it here, within milliseconds rather than at
    their next poll. The writes' transactions send ``NOTIFY`` (see :mod:`relay.jobs`) and this
    thread ``LISTEN``s on a connection of its own; when it breaks, workers and waiters fall back to
    polling until it is back."""

    RECONNECT_SECONDS = 5.0

    def __init__(self, engine, notifier: Notifier):
        self.engine, self.notifier = engine, notifier
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while notifications arrive
        self._thread = threading.Thread(target=self._run, daemon=True, name="relay-listener")

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception:  # noqa: BLE001 - the database went away: poll until it is back
                log.warning("notifications interrupted; workers and waiters poll meanwhile", exc_info=True)
            self._stop.wait(self.RECONNECT_SECONDS)

    def _listen(self) -> None:
        raw = self.engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # a connection of its own for good, not one lent by the pool
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {WORK_CHANNEL}")
            conn.execute(f"LISTEN {CHANGE_CHANNEL}")
            self.listening.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=1.0):
                    if note.channel == WORK_CHANNEL:
                        # One worker per process: it wakes the next while a read finds more due
                        # (waking one per job in every process would set them all on the same few).
                        self.notifier.work_arrived()
                    else:
                        self.notifier.job_changed(note.payload or None)
        finally:
            self.listening.clear()
            with contextlib.suppress(Exception):
                conn.close()  # the driver's own close: no reset of a connection that may be broken
            raw.invalidate()  # and SQLAlchemy's record of it, without touching the connection again


class Pool:
    """N worker threads in this process, plus the idle poll (:meth:`_watch`), a heartbeat and periodic clean-up.

    The pool's id is the process's name in the heartbeat table; jobs whose token is held in this
    process's memory are claimed only by it (``holder``)."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        notifier: Notifier,
        threads: int,
        make_handler: Callable[[str], Handler],
        hourly: Callable[[], Any] | None = None,
    ):
        self.store, self.settings, self.notifier = store, settings, notifier
        self.id = new_worker_id()
        self.handlers = {f"{self.id}-{n}": make_handler(f"{self.id}-{n}") for n in range(threads)}
        self._hourly = hourly
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._healthy_since: float | None = None  # heartbeats without a gap since (monotonic)
        self._last_beat: tuple[float, float] | None = None  # the last heartbeat: (monotonic, wall clock)
        store.trusts_heartbeats = self._trusts_heartbeats

    def start(self) -> Pool:
        # Alive before the first job is accepted, so no other process takes this one's jobs for orphans.
        self.store.heartbeat(self.id)
        self._healthy_since = time.monotonic()
        self._last_beat = (self._healthy_since, time.time())
        for worker_id, handler in self.handlers.items():
            thread = threading.Thread(
                target=self._loop, args=(worker_id, handler), daemon=True, name=f"relay-{worker_id}"
            )
            thread.start()
            self._threads.append(thread)
        for target, name in ((self._watch, "relay-watch"), (self._housekeeping, "relay-heartbeat")):
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 25.0) -> bool:
        """Stop claiming; let running steps end within ``timeout``. True when all threads ended."""
        self._stop.set()
        self.notifier.work_arrived(everyone=True)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        stopped = not any(thread.is_alive() for thread in self._threads)
        if stopped:  # gone for good: jobs whose token was in this process's memory are for others to end
            try:
                self.store.forget_heartbeat(self.id)
            except Exception:  # noqa: BLE001 - then they wait until the heartbeat is stale
                log.warning("could not remove the heartbeat", exc_info=True)
        return stopped

    def reserve(self) -> tuple[Spot, Claim] | None:
        """An idle worker, and the claim an insert may make for it (see :meth:`JobStore.create`);
        None when no worker is idle or the pool is stopping. The caller hands the spot what the
        claim leased (``spot.hand(claim.job)``), whatever happened."""
        # PostgreSQL's insert is one statement that claims nothing (relay/jobs.py): no worker to hold back.
        if self._stop.is_set() or self.store.engine.dialect.name != "sqlite":
            return None
        spot = self.notifier.reserve()
        if spot is None:
            return None
        settings = self.settings
        claim = Claim(
            spot.worker_id,
            settings.lease_seconds,
            settings.account_concurrency,
            holder=self.id,
            queue_timeout=settings.queue_timeout_seconds,
        )
        return spot, claim

    @contextlib.contextmanager
    def reserved(self) -> Iterator[Claim | None]:
        """For inserting a job: an idle worker held out of line, and the claim the insert may make
        for it (None: no worker to hold); on leaving, the worker is handed what that claim leased,
        or nothing, whatever happened in the block — it waits for that."""
        reserved = self.reserve()
        if reserved is None:
            yield None
            return
        spot, claim = reserved
        try:
            yield claim
        finally:
            spot.hand(claim.job)

    def run_once(self, worker_id: str, handler: Handler) -> bool:
        """Claim and process one due job; False when there was none."""
        settings = self.settings
        job = self.store.claim(
            worker_id,
            settings.lease_seconds,
            settings.account_concurrency,
            holder=self.id,
            queue_timeout=settings.queue_timeout_seconds,
        )
        if job is None:
            return False
        self._run(worker_id, handler, job)
        return True

    def _run(self, worker_id: str, handler: Handler, job: Job) -> None:
        """Process ``job``, leased to ``worker_id``, while its lease is renewed."""
        settings = self.settings
        log.info("job claimed", extra={"fields": {"job_id": job.id, "phase": job.phase, "worker": worker_id}})
        with Renewal(self.store, job.id, worker_id, settings.lease_seconds):
            # More due? Wake one more idle worker, which does the same: a backlog is taken up at
            # the pace claims succeed, without waking every thread at once (nor any for nothing).
            # Asked once the lease is being renewed, and never at the job's expense.
            if self._due(default=True):
                self.notifier.work_arrived()
            try:
                handler.process(job)
            except LeaseLost:
                log.warning("lease lost", extra={"fields": {"job_id": job.id, "worker": worker_id}})
            except Exception:
                log.exception("job step crashed", extra={"fields": {"job_id": job.id, "phase": job.phase}})
                handler.crashed(job)
        self.notifier.job_changed(job.id)

    def _loop(self, worker_id: str, handler: Handler) -> None:
        spot = Spot(worker_id)
        contended = 0
        while True:
            handed, spot.job = spot.job, None  # a job an insert claimed for this worker: always done
            if handed is None and self._stop.is_set():
                return
            seen = self.notifier.work_generation
            try:
                if handed is not None:
                    self._run(worker_id, handler, handed)
                    busy = True
                else:
                    busy = self.run_once(worker_id, handler)
                contended = 0
                if busy:
                    # After a job, claim again at once only if something is due (a read): an empty
                    # claim is a write transaction that queues behind every other write. Work that
                    # arrived before this read is in it; only later arrivals cut the wait short.
                    seen = self.notifier.work_generation
                    busy = self._due(default=False)
            except Contended:
                # Another claim of the same account was under way: its turn is brief, so try again
                # soon — sooner than an idle poll, later each time (a claimer stuck holding the lock
                # must not make every idle worker spin).
                contended = min(contended + 1, 16)
                pause = min(0.005 * 2**contended, self.settings.idle_poll_seconds)
                self._stop.wait(random.uniform(pause / 2, pause))
                continue
            except Exception:  # a database hiccup: back off, never die
                log.exception("worker loop error", extra={"fields": {"worker": worker_id}})
                busy = False
            if not busy and not self._stop.is_set():
                self._wait(spot, seen)

    def _wait(self, spot: Spot, seen: int) -> None:
        """Idle until woken (by a new job, a notification, :meth:`_watch` or a stop) or handed a job."""
        self.notifier.wait_for_work(None, spot, since=seen)

    def _watch(self) -> None:
        """The pool's idle poll, for work nothing announces (retries that came due; on SQLite,
        other processes' jobs): every ``RELAY_IDLE_POLL_SECONDS``, while a worker is idle, one read
        says whether a claim would find anything, and if so one idle worker is woken to claim it.
        One read per process, not one per idle worker: an idle relay with 16 workers made 16 a
        second (8 ms of CPU a second, against 1.4 ms with one worker); an empty claim would be a write."""
        while not self._stop.wait(self.settings.idle_poll_seconds):
            if self.notifier.idle and self._due(default=True):
                self.notifier.work_arrived()

    def _due(self, default: bool) -> bool:
        """Whether work is due now (a read); ``default`` when the database cannot say."""
        settings = self.settings
        try:
            return self.store.due(
                settings.account_concurrency, holder=self.id, queue_timeout=settings.queue_timeout_seconds
            )
        except Exception:  # noqa: BLE001 - a hint only: the idle poll finds what it misses
            log.warning("could not tell whether work is due", exc_info=True)
            return default

    def _trusts_heartbeats(self) -> bool:
        """Other processes' heartbeats say who is gone only once this process's own have gone on
        without a gap, on a steady clock, for as long as a heartbeat takes to go stale."""
        since = self._healthy_since
        return since is not None and time.monotonic() - since >= HOLDER_STALE_SECONDS

    def _beat(self) -> None:
        try:
            self.store.heartbeat(self.id)
        except Exception:
            log.exception("heartbeat failed")
            self._healthy_since = None  # the database is away: nobody's heartbeat can be trusted
            return
        mono, wall = time.monotonic(), time.time()
        if self._last_beat is not None:
            gap = mono - self._last_beat[0]
            jumped = abs((wall - self._last_beat[1]) - gap) > CLOCK_JUMP_SECONDS
            if jumped or gap >= HOLDER_STALE_SECONDS:  # a jump, or a heartbeat held up: others' look old
                self._healthy_since = mono
        if self._healthy_since is None:
            self._healthy_since = mono
        self._last_beat = (mono, wall)

    def _housekeeping(self) -> None:
        last_hourly = 0.0
        cleaning: threading.Thread | None = None
        while not self._stop.is_set():
            self._beat()
            idle = cleaning is None or not cleaning.is_alive()
            if self._hourly is not None and idle and time.monotonic() - last_hourly > 3600:
                last_hourly = time.monotonic()  # once an hour, also when it fails (it logs what failed)
                # In a thread of its own: a long clean-up must not stop the heartbeats (after 30 s
                # without one, other processes would take this one for gone).
                cleaning = threading.Thread(target=self._clean_up, name="relay-hourly", daemon=True)
                cleaning.start()
            self._stop.wait(HEARTBEAT_SECONDS)

    def _clean_up(self) -> None:
        assert self._hourly is not None
        try:
            self._hourly()
        except Exception:
            log.exception("hourly clean-up failed")
