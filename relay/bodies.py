"""Bodies: the three forms of ``POST /v1/voice-clones`` — JSON with ``audio_url``, multipart with
the file in part ``file``, and the raw recording as the body with the fields in the query string.

Web layer only (it reads Flask's request). A file is streamed to a temporary file on disk in
chunks, never held whole in memory, and bounded by ``RELAY_MAX_BYTES``; :func:`store` then puts
it in the database (:mod:`relay.uploads`) so any worker process can clone from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from flask import request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from . import uploads
from .errors import InvalidRequest, NotAudio, RequestTooLarge
from .schemas import CloneRequestSchema, describe_validation_error
from .settings import Settings

CHUNK = 256 * 1024
RAW_TYPES = ("audio/", "video/", "application/octet-stream")


@dataclass
class Upload:
    """A recording received in the request, on local disk until it is stored."""

    file: BinaryIO
    size: int
    sha256: str
    filename: str | None = None


def form(content_type: str) -> str:
    """``json``, ``multipart`` or ``raw``, by the request's Content-Type."""
    if content_type == "multipart/form-data":
        return "multipart"
    if content_type.startswith(RAW_TYPES):
        return "raw"
    return "json"


@contextlib.contextmanager
def clone_body(
    settings: Settings, schema: CloneRequestSchema, load_json: Callable
) -> Iterator[tuple[dict, list[str], Upload | None]]:
    """The clone request's fields, warnings and file (None for a link), whatever the form; the
    temporary file is removed when the block ends."""
    kind = form(request.mimetype or "")
    if kind == "json":
        body, warnings = load_json(schema)
        yield body, warnings, None
        return
    request.max_content_length = settings.upload_request_limit
    with tempfile.TemporaryFile(prefix="relay-upload-") as spool:
        if kind == "raw":
            fields = {key: value for key, value in request.args.items()}
            try:  # werkzeug refuses a declared length over the limit as soon as the stream is asked for
                stream = request.stream
            except RequestEntityTooLarge:
                raise RequestTooLarge(_too_large(settings.max_bytes)) from None
            received, sha256 = _copy(stream, spool, settings.max_bytes, request.content_length)
            name = None
        else:
            try:
                fields = {key: value for key, value in request.form.items()}
                part = request.files.get("file")
            except RequestEntityTooLarge:
                raise RequestTooLarge(_too_large(settings.max_bytes)) from None
            if part is None:  # a form with a link works like JSON
                if "file" in fields and "audio_url" not in fields:
                    raise InvalidRequest(
                        "The form part 'file' is text, not a file: attach the recording itself "
                        "(curl: -F file=@voice.ogg, with the @)."
                    )
                if "audio_url" not in fields:
                    raise InvalidRequest(
                        "Send the recording in a form part named 'file' (or a link in the field audio_url)."
                    )
                yield (*_load_fields(schema, fields), None)
                return
            received, sha256 = _copy(part.stream, spool, settings.max_bytes, None)
            name = part.filename
        if "audio_url" in fields:
            raise InvalidRequest("Send either a file or audio_url, not both.")
        if received == 0:
            raise NotAudio("The uploaded file is empty (0 bytes). Attach the recording itself.", audio_bytes=0)
        try:
            body, warnings = _load_fields(schema, fields, with_url=False)
        except InvalidRequest as err:
            if kind == "raw":  # the body is the file: the fields can only be in the query string
                err.message += " With the recording as the body, the fields go in the query string (?name=My%20voice)."
            raise
        spool.seek(0)
        yield body, warnings, Upload(spool, received, sha256, name)


def store(runtime, upload: Upload, job_id: str, account: str | None = None) -> uploads.Stored:
    """Put the file in the database for the job ``job_id`` of ``account`` (bounded by
    RELAY_UPLOAD_STORE_BYTES, and half of it per account)."""
    upload.file.seek(0)
    limit = runtime.settings.upload_store_bytes
    return uploads.save(runtime.engine, upload.file, upload.size, job_id, limit, account)


def _copy(source, sink: BinaryIO, limit: int, declared: int | None) -> tuple[int, str]:
    """Stream ``source`` to ``sink`` in chunks, bounded by ``limit``; ``(size, sha256)``."""
    if declared is not None and declared > limit:
        raise RequestTooLarge(_too_large(limit))
    size = 0
    digest = hashlib.sha256()
    try:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(_too_large(limit))
            digest.update(chunk)
            sink.write(chunk)
    except RequestEntityTooLarge:
        raise RequestTooLarge(_too_large(limit)) from None
    return size, digest.hexdigest()


def _too_large(limit: int) -> str:
    return f"The uploaded file is over {limit / 1048576:.1f} MiB (RELAY_MAX_BYTES)."


def _load_fields(schema: CloneRequestSchema, fields: dict, with_url: bool = True) -> tuple[dict, list[str]]:
    """Form or query-string fields: all text, so ``metadata`` arrives as JSON text."""
    data: dict = dict(fields)
    metadata = data.get("metadata")
    if isinstance(metadata, str) and metadata.strip():
        try:
            data["metadata"] = json.loads(metadata)
        except ValueError:
            raise InvalidRequest("Invalid request. metadata: must be a JSON object written as text.") from None
        except RecursionError:
            raise InvalidRequest("Invalid request. metadata: nested too deeply.") from None
    try:
        if with_url:
            return schema.load_with_warnings(data)
        return _FILE_SCHEMA.load_with_warnings(data)
    except ValidationError as err:
        raise InvalidRequest(describe_validation_error(err)) from None


_FILE_SCHEMA = CloneRequestSchema(exclude=("audio_url",))
