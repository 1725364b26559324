"""Voices: useapi's cloned-voice records, flattened, listed across pages, found by name."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

from . import deadline
from .errors import InvalidVoiceId, UpstreamError, UpstreamInvalidAnswer, UpstreamTimeout
from .useapi import VOICE_ID as _VOICE_ID
from .useapi import Useapi, is_status

READY, PROCESSING = 30, 0
_LATE = 0.05  # seconds: a page's call that failed this close to the walk's end ran into it
VOICE_STATUSES = ("ready", "processing", "failed")
_ACCOUNT = re.compile(r"-tempolor:(.+)-voice:[^:]*$")


def check_id(cloned_voice_item_id: str) -> str:
    """Return the id if it has the shape useapi gives; raise :class:`InvalidVoiceId` otherwise."""
    if not _VOICE_ID.match(cloned_voice_item_id or ""):
        raise InvalidVoiceId()
    return cloned_voice_item_id


def status_name(upstream_status: Any) -> str:
    """useapi's numeric status as a word: 30 ready, 0 processing, any other number failed."""
    if upstream_status is None or upstream_status == "":
        return "processing"
    try:
        number = int(upstream_status)
    except (TypeError, ValueError):
        return "failed"
    return {READY: "ready", PROCESSING: "processing"}.get(number, "failed")


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One flat voice item from a useapi record (list entry or single lookup)."""
    voice_id = _text(record.get("clonedVoiceItemId"))
    account = _ACCOUNT.search(voice_id or "")
    raw_status = record.get("status")
    return {
        "cloned_voice_item_id": voice_id,
        "item_id": _text(record.get("itemId")),
        "name": _text(record.get("name")),
        "status": status_name(raw_status),
        "upstream_status_code": int(raw_status) if is_status(raw_status) else None,
        "vocal_url": _text(record.get("vocalUrl")) or None,
        "created_at": iso_from_ms(record.get("createTime")),
        "updated_at": iso_from_ms(record.get("updateTime")),
        "user_id": account.group(1) if account else _text(record.get("ucid")),
    }


class Listing(NamedTuple):
    """What a walk of the account's voices read: ``voices``, and ``stopped``: None when the listing
    was read to its end, else why it stopped short (so "not found" is never certain then)."""

    voices: list[dict[str, Any]]
    stopped: str | None

    @property
    def complete(self) -> bool:
        return self.stopped is None


MAX_VOICES = 5000  # kept from one walk: TemPolor keeps at most 50 voices an account; far more is not a listing
CUT_BY_TIME = "the time of one look-up (RELAY_LOOKUP_TIMEOUT) ran out"
CUT_BY_CURSOR = "useapi.net announced more pages without a way to them (a cursor missing or repeated)"


def list_all(client: Useapi, user_id: str | None, max_pages: int) -> Listing:
    """Every voice of the account, walking useapi's cursor pages.

    It stops short (``stopped`` says why) when ``max_pages`` was reached with more pages left, a
    cursor repeated or went missing while more pages are announced, more than :data:`MAX_VOICES`
    came (memory stays bounded whatever useapi sends), or the walk's time ran out after its first
    page: the whole walk has the total time of one look-up (``RELAY_CONNECT_TIMEOUT`` +
    ``RELAY_READ_TIMEOUT``), not one per page, and keeps what it read.
    """
    voices: list[dict[str, Any]] = []
    cursor: str | None = None
    seen: set[str] = set()
    listed: set[str] = set()  # a page repeated (useapi sent a cursor again) lists no voice twice
    unreadable = 0
    with deadline.bounded(client.settings.connect_timeout + client.settings.read_timeout) as walk:
        for read in range(max_pages):
            if read and walk.remaining() <= 0:
                return Listing(voices, CUT_BY_TIME)
            try:
                page = client.list_voices(user_id, cursor)
            except UpstreamError:
                if read and walk.remaining() <= _LATE:  # a later page ran into the walk's end
                    return Listing(voices, CUT_BY_TIME)
                raise
            for record in page["records"]:
                if record["clonedVoiceItemId"] not in listed:
                    if len(voices) >= MAX_VOICES:
                        return Listing(voices, f"useapi.net listed more than {MAX_VOICES} voices")
                    listed.add(record["clonedVoiceItemId"])
                    voices.append(flatten(record))
            unreadable += page["unreadable"]
            cursor = page["cursor"]
            if not page["hasNext"]:
                if unreadable:
                    return Listing(voices, f"useapi.net listed {unreadable} record(s) without a voice id or status")
                return Listing(voices, None)
            if not cursor or cursor in seen:  # more pages announced, and no way to them: never "that was all"
                return Listing(voices, CUT_BY_CURSOR)
            seen.add(cursor)
    return Listing(voices, f"it has more than {max_pages} pages (RELAY_MAX_LIST_PAGES)")


def filtered(
    voices: list[dict[str, Any]], name: str | None = None, name_contains: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Voices matching all given filters; names compare case-insensitively and trimmed."""
    wanted = name.strip().casefold() if name else None
    part = name_contains.strip().casefold() if name_contains else None
    return [
        voice
        for voice in voices
        if (wanted is None or (voice["name"] or "").strip().casefold() == wanted)
        and (part is None or part in (voice["name"] or "").casefold())
        and (status is None or voice["status"] == status)
    ]


def find_existing(client: Useapi, user_id: str | None, name: str, max_pages: int) -> dict[str, Any] | None:
    """The newest voice named ``name`` that has not failed (ready first), or ``None``."""
    voices, stopped = list_all(client, user_id, max_pages)
    matches = [v for v in filtered(voices, name=name) if v["status"] != "failed"]
    if not matches and stopped is not None:  # not in what was read: it may be in what was not
        said = (
            f"useapi.net's voice listing could not be read to its end ({stopped}), so the relay cannot tell "
            f"whether a voice named {name!r} exists and did not clone."
        )
        # Only a walk that ran out of time may go better later; a broken listing answers the same again.
        err = (
            UpstreamTimeout(f"{said} Try again later, or send if_exists: create.")
            if stopped == CUT_BY_TIME
            else UpstreamInvalidAnswer(f"{said} Send if_exists: create to clone without looking.")
        )
        err.listing_cut_short = True  # type: ignore[attr-defined]
        raise err
    matches.sort(key=lambda v: (v["status"] == "ready", v["created_at"] or ""), reverse=True)
    return matches[0] if matches else None


def iso_from_ms(value: Any) -> str | None:
    """Milliseconds since the epoch (a number, or its digits as text) as ISO 8601 UTC
    (``2024-05-24T15:43:45Z``), or ``None``."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    try:
        moment = datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    return None if value is None or isinstance(value, (dict, list)) else str(value)
