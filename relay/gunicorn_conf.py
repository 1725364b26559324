"""Gunicorn settings for the relay (``gunicorn -c python:relay.gunicorn_conf 'relay:create_app()'``).

Threaded workers (relay/server.py: gthread whose event loop reads each request whole first) suit
long upstream calls; the timeout stays above the longest wait a request may ask for; on exit each
worker stops its job pool so running steps can end or are handed back.
"""

from __future__ import annotations

import os
import sys

from relay.settings import Settings, SettingsError

try:
    _settings = Settings.from_env().check_serving()
except SettingsError as err:
    # gunicorn would print a traceback for an exception here: one line, as every relay command does.
    print(f"relay: configuration error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

bind = f"{os.environ.get('RELAY_BIND_HOST', '0.0.0.0')}:{_settings.port}"
# A slow client's request is read by the worker's event loop, not by a thread (relay/server.py).
worker_class = "relay.server.RelayWorker"
# SQLite (no DATABASE_URL) serializes writers: one process with threads serves it best.
workers = _settings.gunicorn_workers()
# A request that waits for its clone holds a thread for up to RELAY_MAX_WAIT_SECONDS, but at most
# RELAY_MAX_WAITERS of them (default 3/4 of the threads) wait at once; beyond that a clone is
# answered 202 at once, so the other threads always serve new requests. Threads cost little
# memory, and new jobs from requests arriving together are written in one transaction.
threads = _settings.threads
# gthread workers keep heartbeating while requests wait, but keep the hard limit above any wait.
timeout = int(max(_settings.max_wait_seconds, _settings.upload_timeout) + 60)
graceful_timeout = 25  # Heroku and Render send SIGKILL 30 s after SIGTERM
keepalive = 5
# Connections a worker process holds at once (gunicorn's default, said here because the event loop
# counts on it): requests still arriving may take at most 3/4 of them, the oldest is answered 408
# past that (relay/server.py), so whole requests are always accepted.
worker_connections = 1000
accesslog = None  # the relay writes its own JSON access line per request


def on_starting(server):  # noqa: ARG001 - gunicorn's hook signature
    """Before gunicorn listens: an unreachable database is one line and exit 2, not a traceback per worker."""
    from relay.preflight import database_problem

    problem = database_problem(_settings)
    if problem:
        print(f"relay: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def when_ready(server):
    """Sockets bound: say so if the relay is open to everyone who can reach it."""
    from relay.preflight import open_relay_warning

    for address in server.cfg.address:  # what gunicorn bound (-b and GUNICORN_CMD_ARGS included)
        if isinstance(address, tuple) and (warning := open_relay_warning(_settings, str(address[0]))):
            print(f"relay: {warning}", file=sys.stderr, flush=True)


def worker_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("relay.runtime") if app is not None else None
    if runtime is not None:
        runtime.close(timeout=20)
