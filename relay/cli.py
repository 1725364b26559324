"""Command line: ``relay serve``, ``relay worker``, ``relay migrate``, ``relay config``, ``relay clone``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from . import __version__, create_app
from .settings import Settings, SettingsError


def _ranged(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``), refused with one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: from {low}" + (f" to {high}" if high is not None else " up")
            )
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="The voice-clone relay for useapi.net.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP relay (gunicorn)")
    serve.add_argument("--host", help="address to bind (default RELAY_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=_ranged(1, 65535), help="port to bind (default PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=_ranged(1, 64),
        default=None,
        help="gunicorn worker processes (default WEB_CONCURRENCY, else 1 on SQLite and 2 with DATABASE_URL)",
    )
    serve.add_argument(
        "--threads", type=_ranged(2, 1024), default=None, help="threads per worker (default RELAY_THREADS, else 64)"
    )
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
    clone.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for useapi.net to finish cloning (default RELAY_READY_TIMEOUT_SECONDS; 0: do not wait)."
        " Exit code: 0 ready/validated, 1 failed, 3 still processing when the wait ended",
    )
    voice = commands.add_parser("voice", help="show one cloned voice; wait while useapi.net is still cloning it")
    voice.add_argument("voice_id", help="the cloned_voice_item_id (user:…-tempolor:…-voice:…)")
    voice.add_argument("--token", default=None, help="useapi.net token (default USEAPI_TOKEN)")
    voice.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait up to this long for it to be ready (default 0)"
    )
    worker = commands.add_parser("worker", help="run job workers only (the Procfile's worker process)")
    worker.add_argument(
        "--concurrency", type=_ranged(1, 256), default=None, help="worker threads (default RELAY_WORKER_CONCURRENCY)"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            # Only a process that answers HTTP needs the rules for serving (a key beside a server token).
            settings.check_serving()
        elif args.command == "worker" and (problem := settings.unshared_database("worker process")):
            raise SettingsError(problem)
    except SettingsError as err:
        print(f"relay: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command in ("serve", "worker", "migrate"):
        from .preflight import database_problem

        problem = database_problem(settings)
        if problem:
            print(f"relay: {problem}", file=sys.stderr)
            return 2
    if args.command == "config":
        print(json.dumps(settings.describe(), indent=2))
        return 0
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "clone":
        return _clone(settings, args)
    if args.command == "voice":
        return _voice(settings, args)
    if args.command == "openapi":
        from .openapi import build_spec, to_yaml

        text = to_yaml(build_spec())
        if args.output == "-":
            sys.stdout.write(text)
        else:
            try:
                with open(args.output, "w", encoding="utf-8") as handle:
                    handle.write(text)
            except OSError as err:
                print(f"relay: cannot write {args.output}: {err.strerror or err}", file=sys.stderr)
                return 2
        return 0
    if args.command == "worker":
        return _worker(settings, settings.worker_concurrency if args.concurrency is None else args.concurrency)
    return _serve(settings, args)


EXIT_OK, EXIT_FAILED, EXIT_UNFINISHED = 0, 1, 3


def _clone(settings: Settings, args: argparse.Namespace) -> int:
    """One clone through the same pipeline steps the workers use, reported as the normalized answer.

    It waits for useapi.net to finish (``--wait``); a clone still processing then exits 3, with a
    message saying how to look at it again."""
    import uuid

    from marshmallow import ValidationError

    from . import answers, pipeline
    from .errors import InvalidRequest, MissingUpstreamToken, RelayError
    from .schemas import CloneRequestSchema, describe_validation_error

    local = os.path.isfile(args.source)
    answer = answers.blank(uuid.uuid4().hex, name=args.name, user_id=args.user_id, dry_run=args.dry_run)
    try:
        if not local and "://" not in args.source:
            what = f"{args.source!r} is a folder" if os.path.isdir(args.source) else f"No file at {args.source!r}"
            raise InvalidRequest(f"{what}: give the path of an audio file, or an http(s) URL to download.")
        try:
            # The API's own rules for every field (name, user_id, if_exists …), so both refuse the same.
            body, _ = CloneRequestSchema().load_with_warnings(
                {
                    "audio_url": "file:local" if local else args.source,
                    "name": args.name,
                    "user_id": args.user_id,
                    "if_exists": args.if_exists,
                    "dry_run": args.dry_run,
                    "convert": args.convert,
                }
            )
        except ValidationError as err:
            raise InvalidRequest(describe_validation_error(err)) from None
        request = pipeline.CloneRequest(**{k: v for k, v in body.items() if k not in ("wait_seconds", "callback_url")})
        answer.update(name=request.name, user_id=request.user_id)
        token = args.token or settings.useapi_token
        if not request.dry_run and not token:
            raise MissingUpstreamToken("No useapi.net token: pass --token, or set USEAPI_TOKEN (or use --dry-run).")
        reused = pipeline.existing_voice(request, token, settings, answer)
        if reused is None:
            with _source(args.source, local, request, settings, answer) as (spool, info):
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
        if answer["status"] == "processing" and answer["cloned_voice_item_id"]:
            wait = settings.ready_timeout_seconds if args.wait is None else args.wait
            _follow(answer, token, settings, wait)
    except RelayError as err:
        _status, answer = answers.failure(err, answer)
    return _print_answer(answer)


def _voice(settings: Settings, args: argparse.Namespace) -> int:
    """``relay voice <id>``: the voice's state as a clone answer; exit 0 ready, 1 failed or unknown, 3 processing."""
    import uuid

    from . import answers, voices
    from .errors import MissingUpstreamToken, RelayError

    answer = answers.blank(uuid.uuid4().hex, cloned_voice_item_id=args.voice_id)
    try:
        voices.check_id(args.voice_id)
        token = args.token or settings.useapi_token
        if not token:
            raise MissingUpstreamToken("No useapi.net token: pass --token, or set USEAPI_TOKEN.")
        answer.update(ok=True, status="processing")
        _follow(answer, token, settings, args.wait, just_uploaded=False)
    except RelayError as err:
        _status, answer = answers.failure(err, answer)
    return _print_answer(answer)


