"""API: the HTTP routes. Parses and authenticates requests, shapes answers; no business logic."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from . import __version__, answers, pipeline, urlguard, voices
from .errors import (
    InvalidRequest,
    MethodNotAllowed,
    MissingUpstreamToken,
    NotFound,
    RelayError,
    RequestTooLarge,
    Unauthorized,
    VoiceNotFound,
)
from .schemas import CloneRequestSchema, VoiceQuerySchema, describe_validation_error
from .settings import Settings
from .useapi import Useapi

access_log = logging.getLogger("relay.access")
log = logging.getLogger("relay.api")

bp = Blueprint("relay", __name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
_clone_schema = CloneRequestSchema()
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


@bp.post("/v1/voice-clones")
def create_voice_clone():
    authenticate()
    body, warnings = _load(_clone_schema)
    clone_request = pipeline.CloneRequest(**body, warnings=warnings)
    g.answer.update(
        name=clone_request.name,
        user_id=clone_request.user_id,
        dry_run=clone_request.dry_run,
        metadata=clone_request.metadata,
        warnings=list(warnings),
    )
    g.log["audio_url"] = urlguard.redact(clone_request.audio_url)
    outcome = pipeline.clone(clone_request, upstream_token(), settings(), g.request_id)
    g.answer = outcome.answer
    g.log.update(outcome.timings)
    return _answer(outcome.http_status, outcome.answer, outcome.retry_after)


@bp.get("/v1/voices")
def list_voices():
    authenticate()
    query = _load_query(_voice_query_schema)
    with _useapi() as client:
        found, complete = voices.list_all(client, query["user_id"], settings().max_list_pages)
    found = voices.filtered(found, query["name"], query["name_contains"], query["status"])
    warnings = (
        []
        if complete
        else [
            f"The listing stopped after {settings().max_list_pages} pages (RELAY_MAX_LIST_PAGES); "
            "more voices may exist."
        ]
    )
    return jsonify(
        ok=True, count=len(found), voices=found, complete=complete, warnings=warnings, request_id=g.request_id
    )


@bp.get("/v1/voices/<voice_id>")
def get_voice(voice_id: str):
    authenticate()
    voices.check_id(voice_id)
    with _useapi() as client:
        record = client.get_voice(voice_id)
    if record is None:
        raise VoiceNotFound(cloned_voice_item_id=voice_id)
    item = voices.flatten({"clonedVoiceItemId": voice_id, **record})
    return jsonify(ok=True, **item, request_id=g.request_id)


@bp.delete("/v1/voices/<voice_id>")
def delete_voice(voice_id: str):
    authenticate()
    voices.check_id(voice_id)
    with _useapi() as client:
        deleted = client.delete_voice(voice_id)
    return jsonify(ok=True, deleted=deleted, cloned_voice_item_id=voice_id, request_id=g.request_id)


def authenticate() -> None:
    """Require the relay key when one is configured (constant-time comparison)."""
    key = settings().relay_api_key
    if not key:
        return
    given = request.headers.get("X-Relay-Key", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
        raise Unauthorized()


def upstream_token() -> str | None:
    """The per-request ``X-Useapi-Token`` wins over the server's ``USEAPI_TOKEN``."""
    return request.headers.get("X-Useapi-Token", "").strip() or settings().useapi_token


def _useapi() -> Useapi:
    token = upstream_token()
    if not token:
        raise MissingUpstreamToken()
    return Useapi(settings(), token)


def _load_query(schema) -> dict:
    try:
        return schema.load(request.args.to_dict())
    except ValidationError as err:
        raise InvalidRequest(describe_validation_error(err)) from None


def _load(schema: CloneRequestSchema) -> tuple[dict, list[str]]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise InvalidRequest('The request body is empty: send a JSON object such as {"audio_url": …, "name": …}.')
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not UTF-8 text: send JSON encoded as UTF-8.") from None
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply.") from None
    except ValueError as err:
        raise InvalidRequest(f"The request body is not valid JSON ({err}).") from None
    try:
        return schema.load_with_warnings(data)
    except ValidationError as err:
        raise InvalidRequest(describe_validation_error(err)) from None


def _answer(status: int, answer: dict[str, Any], retry_after: int | None = None):
    response = jsonify(answer)
    response.status_code = status
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _on_relay_error(err: RelayError):
    status, g.answer = answers.failure(err, g.get("answer") or answers.blank(g.get("request_id", "")))
    return _answer(status, g.answer, err.retry_after)


_HTTP_ERRORS = {404: NotFound, 405: MethodNotAllowed, 413: RequestTooLarge}


def _on_http_error(err: HTTPException):
    translated = _HTTP_ERRORS.get(err.code or 500)
    if translated is not None:
        return _on_relay_error(translated())
    if err.code and err.code < 500:
        return _on_relay_error(InvalidRequest(f"{err.name}: {err.description}"))
    return _on_unexpected(err)


def _on_unexpected(err: Exception):
    log.error("unexpected error", exc_info=err, extra={"fields": {"request_id": g.get("request_id")}})
    return _on_relay_error(RelayError())


def register(app: Flask) -> None:
    """Mount the routes and route every error, of any kind, through the one answer shape."""
    app.register_blueprint(bp)
    app.register_error_handler(RelayError, _on_relay_error)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_unexpected)
