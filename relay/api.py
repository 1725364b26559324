"""API: the HTTP routes. Parses and authenticates requests, shapes answers; no business logic."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request
from marshmallow import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from . import __version__, answers, audio, bodies, db, deadline, pipeline, uploads, urlguard, voices
from .db import utcnow
from .errors import (
    DatabaseUnavailable,
    DownloadFailed,
    IdempotencyKeyReused,
    InvalidRequest,
    JobNotFound,
    MethodNotAllowed,
    MissingUpstreamToken,
    NotFound,
    RelayError,
    RequestTooLarge,
    SecretKeyRequired,
    Unauthorized,
    UpstreamError,
    UpstreamPaymentRequired,
    UpstreamUnauthorized,
    UrlNotAllowed,
    VoiceNotFound,
)
from .runtime import Runtime
from .schemas import CloneRequestSchema, VoiceQuerySchema, describe_validation_error
from .settings import Settings
from .tokens import MEMORY, account_key, check_token
from .useapi import Useapi

access_log = logging.getLogger("relay.access")
log = logging.getLogger("relay.api")

bp = Blueprint("relay", __name__)
HEARTBEAT_STALE_SECONDS = 30
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
_clone_schema = CloneRequestSchema()
_LATER_FIELDS = {"convert": "auto", "upload_id": None}
_voice_query_schema = VoiceQuerySchema()


def settings() -> Settings:
    return current_app.extensions["relay.settings"]


@bp.before_app_request
def _start() -> None:
    g.started = time.monotonic()
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    g.answer = answers.blank(g.request_id)
    g.log = {}


@bp.after_app_request
def _finish(response):
    response.headers["X-Request-Id"] = g.get("request_id", "")
    answer = g.get("answer") or {}
    fields: dict[str, Any] = {
        "request_id": g.get("request_id"),
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "duration_ms": round((time.monotonic() - g.get("started", time.monotonic())) * 1000, 1),
        "error_code": answer.get("error_code"),
        "audio_bytes": answer.get("audio_bytes"),
        **g.get("log", {}),
    }
    access_log.info("%s %s %s", request.method, request.path, response.status_code, extra={"fields": fields})
    return response


@bp.get("/healthz")
def healthz():
    return jsonify(ok=True, version=__version__)


@bp.get("/openapi.json")
def openapi_document():
    """The relay's OpenAPI 3.1 contract (no key needed), naming this relay as its server."""
    return jsonify({**_openapi(), "servers": [{"url": _public_base(), "description": "this relay"}]})


@functools.cache
def _openapi() -> dict:
    from .openapi import build_spec

    return build_spec()


@bp.get("/readyz")
def readyz():
    """Ready to serve: database reachable, schema current, a worker seen within 30 s."""
    return _readiness(need_workers=True)


@bp.get("/readyz/web")
def readyz_web():
    """Ready to take requests: database reachable and schema current. A worker's absence is reported
    but not a failure: this process still accepts and queues clones (a host's health check, which
    takes an unhealthy instance out of rotation, must not stop the API because the worker is down)."""
    return _readiness(need_workers=False)


def _readiness(need_workers: bool):
    runtime = _runtime()
    problems = []
    try:
        version = db.current_version(runtime.engine)
        heartbeat = runtime.store.last_heartbeat()
    except SQLAlchemyError as err:
        log.warning("readiness: database unreachable (%s)", type(err).__name__)
        version, heartbeat = None, None
        problems.append("database unreachable")
    notes = []
    if version is not None and version < db.LATEST:
        problems.append(f"database schema at version {version}, expected {db.LATEST}: run `relay migrate`")
    elif version is not None and version > db.LATEST:
        # A newer release migrated it (a deploy under way, or a rollback): migrations only add, so
        # this code runs on it; an instance still serving must not be taken out of rotation.
        notes.append(
            f"database schema at version {version}, newer than this code's {db.LATEST}: a deploy or rollback "
            "is under way (this code runs on it)"
        )
    age = None if heartbeat is None else round((utcnow() - heartbeat).total_seconds(), 1)
    if version is not None and (age is None or age > HEARTBEAT_STALE_SECONDS):
        missing = "no worker heartbeat in the last 30 s: start `relay worker` or set RELAY_INPROCESS_WORKERS"
        (problems if need_workers else notes).append(missing)
    response = jsonify(
        ok=not problems,
        version=__version__,
        database=version is not None,
        schema_version=version,
        schema_latest=db.LATEST,
        worker_heartbeat_age_seconds=age,
        problems=problems,
        warnings=notes,
    )
    response.status_code = 503 if problems else 200
    return response


