"""Runtime: what one process holds besides settings — the database, job store, token vault and
worker pool — built once and closed once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from . import db
from .jobs import JobStore
from .runner import Notifier, Pool
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

    @classmethod
    def build(cls, settings: Settings, workers: int = 0) -> Runtime:
        """Connect, migrate, and start ``workers`` worker threads (0: none in this process)."""
        engine = db.connect(db.database_url(settings.database_url, settings.data_dir))
        db.migrate(engine)
        runtime = cls(settings, engine, JobStore(engine), TokenVault(settings), Notifier())
        if workers:
            runtime.pool = start_pool(runtime.store, settings, runtime.vault, runtime.notifier, workers)
        return runtime

    def close(self, timeout: float = 25.0) -> None:
        """Stop the pool (running steps get ``timeout`` seconds) and release the database."""
        if self.pool is not None:
            self.pool.stop(timeout)
            self.pool = None
        db.dispose(self.engine)
