"""Preflight: what a process checks before it says it is listening or working — that its database answers.

A wrong or unreachable ``DATABASE_URL`` is the most common first-deploy mistake; it should read as one
line naming the host and what to do, not as a traceback after "listening on …".
"""

from __future__ import annotations

import ipaddress

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
        if " failed: FATAL:" in str(getattr(err, "orig", None) or err):  # PostgreSQL answered, and refused
            fix = (
                "Fix the database name, user or password in DATABASE_URL"
                if "does not exist" in reason or "authentication failed" in reason
                else "Check the database server and DATABASE_URL"
            )
            return f"the database server at {where} refused the connection (DATABASE_URL): {reason}. {fix}"
        return (
            f"cannot reach the database at {where} (DATABASE_URL): {reason}. "
            "Start PostgreSQL there or fix DATABASE_URL (unset it to use SQLite in RELAY_DATA_DIR)"
        )
    finally:
        if engine is not None:
            engine.dispose()
    return None


def _reason(err: Exception) -> str:
    """The driver's own reason, first line, without the "connection to server at … failed:" before
    it: 'Connection refused', 'database "x" does not exist', 'received invalid response to SSL
    negotiation: H' (a web server on that port)."""
    text_ = str(getattr(err, "orig", None) or err).strip()
    first = text_.splitlines()[0] if text_ else ""
    reason = first.rsplit(" failed: ", 1)[-1].strip().removeprefix("FATAL:").strip()
    return reason or type(err).__name__


MIN_KEY_LENGTH = 16  # characters of a random key: beyond guessing at any rate the API can answer


def open_relay_warning(settings: Settings, host: str) -> str | None:
    """A warning when the relay listens beyond this machine with no ``RELAY_API_KEY`` (every
    endpoint is then open to whoever reaches it: job answers by their URL, downloads, conversions,
    clones with their own token), or with a key short enough to guess (the API does not count
    wrong keys). None on loopback, or with a long key."""
    key = settings.relay_api_key or ""
    if len(key) >= MIN_KEY_LENGTH:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may be reached from elsewhere
    fix = "Set RELAY_API_KEY to a long random string (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    if key:
        return (
            f"warning: RELAY_API_KEY is only {len(key)} characters, and listening on {host}: a short key can be "
            f"guessed (the API does not limit wrong keys). {fix}."
        )
    return (
        f"warning: no RELAY_API_KEY, and listening on {host}: every endpoint is open to anyone who can "
        f"reach this address. {fix} before exposing it."
    )
