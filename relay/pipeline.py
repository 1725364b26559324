"""Pipeline: the steps of one clone — check, find an existing voice, download and validate, upload.

No Flask and no database in here: the worker strings these steps together around the job's
phases, and each step is usable on its own (tests, the command line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import audio, convert, fetch, links, stream, uploads, urlguard, voices
from .errors import MissingUpstreamToken, VoiceExists
from .settings import Settings
from .useapi import UploadBody, UploadResult, Useapi


@dataclass
class CloneRequest:
    """A validated clone request (see :class:`relay.schemas.CloneRequestSchema`). Holds no token."""

    audio_url: str | None  # None when the recording came in the request body (``upload_id``)
    name: str
    user_id: str | None = None
    content_type: str | None = None
    dry_run: bool = False
    if_exists: str = "create"
    convert: str = "auto"
    metadata: dict | None = None
    warnings: list[str] = field(default_factory=list)
    upload_id: str | None = None  # a file sent in the request, stored by relay/uploads.py

    def as_dict(self) -> dict[str, Any]:
        # A shallow copy: the caller JSON-encodes it at once, so asdict()'s deep copy is not needed.
        return {**self.__dict__, "warnings": list(self.warnings)}


def check_before_work(request: CloneRequest, token: str | None, settings: Settings) -> None:
    """The checks that need no download: the literal URL and the presence of a token."""
    if request.audio_url is not None:
        urlguard.check_literal(links.direct_download(request.audio_url)[0], settings.allowed_networks)
    if not request.dry_run and not token:
        raise MissingUpstreamToken()


def existing_voice(request: CloneRequest, token: str | None, settings: Settings, answer: dict) -> dict | None:
    """Apply ``if_exists``: the voice to reuse (``answer`` filled in), or None to go on cloning.

    Raises :class:`VoiceExists` for ``if_exists=fail``.
    """
    if request.if_exists == "create":
        return None
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
        reused=True,
        cloned_voice_item_id=existing["cloned_voice_item_id"],
        item_id=existing["item_id"],
        message=f"Reused the existing voice {existing['name']!r} ({existing['status']}); nothing was uploaded.",
    )
    return existing


def early_upload(
    request: CloneRequest,
    token: str,
    settings: Settings,
    begin: Callable[[], None],
    before_release: Callable[[], None] | None = None,
) -> stream.EarlyUpload | None:
    """An upload that may start while the file downloads (see :mod:`relay.stream`), for
    :func:`prepared`; None when ``RELAY_STREAM_MIN_BYTES`` is 0 or for a dry run.
    ``before_release()`` runs once the file is valid and all but the held-back tail has gone, just
    before the tail goes (in the upload's thread)."""
    if request.dry_run or not settings.stream_min_bytes:
        return None

    def send(growing: stream.GrowingFile, size: int, content_type: str, before_tail) -> UploadResult:
        with Useapi(settings, token) as client:
            # The body follows the download, so the call may last as long as both together.
            return client.upload_body(
                UploadBody(growing.file, size, before_tail=before_tail, source=growing),
                content_type,
                request.name,
                request.user_id,
                total=settings.download_timeout + settings.upload_timeout,
            )

    return stream.EarlyUpload(settings.stream_min_bytes, settings.download_timeout, begin, send, before_release)


@contextlib.contextmanager
def prepared(
    request: CloneRequest,
    settings: Settings,
    answer: dict,
    progress=None,
    early: stream.EarlyUpload | None = None,
    engine=None,
) -> Iterator[tuple[fetch.Spool, audio.AudioInfo]]:
    """Download and validate the audio; fill ``answer``'s audio fields and warnings; yield the
    spool file and what was learned. The file is removed when the block ends.

    The audio comes from ``request.audio_url``, or from the stored upload ``request.upload_id``
    (read from the database ``engine``). With ``early``, a large file starts uploading while it
    downloads; inside the block call ``early.finish()`` to complete that upload. If the block is
    left any other way (the download or the validation failed, or the caller raised), the upload
    is abandoned short of its length."""
    if request.upload_id is not None:
        with (
            _stored_upload(request.upload_id, engine, settings) as spool,
            checked(spool, request, settings, answer) as sent,
        ):
            yield sent
        return
    assert request.audio_url is not None
    url, note = links.direct_download(request.audio_url)
    if note and note not in answer["warnings"]:
        answer["warnings"].append(note)
    path = fetch.new_spool_path(settings.spool_dir)
    if early is not None:
        early.path, progress = path, early.progress
    meter = convert.LevelMeter()  # a WAV is measured as it arrives, not read again afterwards
    try:
        with fetch.download(url, settings, progress=progress, path=path, tap=meter.feed) as spool:
            with checked(spool, request, settings, answer, early, meter) as (sent, info):
                yield sent, info
    finally:
        if early is not None:
            early.abandon()


@contextlib.contextmanager
def _stored_upload(upload_id: str, engine, settings: Settings) -> Iterator[fetch.Spool]:
    """The source "stored upload": the file sent with the request, spooled from the database."""
    path = fetch.new_spool_path(settings.spool_dir)
    try:
        size = uploads.spool(engine, upload_id, path)
        yield fetch.Spool(path=path, size=size, url="upload", server_content_type=None, redirects=0)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# The answer's key (hidden from every answer shown: see answers.for_job) holding what the last
# validation said of the file, so that a retry that validates another file replaces it.
AUDIO_WARNINGS = "_audio_warnings"


@contextlib.contextmanager
def checked(
    spool: fetch.Spool,
    request: CloneRequest,
    settings: Settings,
    answer: dict,
    early: stream.EarlyUpload | None = None,
    meter: convert.LevelMeter | None = None,
) -> Iterator[tuple[fetch.Spool, audio.AudioInfo]]:
    """Validate, measure and if needed convert a spooled file (:func:`relay.convert.prepare`;
    ``meter``: what measured it while it downloaded); fill ``answer``; yield what to upload (a
    converted file is removed when the block ends). An early upload of the original bytes is
    withdrawn when what is sent is a converted file."""
    prepared = convert.prepare(spool.path, settings, request.convert, workdir=settings.spool_dir, meter=meter)
    try:
        answer.update(prepared.as_fields())
        # What an earlier attempt said of the file it had (a link may serve another file this time)
        # goes; what is said of this one is remembered for the next attempt (never shown: see answers).
        earlier = answer.pop(AUDIO_WARNINGS, [])
        said = list(prepared.warnings)
        info = prepared.info
        hint = request.content_type
        if hint and not prepared.converted and audio.format_for_content_type(hint) != info.format:
            said.append(
                f"content_type {hint} does not match the file, which is {info.format.upper()}; "
                f"sent as {info.content_type}."
            )
        kept = [w for w in answer["warnings"] if w not in earlier]
        answer["warnings"] = kept + [w for w in said if w not in kept]
        answer[AUDIO_WARNINGS] = said
        if early is not None and early.started and early.size != spool.size:
            early.withdraw()  # it declared another length than the file has: send the file afterwards
        if not prepared.converted:
            yield spool, info
            return
        if early is not None:
            early.withdraw()  # its bytes are not what will be sent; the converted file goes up instead
        yield dataclasses.replace(spool, path=prepared.path, size=info.size), info
    finally:
        if prepared.converted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prepared.path)


def upload(
    spool: fetch.Spool,
    info: audio.AudioInfo,
    request: CloneRequest,
    token: str,
    settings: Settings,
    progress=None,
    before_tail: Callable[[], None] | None = None,
) -> UploadResult:
    """Stream the validated file to useapi.net. Never retried here. ``progress(sent, total)``;
    ``before_tail()`` runs just before the body's last bytes go (see :meth:`Useapi.upload_body`)."""
    with Useapi(settings, token) as client:
        return client.upload_voice(
            spool.path,
            spool.size,
            info.content_type,
            request.name,
            request.user_id,
            progress=progress,
            before_tail=before_tail,
        )


def dry_run_message(request: CloneRequest, info: audio.AudioInfo) -> str:
    account = f" for user_id {request.user_id}" if request.user_id else ""
    return (
        f"Dry run: the file is valid {info.format.upper()} ({info.duration_seconds:.1f} s, {info.size} bytes) and "
        f"would be uploaded as {info.content_type} with name {request.name!r}{account}. Nothing was uploaded."
    )


READY_MESSAGE = "The voice is cloned and ready: use cloned_voice_item_id with POST music/song."
PROCESSING_MESSAGE = "useapi.net is still cloning the voice; the relay checks until it is ready."