@bp.get("/v1/auth")
def auth_check():
    """For connectors' "test connection": is the relay key right, and which useapi token applies?"""
    authenticate()
    given = request.headers.get("X-Useapi-Token", "").strip()
    source = "request" if given else ("server" if settings().useapi_token else None)
    if given:
        _check_token_can_be_kept()  # every clone with this connection would be refused: say so now
    account = None
    if source is not None:
        # One look at useapi (a page of voices: free) so a connection test fails on a token useapi
        # refuses, naming which token, instead of every clone failing later. Anything else that
        # goes wrong with the look (useapi slow or down) does not fail the relay's own check.
        token = upstream_token() or ""
        try:
            with deadline.bounded(settings().lookup_timeout), Useapi(settings(), token) as client:
                client.list_voices(None)
            account = "ok"
        except (UpstreamUnauthorized, UpstreamPaymentRequired) as err:
            which = "X-Useapi-Token" if given else "the relay's USEAPI_TOKEN"
            raise type(err)(f"{err.message} (the token checked: {which}, …{token[-4:]})", **err.fields) from None
        except UpstreamError as err:
            account = f"not checked: {err.error_code}"
    return jsonify(ok=True, version=__version__, useapi_token=source, useapi_account=account, request_id=g.request_id)


@bp.post("/v1/voice-clones")
def create_voice_clone():
    authenticate()
    with bodies.clone_body(settings(), _clone_schema, _load) as (body, warnings, upload):
        return _create_voice_clone(body, warnings, upload)


