"""Command line: ``relay serve``, ``relay worker``, ``relay migrate``, ``relay config``, ``relay clone``."""

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
        "--workers",
        type=int,
        default=None,
        help="gunicorn worker processes (default WEB_CONCURRENCY, else 1 on SQLite and 2 with DATABASE_URL)",
    )
    serve.add_argument("--threads", type=int, default=None, help="threads per worker (default RELAY_THREADS, else 32)")
    commands.add_parser("config", help="print the effective settings, secrets masked")
    commands.add_parser("migrate", help="create or upgrade the database schema, then exit")
    spec = commands.add_parser("openapi", help="print the OpenAPI document (YAML) generated from the schemas")
    spec.add_argument("--output", default="-", help="file to write (default: stdout)")
    clone = commands.add_parser("clone", help="clone one voice from a local file or a URL, with progress")
    clone.add_argument("source", help="a local audio file, or an http(s) URL")
    clone.add_argument("--name", required=True, help="name of the cloned voice")
    clone.add_argument("--user-id", default=None, help="useapi.net TemPolor account")
    clone.add_argument("--if-exists", choices=("create", "reuse", "fail"), default="create")
    clone.add_argument("--convert", choices=("auto", "never"), default="auto", help="convert other formats (auto)")
    clone.add_argument("--dry-run", action="store_true", help="validate only; upload nothing")
    clone.add_argument("--token", default=None, help="useapi.net token (default USEAPI_TOKEN)")
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
    if args.command == "clone":
        return _clone(settings, args)
    if args.command == "openapi":
        from .openapi import build_spec, to_yaml

        text = to_yaml(build_spec())
        if args.output == "-":
            sys.stdout.write(text)
        else:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        return 0
    if args.command == "worker":
        return _worker(settings, args.concurrency or settings.worker_concurrency)
    return _serve(settings, args)


def _clone(settings: Settings, args: argparse.Namespace) -> int:
    """One clone through the same pipeline steps the workers use, reported as the normalized answer."""
    import os
    import uuid

    from . import answers, pipeline
    from .errors import RelayError

    request = pipeline.CloneRequest(
        audio_url=args.source if not os.path.exists(args.source) else "file:local",
        name=args.name.strip(),
        user_id=args.user_id,
        dry_run=args.dry_run,
        if_exists=args.if_exists,
        convert=args.convert,
    )
    token = args.token or settings.useapi_token
    answer = answers.blank(uuid.uuid4().hex, name=request.name, user_id=request.user_id, dry_run=request.dry_run)
    try:
        if not request.dry_run and not token:
            raise RelayError("No useapi.net token: pass --token or set USEAPI_TOKEN.")
        reused = pipeline.existing_voice(request, token, settings, answer)
        if reused is None:
            with _source(args.source, request, settings, answer) as (spool, info):
                if request.dry_run:
                    answer.update(ok=True, status="validated", message=pipeline.dry_run_message(request, info))
                else:
                    result = pipeline.upload(spool, info, request, token, settings, progress=_Bar("upload"))
                    answer.update(
                        ok=True,
                        status=result.status,
                        cloned_voice_item_id=result.cloned_voice_item_id,
                        item_id=result.item_id,
                        upstream_status=result.upstream_status,
                        message=pipeline.READY_MESSAGE if result.status == "ready" else pipeline.PROCESSING_MESSAGE,
                    )
        else:
            answer.update(ok=True, status=reused["status"])
    except RelayError as err:
        _status, answer = answers.failure(err, answer)
    print(json.dumps(answer, indent=2))
    return 0 if answer["ok"] else 1


def _source(source: str, request, settings: Settings, answer: dict):
    """The audio as a spool: a local file is probed where it lies, a URL is downloaded safely."""
    import contextlib
    import os

    from . import pipeline
    from .fetch import Spool

    if not os.path.exists(source):
        return pipeline.prepared(request, settings, answer, progress=_Bar("download"))

    @contextlib.contextmanager
    def local():
        spool = Spool(path=source, size=os.path.getsize(source), url=source, server_content_type=None, redirects=0)
        with pipeline.checked(spool, request, settings, answer) as (sent, info):
            yield sent, info

    return local()


class _Bar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str):
        self.label = label
        self.shown = -1

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            percent = int(done * 100 / total)
            if percent == self.shown:
                return
            self.shown = percent
            filled = percent // 4
            line = f"{self.label:8} [{'#' * filled}{'.' * (25 - filled)}] {percent:3d}% {done / 1048576:.1f} MiB"
        else:
            line = f"{self.label:8} {done / 1048576:.1f} MiB"
        end = "\n" if total and done >= total else ""
        print("\r" + line, end=end, file=sys.stderr, flush=True)


def _migrate(settings: Settings) -> int:
    from . import db

    engine = db.connect(db.database_url(settings.database_url, settings.data_dir))
    version = db.migrate(engine)
    db.dispose(engine)
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

    from gunicorn.app.base import BaseApplication

    from . import gunicorn_conf

    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    workers = args.workers or gunicorn_conf.workers

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", args.threads or gunicorn_conf.threads)
            # The rest as in production (Procfile, Dockerfile): relay/gunicorn_conf.py.
            for name in ("worker_class", "timeout", "graceful_timeout", "keepalive", "accesslog", "worker_exit"):
                self.cfg.set(name, getattr(gunicorn_conf, name))

        def load(self):
            # Called in each worker process after the fork: the job pool's threads start there.
            return create_app(settings)

    print(f"relay {__version__} listening on http://{host}:{port}", file=sys.stderr, flush=True)
    Server().run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
