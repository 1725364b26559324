"""Pipeline: one clone from start to answer — download, validate, upload — with no Flask inside.

The same function serves the HTTP endpoint, the command line and the tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import answers, audio, fetch, links, urlguard, voices
from .errors import MissingUpstreamToken, RelayError, VoiceExists
from .settings import Settings
from .useapi import Useapi

log = logging.getLogger("relay.pipeline")


@dataclass
class CloneRequest:
    """A validated clone request (see :class:`relay.schemas.CloneRequestSchema`)."""

    audio_url: str
    name: str
    user_id: str | None = None
    content_type: str | None = None
    dry_run: bool = False
    if_exists: str = "create"
    metadata: dict | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """The HTTP status and normalized answer of one clone, plus what the access log wants."""

    http_status: int
    answer: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    retry_after: int | None = None


def check_before_work(request: CloneRequest, token: str | None, settings: Settings) -> None:
    """The checks that need no download: the literal URL and the presence of a token."""
    urlguard.check_literal(links.direct_download(request.audio_url)[0], settings.allowed_networks)
    if not request.dry_run and not token:
        raise MissingUpstreamToken()


def clone(request: CloneRequest, token: str | None, settings: Settings, request_id: str) -> Outcome:
    """Run one clone; every failure is returned as an answer, never raised."""
    answer = answers.blank(
        request_id,
        name=request.name,
        user_id=request.user_id,
        dry_run=request.dry_run,
        metadata=request.metadata,
        warnings=list(request.warnings),
    )
    timings: dict[str, float] = {}
    try:
        check_before_work(request, token, settings)
        if request.if_exists != "create":
            reused = _existing_voice(request, token, settings, answer)
            if reused is not None:
                return Outcome(200 if reused["status"] == "ready" else 202, answer, timings)
        url, note = links.direct_download(request.audio_url)
        if note:
            answer["warnings"].append(note)
        started = time.monotonic()
        with fetch.download(url, settings) as spool:
            timings["download_ms"] = _ms_since(started)
            info = audio.probe(spool.path, settings.min_seconds, settings.max_seconds)
            answer.update(info.as_fields())
            _check_hint(request.content_type, info, answer["warnings"])
            if request.dry_run:
                answer.update(ok=True, status="validated", message=_dry_run_message(request, info))
                return Outcome(200, answer, timings)
            started = time.monotonic()
            with Useapi(settings, token or "") as client:
                result = client.upload_voice(spool.path, spool.size, info.content_type, request.name, request.user_id)
            timings["upload_ms"] = _ms_since(started)
    except RelayError as err:
        status, answer = answers.failure(err, answer)
        return Outcome(status, answer, timings, err.retry_after)
    answer.update(
        ok=True,
        status=result.status,
        cloned_voice_item_id=result.cloned_voice_item_id,
        item_id=result.item_id,
        upstream_status=result.upstream_status,
        message=_done_message(result.status, result.message),
    )
    return Outcome(200 if result.status == "ready" else 202, answer, timings)


def _existing_voice(request: CloneRequest, token: str | None, settings: Settings, answer: dict) -> dict | None:
    """Apply ``if_exists``: fill ``answer`` and return the voice to reuse, raise, or return None."""
    if not token:  # only a dry run gets here without a token
        answer["warnings"].append(f"if_exists={request.if_exists} was not checked: no useapi token was given.")
        return None
    with Useapi(settings, token) as client:
        existing = voices.find_existing(client, request.user_id, request.name, settings.max_list_pages)
    if existing is None:
        return None
    if request.if_exists == "fail":
        raise VoiceExists(
            f"A voice named {existing['name']!r} already exists on this account "
            f"({existing['cloned_voice_item_id']}, {existing['status']}). Use if_exists=reuse to get it instead.",
            cloned_voice_item_id=existing["cloned_voice_item_id"],
            item_id=existing["item_id"],
        )
    answer.update(
        ok=True,
        status=existing["status"],
        reused=True,
        cloned_voice_item_id=existing["cloned_voice_item_id"],
        item_id=existing["item_id"],
        message=f"Reused the existing voice {existing['name']!r} ({existing['status']}); nothing was uploaded.",
    )
    return existing


def _check_hint(hint: str | None, info: audio.AudioInfo, warnings: list[str]) -> None:
    if hint and audio.format_for_content_type(hint) != info.format:
        warnings.append(
            f"content_type {hint} does not match the file, which is {info.format.upper()}; sent as {info.content_type}."
        )


def _dry_run_message(request: CloneRequest, info: audio.AudioInfo) -> str:
    account = f" for user_id {request.user_id}" if request.user_id else ""
    return (
        f"Dry run: the file is valid {info.format.upper()} ({info.duration_seconds:.1f} s, {info.size} bytes) and "
        f"would be uploaded as {info.content_type} with name {request.name!r}{account}. Nothing was uploaded."
    )


def _done_message(status: str, upstream_message: str | None) -> str:
    if status == "ready":
        return "The voice is cloned and ready: use cloned_voice_item_id with POST music/song."
    return (
        "useapi.net is still cloning the voice"
        + (f" ({upstream_message})" if upstream_message else "")
        + ". Check again later with the cloned_voice_item_id."
    )


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