def _create_voice_clone(body: dict, warnings: list[str], upload: bodies.Upload | None):
    wait_seconds = body.pop("wait_seconds")
    callback_url = body.pop("callback_url")
    body.setdefault("audio_url", None)
    clone_request = pipeline.CloneRequest(**body, warnings=warnings)
    g.answer.update(
        name=clone_request.name,
        user_id=clone_request.user_id,
        dry_run=clone_request.dry_run,
        metadata=clone_request.metadata,
        warnings=list(warnings),
    )
    g.log["audio_url"] = "upload" if upload else urlguard.redact(clone_request.audio_url or "")
    given_token = request.headers.get("X-Useapi-Token", "").strip() or None
    pipeline.check_before_work(clone_request, given_token or settings().useapi_token, settings())
    if callback_url:
        _check_callback_url(callback_url)
    wait = _wait_seconds(wait_seconds, callback_url)
    runtime = _runtime()
    if given_token:
        _check_token_can_be_kept()
    token = given_token or settings().useapi_token
    account = account_key(token, clone_request.user_id)
    key = _idempotency_key(account)
    stored_request = clone_request.as_dict()
    # Fields added later count only when they differ from their defaults, so a key's hash stays
    # the same across versions; a file's identity is its content.
    hashed = {k: v for k, v in stored_request.items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    if upload is not None:
        hashed["file_sha256"] = upload.sha256
    request_hash = _hash({**hashed, "callback_url": callback_url})
    name_key = None if clone_request.dry_run else _name_key(account, clone_request.name)
    exclusive = clone_request.if_exists != "create" and name_key is not None
    # if_exists=reuse|fail: a voice of this name already being made for this account is this
    # request's answer too. Its job waits for that one (its own job_id, callback and metadata).
    leader = runtime.store.active_by_name(name_key) if exclusive and key is None else None
    job_id = uuid.uuid4().hex
    existing = runtime.store.get_by_key(key) if key and upload is not None else None
    if existing is not None and existing.request_hash == request_hash and existing.failed_before_upload:
        _retire(existing, key)  # taken by this request or by a concurrent repeat: the insert below says whose
        existing = None
    if upload is not None and existing is None:  # a repeat needs no second copy of the file
        stored_request["upload_id"] = bodies.store(runtime, upload, job_id, account).id
    token_kind, sealed, fingerprint = runtime.vault.seal(job_id, given_token)
    generation = runtime.notifier.generation  # before the job exists: no change to it is missed

    def create(follows) -> tuple:
        if follows is not None:
            g.answer["warnings"] = [*g.answer["warnings"], _following_note(clone_request.name, follows.id)]
        # An idle worker of this process gets its job from the insert's own transaction (SQLite):
        # no claim and no wake-up of its own on the way to the download.
        with runtime.pool.reserved() if runtime.pool is not None else contextlib.nullcontext() as claim:
            g.job_write = True
            return runtime.store.create(
                job_id,
                claim=claim,
                request=stored_request,
                status_url=f"{_public_base()}/v1/voice-clones/{job_id}",
                token_kind=token_kind,
                token_sealed=sealed,
                token_fingerprint=fingerprint,
                # A token kept in this process's memory: only this process's workers can do the job.
                token_holder=runtime.pool.id if token_kind == MEMORY and runtime.pool is not None else None,
                idempotency_key=key,
                request_hash=request_hash,
                answer=g.answer,
                callback_url=callback_url,
                webhook_id=f"msg_{job_id}",
                account_key=account,
                name_key=name_key,
                exclusive_key=name_key if exclusive and follows is None else None,
                follows=follows.id if follows is not None else None,
                dry_run=clone_request.dry_run,
            )

    if existing is not None:
        job, created = existing, False
    else:
        job, created = create(leader)
        if not created and job.matched == "key" and job.request_hash == request_hash and job.failed_before_upload:
            # Taken from the failed job by this request, or by a concurrent repeat a moment ago: the
            # insert either makes the job, or finds the one that repeat made (answered as a replay).
            _retire(job, key)
            job, created = create(leader)
        if not created and job.matched == "name":  # another request took the name since we looked
            job, created = create(job)
    if not created:
        runtime.vault.forget(job_id)
        if stored_request.get("upload_id"):  # the job that holds this key has its own copy
            uploads.delete_upload(runtime.engine, stored_request["upload_id"])
        if job.request_hash != request_hash:
            raise IdempotencyKeyReused()
        g.replayed = job
    elif job.lease_owner is None:  # not claimed at once (the reserved worker, if any, took an older job)
        runtime.notifier.work_arrived()
    g.log["job_id"] = job.id
    return _job_answer(_wait_within_budget(job, wait, generation))


@bp.get("/v1/voice-clones/<job_id>")
def get_voice_clone(job_id: str):
    # Until the job is found, this request knows nothing of the clone: an error here (wrong key,
    # unknown job) answers status null, never "failed", so a polling loop cannot take it for the clone's end.
    g.status_unknown = True
    authenticate()
    job = _runtime().store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None or not _same_account(job):
        raise JobNotFound()
    g.log["job_id"] = job.id
    answer = _job_answer(job)
    answer.status_code = 200  # reading the job worked; the body says how the clone went
    return answer


def _same_account(job) -> bool:
    """A request that names its useapi account (``X-Useapi-Token``) sees only that account's jobs,
    as if the others did not exist; one that names none (the relay key alone) sees any."""
    token = request.headers.get("X-Useapi-Token", "").strip()
    if not token or job.account_key is None:
        return True
    return account_key(token, job.request.get("user_id")) == job.account_key


def _following_note(name: str, leader_id: str) -> str:
    return (
        f"A clone of a voice named {name!r} was already running for this account (job {leader_id}): this job "
        "waits for it and answers with its voice instead of making a second one (or makes the voice itself "
        "if that job makes none)."
    )


# Callback URLs found acceptable lately, with when that check ends: a connector sends every clone to
# the same webhook, so its host is resolved once a minute, not once per clone. Safe against DNS
# rebinding because this check is only an early refusal: every delivery checks the addresses again
# and connects to the one it checked (relay/callbacks.py). Only passes are kept.
CALLBACK_CHECK_TTL = 60.0
_CALLBACK_CHECKS_MAX = 1024
_callback_checked: dict[tuple, float] = {}


def _check_callback_url(callback_url: str) -> None:
    """Refuse a callback_url now rather than give up on it later: every address its host resolves
    to must be public (or in ``RELAY_ALLOWED_NETWORKS``). A name that does not resolve right now
    is accepted with a warning (DNS may be down for a moment; delivery checks again)."""
    allowed = settings().allowed_networks
    key = (callback_url, allowed)
    now = time.monotonic()
    if _callback_checked.get(key, 0.0) > now:
        return
    try:
        _scheme, host, _port = urlguard.check_literal(callback_url, allowed)
        if not urlguard.is_address(host):  # a name: resolve it, every address must be allowed
            with deadline.bounded(settings().connect_timeout):
                urlguard.check(callback_url, allowed, deadline.resolve)
    except UrlNotAllowed as err:
        raise UrlNotAllowed(f"callback_url: {err.message}") from None
    except DownloadFailed:
        # The name does not resolve now (or not in time): a DNS hiccup is no reason to refuse a
        # clone. Every delivery checks the addresses again, and retries on its schedule.
        g.answer["warnings"].append(
            "callback_url's host could not be resolved just now; the callback is checked again when it is sent."
        )
        return
    if len(_callback_checked) >= _CALLBACK_CHECKS_MAX:
        _callback_checked.clear()
    _callback_checked[key] = now + CALLBACK_CHECK_TTL


def _name_key(account: str | None, name: str) -> str:
    material = f"voice-clone-relay name v1\0{account or '-'}\0{name.strip().casefold()}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _runtime() -> Runtime:
    return current_app.extensions["relay.runtime"]


def _check_token_can_be_kept() -> None:
    """A per-request token outlives the request only sealed (``RELAY_SECRET_KEY``) or in this process's memory."""
    runtime = _runtime()
    if not runtime.vault.durable and runtime.pool is None:
        raise SecretKeyRequired()


def _wait_seconds(asked: float | None, callback_url: str | None) -> float:
    limit = settings().max_wait_seconds
    if asked is None:
        return 0.0 if callback_url else settings().default_wait_seconds
    if asked > limit:
        # A connector may ask for its tool's limit (Make: 280 s) from a relay that must answer
        # sooner (Heroku: 30 s): waiting less is always safe, so the relay's limit wins.
        note = f"wait_seconds {asked:g} is above this relay's limit; it waits at most {limit:g} s."
        g.answer["warnings"].append(note)
        return limit
    return asked


BUSY_WARNING = (
    "Answered without waiting: this relay already has RELAY_MAX_WAITERS requests waiting. The clone goes on: "
    "poll status_url, or send a callback_url."
)


STOPPING_WARNING = (
    "Answered without waiting longer: this relay process is restarting. The clone goes on: poll status_url."
)
UNREAD_WARNING = (
    "Answered without waiting longer: the relay's database did not answer just now, so this is the job as last "
    "seen. The clone goes on: poll status_url (do not send it again)."
)


def _wait_within_budget(job, seconds: float, generation: int):
    """Wait for ``job`` only if this process has a waiter slot free (``RELAY_MAX_WAITERS``).

    A waiting request holds a server thread; a burst of them (a Make bulk scenario) must not take the
    threads that serve health checks, status polls and new clones, so past the budget the request is
    answered at once with the job's current state (202 + ``status_url``), which is always a valid answer.
    """
    if seconds <= 0 or job.terminal:
        return job
    waiters = _runtime().waiters
    if not waiters.acquire(blocking=False):
        g.not_waited = BUSY_WARNING
        return job
    try:
        return _wait_for(job, seconds, generation)
    finally:
        waiters.release()


def _wait_for(job, seconds: float, generation: int):
    """The job once it has ended, or as it is when ``seconds`` have passed.

    ``job`` is the job as the request last saw it, at notifier ``generation``: the store is read
    again after a change of this job (in this process, or on PostgreSQL in any), and besides every
    :func:`_poll_interval` (a worker in another process may end it unannounced).
    """
    runtime = _runtime()
    deadline = time.monotonic() + seconds
    while not job.terminal:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if runtime.stopping.is_set():  # SIGTERM: answer now, before the host's SIGKILL cuts the request
            g.not_waited = STOPPING_WARNING
            break
        runtime.notifier.wait_for_change(min(remaining, _poll_interval(runtime)), since=generation, job_id=job.id)
        generation = runtime.notifier.generation
        try:
            job = runtime.store.get(job.id) or job
        except SQLAlchemyError as err:
            # The job exists: an answer without it would read as a failure to retry, a second paid clone.
            log.warning("waiting request: job %s could not be read (%s)", job.id, type(err).__name__)
            g.not_waited = UNREAD_WARNING
            break
    return job


def _poll_interval(runtime) -> float:
    """How often a waiting request reads its job unprompted: rarely while other processes' changes
    arrive as notifications (PostgreSQL), four times a second otherwise (SQLite, or the listening
    connection is down)."""
    listener = runtime.listener
    return 2.0 if listener is not None and listener.listening.is_set() else 0.25


def _job_answer(job, note: str | None = None):
    answer = answers.for_job(job, utcnow())
    answer["request_id"] = g.request_id
    if note:
        answer["warnings"] = [*answer["warnings"], note]
    replayed = g.get("replayed") is not None and g.replayed.id == job.id
    if replayed:
        answer["warnings"] = [*answer["warnings"], _replay_note(job)]
    elif g.get("retired") is not None and g.retired.id != job.id:  # (a concurrent repeat's new job: a replay)
        answer["warnings"] = [*answer["warnings"], _retry_note(g.retired)]
    if g.get("not_waited") and not job.terminal:
        answer["warnings"] = [*answer["warnings"], g.not_waited]
    if answer["status"] == "queued":
        try:
            answer["queue_position"] = job.queue_position or _runtime().store.queue_position(job)
        except SQLAlchemyError as err:  # a courtesy: the job's answer matters more
            log.warning("queue position of job %s not read (%s)", job.id, type(err).__name__)
    g.answer = answer
    retry_after = (job.answer or {}).get(answers.RETRY_AFTER) if job.terminal else None
    response = _answer(answers.http_status_for_job(job), answer, retry_after)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _retire(job, key: str | None) -> None:
    """A repeat of a request whose job failed before any upload went out (a host that was down, a
    file not shared yet): the key is taken from that job so the request runs again, instead of
    getting the stored failure back for as long as the job is kept."""
    if key is not None and _runtime().store.retire_key(job.id, key):
        g.retired = job


def _replay_note(job) -> str:
    return (
        f"This Idempotency-Key was first sent at {job.created_at.isoformat(timespec='seconds')}Z: this is "
        f"job {job.id}'s answer, and nothing was done again."
    )


def _retry_note(job) -> str:
    code = (job.answer or {}).get("error_code") or "an error"
    return (
        f"This Idempotency-Key's earlier job {job.id} failed ({code}) before any upload went out, so nothing "
        "was made or paid: this request started a new job."
    )


def _idempotency_key(account: str | None) -> str | None:
    """The request's ``Idempotency-Key`` as stored: scoped to its account (see :func:`db.scoped_key`)."""
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:  # absent, or left blank by a no-code tool's header template: no key
        return None
    if len(key) > 255 or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters.")
    return db.scoped_key(account, key)


def _hash(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _public_base() -> str:
    return settings().public_url or f"{request.scheme}://{request.host}"


@bp.get("/v1/voices")
def list_voices():
    authenticate()
    query = _load_query(_voice_query_schema)
    with _lookup() as client:
        found, stopped = voices.list_all(client, query["user_id"], settings().max_list_pages)
    found = voices.filtered(found, query["name"], query["name_contains"], query["status"])
    warnings = [] if stopped is None else [f"The listing stopped before its end: {stopped}. More voices may exist."]
    return jsonify(
        ok=True,
        count=len(found),
        voices=found,
        complete=stopped is None,
        warnings=warnings,
        request_id=g.request_id,
    )


@bp.get("/v1/voices/<voice_id>")
def get_voice(voice_id: str):
    # Until useapi answered, this request knows nothing of the voice: a failed look answers status
    # null, never "failed" (the success shape's word for a failed clone).
    g.status_unknown = True
    authenticate()
    voices.check_id(voice_id)
    with _lookup() as client:
        record = client.get_voice(voice_id)
    if record is None:
        raise VoiceNotFound(cloned_voice_item_id=voice_id, upstream_status=404)
    item = voices.flatten({**record, "clonedVoiceItemId": voice_id})  # the id asked for, not a null in the record
    return jsonify(ok=True, **item, request_id=g.request_id)


@bp.delete("/v1/voices/<voice_id>")
def delete_voice(voice_id: str):
    authenticate()
    voices.check_id(voice_id)
    with _lookup() as client:
        deleted = client.delete_voice(voice_id)
    return jsonify(ok=True, deleted=deleted, cloned_voice_item_id=voice_id, request_id=g.request_id)


def authenticate() -> None:
    """Require the relay key when one is configured (constant-time comparison)."""
    relay_key, authorization = request.headers.get("X-Relay-Key", ""), request.headers.get("Authorization", "")
    if not settings().accepts_key(relay_key, authorization):
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else relay_key.strip()
        if given.startswith("YOUR_") and given.isupper():  # a shipped blueprint's placeholder, left in
            raise Unauthorized(
                f"The relay key is still the placeholder {given[:40]!r} of a shipped blueprint or workflow: put the "
                "relay's RELAY_API_KEY there (in every module that calls the relay: a Make blueprint has two)."
            )
        raise Unauthorized()
    check_token(request.headers.get("X-Useapi-Token", "").strip() or None)


def upstream_token() -> str | None:
    """The per-request ``X-Useapi-Token`` wins over the server's ``USEAPI_TOKEN``."""
    return request.headers.get("X-Useapi-Token", "").strip() or settings().useapi_token


def _useapi() -> Useapi:
    token = upstream_token()
    if not token:
        raise MissingUpstreamToken()
    return Useapi(settings(), token)


@contextlib.contextmanager
def _lookup() -> Iterator[Useapi]:
    """A voice look-up (list, read, delete) within ``RELAY_LOOKUP_TIMEOUT`` seconds in all: its
    callers give up at 30 s (Zapier, Heroku's router), and an answer after that reaches nobody."""
    with _useapi() as client, deadline.bounded(settings().lookup_timeout):
        yield client


def _load_query(schema) -> dict:
    try:
        # An unmapped filter arrives empty (?status=): that means "no filter".
        return schema.load({k: v for k, v in request.args.items() if v.strip()})
    except ValidationError as err:
        raise InvalidRequest(describe_validation_error(err)) from None


def _load(schema: CloneRequestSchema) -> tuple[dict, list[str]]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise InvalidRequest('The request body is empty: send a JSON object such as {"audio_url": …, "name": …}.')
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest(
            _misfiled(raw) or "The request body is not UTF-8 text: send JSON encoded as UTF-8."
        ) from None
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply.") from None
    except ValueError as err:
        raise InvalidRequest(_misfiled(raw) or f"The request body is not valid JSON ({err}).{_json_hint()}") from None
    try:
        return schema.load_with_warnings(data)
    except ValidationError as err:
        raise InvalidRequest(describe_validation_error(err)) from None


def _misfiled(raw: bytes) -> str | None:
    """What to change when the body read as JSON is a recording or a multipart form that was sent
    with another Content-Type (curl's --data-binary without -H, a header left over); None otherwise."""
    sent = f"sent as {request.mimetype}" if request.mimetype else "sent without a Content-Type"
    kind = audio.sniff_start(raw[:65536])
    if audio.is_recording(kind):
        media_type = audio.CONTENT_TYPES[kind][0] if kind in audio.CONTENT_TYPES else "application/octet-stream"
        return (
            f"The body is a recording ({kind.upper()}) {sent}: send it with Content-Type {media_type} and the "
            "fields in the query string (?name=…), or as multipart/form-data with the file in a part named 'file'."
        )
    if raw.startswith(b"--") and b"content-disposition: form-data" in raw[:4096].lower():
        return (
            f"The body is a multipart form {sent}: let your tool set multipart/form-data with its boundary "
            "(curl -F does; drop any -H 'Content-Type' you added)."
        )
    return None


def _json_hint() -> str:
    """What to change when the body is not JSON: most often a no-code tool sending a form."""
    kind = (request.mimetype or "").lower()
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return (
            f" It was sent as a form ({kind}): send a JSON object with 'Content-Type: application/json' instead, "
            'e.g. {"audio_url": "https://…", "name": "My voice"} (Make: Body type Raw, JSON; n8n: Body JSON).'
        )
    return (
        " Send a JSON object with 'Content-Type: application/json', "
        'e.g. {"audio_url": "https://…", "name": "My voice"}.'
    )


def _answer(status: int, answer: dict[str, Any], retry_after: int | None = None):
    response = jsonify(answer)
    response.status_code = status
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _on_relay_error(err: RelayError):
    status, g.answer = answers.failure(err, g.get("answer") or answers.blank(g.get("request_id", "")))
    if g.get("status_unknown"):
        g.answer["status"] = None
    return _answer(status, g.answer, err.retry_after)


_HTTP_ERRORS = {404: NotFound, 405: MethodNotAllowed, 413: RequestTooLarge}


def on_http_error(err: HTTPException):
    if err.code == 405:
        allowed = sorted(set(getattr(err, "valid_methods", None) or []) - {"HEAD", "OPTIONS"})
        said = f"{request.method} {request.path} is not accepted: it takes {' or '.join(allowed) or 'another method'}."
        if request.method == "GET" and "POST" in allowed:
            said += (
                " A POST that arrives as a GET was most likely redirected on its way (an http:// address sent on "
                "to https://, a missing www): send it to the final address."
            )
        response = _on_relay_error(MethodNotAllowed(said))
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response
    if err.code == 404:
        return _on_relay_error(NotFound(_not_found_hint()))
    translated = _HTTP_ERRORS.get(err.code or 500)
    if translated is not None:
        return _on_relay_error(translated())
    if err.code and err.code < 500:
        return _on_relay_error(InvalidRequest(f"{err.name}: {err.description}"))
    return _on_unexpected(err)


def _not_found_hint() -> str | None:
    """The 404's message, with the likely mistake when the path shows it (None: the default)."""
    path = request.path
    if path.count("/v1/") > 1 or "/v1/v1/" in path:
        return (
            f"No such endpoint: {path}. The address holds /v1/ twice: the relay's URL in a connector is its "
            "base address alone (https://your-relay.example.com), without /v1/voice-clones."
        )
    if path.endswith("/") and len(path) > 1:
        adapter = current_app.url_map.bind("relay")
        try:
            adapter.match(path.rstrip("/"), method=request.method)
        except HTTPException:  # no such path, or not for this method: the slash is not the mistake
            return None
        return f"No such endpoint: {path}. Drop the trailing slash: {path.rstrip('/')}."
    return None


def database_unavailable(err: Exception) -> DatabaseUnavailable:
    """The answer to a database that did not answer: named for what happened, no traceback per request."""
    log.warning(
        "database unavailable: %s",
        type(getattr(err, "orig", None) or err).__name__,
        extra={"fields": {"request_id": g.get("request_id")}},
    )
    unavailable = DatabaseUnavailable(retry_after=10)
    if g.get("job_write"):  # the job's insert may have committed before the database went away
        g.status_unknown = True
        unavailable.message += " This clone may have been stored just before: " + (
            "send it again with the same Idempotency-Key (the relay then answers with that job if it exists)."
            if request.headers.get("Idempotency-Key")
            else "look for it in the console's job list (/console) before sending it again (with an "
            "Idempotency-Key, a repeat is always safe)."
        )
    return unavailable


def _on_database_error(err: Exception):
    if not db.unavailable(err):  # a statement the database refused: a bug, with its traceback
        return _on_unexpected(err)
    return _on_relay_error(database_unavailable(err))


def _on_unexpected(err: Exception):
    log.error("unexpected error", exc_info=err, extra={"fields": {"request_id": g.get("request_id")}})
    return _on_relay_error(RelayError())


def register(app: Flask) -> None:
    """Mount the routes and route every error, of any kind, through the one answer shape."""
    app.register_blueprint(bp)
    app.register_error_handler(RelayError, _on_relay_error)
    app.register_error_handler(HTTPException, on_http_error)
    for unavailable in db.UNAVAILABLE:
        app.register_error_handler(unavailable, _on_database_error)
    app.register_error_handler(Exception, _on_unexpected)
