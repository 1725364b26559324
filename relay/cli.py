"""Command line: ``relay serve`` (gunicorn on the app) and ``relay config`` (effective settings)."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__, create_app
from .settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="The voice-clone relay for useapi.net.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP relay (gunicorn)")
    serve.add_argument("--host", help="address to bind (default RELAY_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default PORT or 8000)")
    serve.add_argument(
        "--workers", type=int, default=None, help="gunicorn worker processes (default WEB_CONCURRENCY or 2)"
    )
    serve.add_argument("--threads", type=int, default=8, help="threads per worker (default 8)")
    commands.add_parser("config", help="print the effective settings, secrets masked")
    commands.add_parser("migrate", help="create or upgrade the database schema, then exit")
    worker = commands.add_parser("worker", help="run job workers only (the Procfile's worker process)")
    worker.add_argument(
        "--concurrency", type=int, default=None, help="worker threads (default RELAY_WORKER_CONCURRENCY)"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"relay: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(settings.describe(), indent=2))
        return 0
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "worker":
        return _worker(settings, args.concurrency or settings.worker_concurrency)
    return _serve(settings, args)


def _migrate(settings: Settings) -> int:
    from . import db

    engine = db.connect(db.database_url(settings.database_url, settings.data_dir))
    version = db.migrate(engine)
    engine.dispose()
    print(f"relay: database schema at version {version}", file=sys.stderr)
    return 0


def _worker(settings: Settings, concurrency: int) -> int:
    import signal
    import threading

    from . import logs
    from .runtime import Runtime

    logs.configure(settings.log_level)
    runtime = Runtime.build(settings, concurrency)
    stop = threading.Event()

    def on_signal(signum, _frame):
        print(f"relay worker: signal {signum}, finishing running steps", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"relay worker {__version__}: {concurrency} threads", file=sys.stderr, flush=True)
    stop.wait()
    # Heroku sends SIGKILL 30 s after SIGTERM: steps still running after 25 s are left to their
    # leases, which expire and let another worker resume them from their last committed phase.
    runtime.close(timeout=25)
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from gunicorn.app.base import BaseApplication

    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    workers = args.workers or int(os.environ.get("WEB_CONCURRENCY", "2"))

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", args.threads)
            # Long enough for useapi's 120 s hold plus the download; gthread keeps heartbeats going anyway.
            self.cfg.set("timeout", int(settings.upload_timeout + settings.download_timeout + 30))
            self.cfg.set("graceful_timeout", 25)
            self.cfg.set("accesslog", None)

        def load(self):
            # Called in each worker process after the fork: the job pool's threads start there.
            return create_app(settings)

    print(f"relay {__version__} listening on http://{host}:{port}", file=sys.stderr, flush=True)
    Server().run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
