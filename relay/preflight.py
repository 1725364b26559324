"""Preflight: what a process checks before it says it is listening or working — that its database answers.

A wrong or unreachable ``DATABASE_URL`` is the most common first-deploy mistake; it should read as one
line naming the host and what to do, not as a traceback after "listening on …".
"""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import db
from .settings import Settings

CONNECT_TIMEOUT_SECONDS = 10


def database_problem(settings: Settings) -> str | None:
    """``None`` when the database answers ``SELECT 1``; else one line saying where it is and what to do."""
    url = db.database_url(settings.database_url, settings.data_dir)
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "DATABASE_URL is not a database URL: use postgres://user:password@host:5432/name, or unset it for SQLite"
    sqlite = parsed.get_backend_name() == "sqlite"
    engine = None
    try:
        if sqlite:
            engine = db.connect(url)
        else:
            # A host that drops packets would otherwise hold the start for minutes (no default timeout).
            engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as err:
        reason = _reason(err)
        if sqlite:
            return (
                f"cannot open the SQLite database {parsed.database} ({reason}): "
                "make RELAY_DATA_DIR a writable folder, or set DATABASE_URL to a PostgreSQL URL"
            )
        where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
        return (
            f"cannot reach the database at {where} (DATABASE_URL): {reason}. "
            "Start PostgreSQL there or fix DATABASE_URL (unset it to use SQLite in RELAY_DATA_DIR)"
        )
    finally:
        if engine is not None:
            engine.dispose()
    return None


def _reason(err: Exception) -> str:
    """The driver's own reason, first line, last clause: 'Connection refused', 'password authentication failed …'."""
    text_ = str(getattr(err, "orig", None) or err).strip()
    first = text_.splitlines()[0] if text_ else type(err).__name__
    return first.rsplit(": ", 1)[-1].strip() or first
