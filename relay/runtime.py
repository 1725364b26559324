"""Runtime: what one process holds besides settings — the database, job store, token vault and
worker pool — built once and closed once."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine

from . import db
from .jobs import JobStore
from .runner import Listener, Notifier, Pool
from .settings import Settings
from .tokens import TokenVault
from .worker import start_pool

log = logging.getLogger("relay.runtime")


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    store: JobStore
    vault: TokenVault
    notifier: Notifier
    pool: Pool | None = None
    listener: Listener | None = None  # PostgreSQL: changes made by other processes
    # Requests waiting for their clone in this process (RELAY_MAX_WAITERS): the rest answer 202 at once.
    waiters: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    # Set when the web process is told to stop (relay/server.py): waiting requests answer at once.
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, settings: Settings, workers: int = 0) -> Runtime:
        """Connect, migrate, and start ``workers`` worker threads (0: none in this process)."""
        engine = db.connect(db.database_url(settings.database_url, settings.data_dir), settings.database_connections)
        db.migrate(engine)
        runtime = cls(settings, engine, JobStore(engine), TokenVault(settings), Notifier())
        runtime.store.on_change = runtime.notifier.job_changed  # a step's end wakes its waiters here at once
        runtime.waiters = threading.BoundedSemaphore(settings.waiter_budget)
        if engine.dialect.name == "postgresql":  # before the pool: no notification is missed
            runtime.listener = Listener(engine, runtime.notifier).start()
        if workers:
            try:
                runtime.pool = start_pool(runtime.store, settings, runtime.vault, runtime.notifier, workers)
            except BaseException:
                if runtime.listener is not None:
                    runtime.listener.stop()
                raise
        return runtime

    def close(self, timeout: float = 25.0) -> None:
        """Stop the pool (running steps get ``timeout`` seconds) and release the database."""
        if self.pool is not None:
            self.pool.stop(timeout)
            self.pool = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        self.store.announcer.close()
        db.dispose(self.engine)