def _print_answer(answer: dict) -> int:
    """Print ``answer``; the exit code: 0 ready (or validated), 1 failed, 3 still processing."""
    print(json.dumps(answer, indent=2))
    if not answer["ok"]:
        return EXIT_FAILED
    return EXIT_UNFINISHED if answer["status"] == "processing" else EXIT_OK


def _follow(answer: dict, token: str, settings: Settings, wait: float, just_uploaded: bool = True) -> None:
    """Poll useapi.net until the voice in ``answer`` is ready or failed, or ``wait`` seconds pass.

    A voice useapi does not know (404) is still processing right after its upload (useapi can lag),
    and ``voice_not_found`` otherwise."""
    import time

    from . import pipeline, voices
    from .errors import CloneFailed, VoiceNotFound
    from .useapi import Useapi

    voice_id = answer["cloned_voice_item_id"]
    started = time.monotonic()
    delay = settings.poll_interval_seconds
    shown = False
    try:
        with Useapi(settings, token) as client:
            while True:
                record = client.get_voice(voice_id)
                if record is None and not just_uploaded:
                    raise VoiceNotFound(cloned_voice_item_id=voice_id, upstream_status=404)
                if record is not None:
                    item = voices.flatten({"clonedVoiceItemId": voice_id, **record})
                    answer.update({k: item[k] for k in ("item_id", "name", "user_id") if item[k] is not None})
                    answer["upstream_status"] = 200
                state = voices.status_name(record.get("status")) if record else "processing"
                if state == "ready":
                    answer.update(status="ready", message=pipeline.READY_MESSAGE)
                    return
                if state == "failed":
                    raise CloneFailed(cloned_voice_item_id=voice_id, item_id=answer["item_id"])
                elapsed = time.monotonic() - started
                if elapsed + delay > wait:
                    break
                shown = True
                line = f"\rwaiting  useapi.net is cloning the voice ({elapsed:.0f} s)"
                print(line, end="", file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(delay * 1.5, 60.0)
    finally:
        if shown:
            print(file=sys.stderr)
    answer["message"] = (
        f"useapi.net is still cloning the voice after {time.monotonic() - started:.0f} s. Follow it with: "
        f"relay voice {shlex.quote(voice_id)} --wait 600 (or GET /v1/voices/<cloned_voice_item_id> on a running relay)."
    )


def _source(source: str, local: bool, request, settings: Settings, answer: dict):
    """The audio as a spool: a local file is checked (and converted if needed) where it lies, a URL
    is downloaded safely."""
    import contextlib

    from . import pipeline
    from .errors import RequestTooLarge
    from .fetch import Spool, too_large_message

    if not local:
        return pipeline.prepared(request, settings, answer, progress=_Bar("download"))

    @contextlib.contextmanager
    def local():
        size = os.path.getsize(source)
        if size > settings.max_bytes:  # as the server refuses the same file sent to it
            raise RequestTooLarge(too_large_message(size, settings.max_bytes))
        spool = Spool(path=source, size=size, url=source, server_content_type=None, redirects=0)
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
    workers = settings.gunicorn_workers() if args.workers is None else args.workers
    if args.threads is not None:
        try:
            settings = settings.replace(threads=args.threads)
        except SettingsError as err:
            print(f"relay: configuration error: {err}", file=sys.stderr)
            return 2

    if (taken := _port_taken(host, port)) is not None:
        print(f"relay: {taken}", file=sys.stderr)
        return 2

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", settings.threads)
            # The rest as in production (Procfile, Dockerfile): relay/gunicorn_conf.py.
            copied = ("worker_class", "worker_connections", "timeout", "graceful_timeout", "keepalive", "accesslog")
            for name in (*copied, "worker_exit"):
                self.cfg.set(name, getattr(gunicorn_conf, name))
            self.cfg.set("when_ready", listening)

        def load(self):
            # Called in each worker process after the fork: the job pool's threads start there.
            return create_app(settings)

    def listening(server):  # gunicorn's hook: its sockets are bound by now
        bound = next((listener.sock.getsockname()[1] for listener in getattr(server, "LISTENERS", [])), port)
        shown = f"[{host}]" if ":" in host else host
        said = f"relay {__version__} listening on http://{shown}:{bound} ({_where(settings)})"
        print(said, file=sys.stderr, flush=True)
        gunicorn_conf.when_ready(server)  # the open-relay warning, as the Procfile's process gives it

    Server().run()
    return 0


def _port_taken(host: str, port: int) -> str | None:
    """One line when another program already listens on ``host:port`` (gunicorn would retry for 5 s
    and say "Can't connect"); None when the address is free."""
    import errno
    import socket

    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return None  # gunicorn says what else is wrong
            return (
                f"{host}:{port} is already in use by another program: stop it, or pick another port "
                f"(PORT={port + 1} relay serve, or relay serve --port {port + 1})"
            )
    return None


def _where(settings: Settings) -> str:
    """Where the jobs are kept, in a few words and without a password: "jobs in SQLite at /…/relay.db"."""
    from sqlalchemy.engine import make_url

    from . import db

    url = make_url(db.database_url(settings.database_url, settings.data_dir))
    if url.get_backend_name() == "sqlite":
        return f"jobs in SQLite at {os.path.abspath(url.database or '')}"
    return f"jobs in PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
