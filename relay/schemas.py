"""Schemas: the request bodies the relay takes and the one answer shape it gives."""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .audio import ACCEPTED_CONTENT_TYPES
from .errors import all_error_classes
from .voices import VOICE_STATUSES

METADATA_MAX_BYTES = 4096
IF_EXISTS = ("create", "reuse", "fail")
CONVERT_MODES = ("auto", "never")


class Text(fields.String):
    """A string, trimmed."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).strip()


class Identifier(Text):
    """A trimmed string; a number is taken as its text (no-code tools send ids as numbers)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return super()._deserialize(value, attr, data, **kwargs)


# Characters that draw nothing although Unicode does not class them as spaces or format characters.
_BLANK_LOOKING = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Unicode's control characters (category Cc) are exactly these 65: one search instead of a lookup per character.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _visible_name(value: str) -> None:
    """A voice name must be printable text that shows something: no NUL, tabs or other control
    characters (they break lists and files downstream), and not made only of invisible characters."""
    if _CONTROL.search(value):
        raise ValidationError("Must not contain control characters (NUL, tab, line breaks …).")
    if _SURROGATE.search(value):  # half of a UTF-16 pair: not a character, and not storable as UTF-8
        raise ValidationError("Must be valid Unicode text (it contains half of a UTF-16 surrogate pair).")
    if value and all(unicodedata.category(ch)[0] in "CZM" or ch in _BLANK_LOOKING for ch in value):
        raise ValidationError("Must contain visible characters, not only spaces or invisible ones.")


def _metadata_size(value: dict) -> None:
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > METADATA_MAX_BYTES:
        raise ValidationError(f"Must be at most {METADATA_MAX_BYTES} bytes as JSON (got {size}).")


class _JsonObject(fields.Dict):
    """A JSON object, or the same written as text: a no-code tool's free-form field (Make's ``any``)
    sends an object its user typed as a string."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValidationError("Must be a JSON object, or one written as JSON text.") from None
            except RecursionError:
                raise ValidationError("Nested too deeply.") from None
        return super()._deserialize(value, attr, data, **kwargs)


class CloneRequestSchema(Schema):
    """Body of ``POST /v1/voice-clones``. Unknown fields are ignored and named in ``warnings``."""

    class Meta:
        unknown = EXCLUDE

    audio_url = Text(
        required=True,
        validate=validate.Length(min=1, max=4096),
        metadata={"description": "Public http(s) link to the recording (Drive and Dropbox share links work)."},
    )
    name = Text(
        required=True,
        validate=[validate.Length(min=1, max=100), _visible_name],
        metadata={
            "description": "Name for the cloned voice, 1-100 characters after trimming; no control characters, "
            "and not only invisible ones."
        },
    )
    user_id = Identifier(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "useapi.net TemPolor account; omit to use the token's default account."},
    )
    content_type = Text(
        load_default=None,
        allow_none=True,
        validate=validate.OneOf(ACCEPTED_CONTENT_TYPES),
        metadata={"description": "Optional hint; the format detected from the bytes always decides."},
    )
    dry_run = fields.Boolean(
        load_default=False,
        metadata={"description": "Download and validate, but do not upload; answers what would be sent."},
    )
    wait_seconds = fields.Float(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=0),
        metadata={
            "description": "Seconds to wait for the final answer (0 to RELAY_MAX_WAIT_SECONDS; default "
            "RELAY_DEFAULT_WAIT_SECONDS, or 0 with a callback_url). Past it: 202 with job_id and status_url."
        },
    )
    callback_url = Text(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=4096),
        metadata={"description": "Public http(s) URL that receives the final answer as a signed POST."},
    )
    if_exists = fields.String(
        load_default="create",
        validate=validate.OneOf(IF_EXISTS),
        metadata={
            "description": "create: always clone; reuse: answer with the account's voice of the same name "
            "instead of uploading (reused: true); fail: 409 voice_exists if such a voice exists."
        },
    )
    convert = fields.String(
        load_default="auto",
        validate=validate.OneOf(CONVERT_MODES),
        metadata={
            "description": "auto: a recording in another format (Ogg/Opus, WebM, AAC, AIFF, AMR, 3GP, CAF, WMA, "
            "a video…) is converted to one useapi takes; never: refuse it (unsupported_audio_format)."
        },
    )
    metadata = _JsonObject(
        load_default=None,
        allow_none=True,
        validate=_metadata_size,
        metadata={"description": "Any JSON object up to 4 KB (or the same as JSON text), echoed back as an object."},
    )

    def load_with_warnings(self, data: Any) -> tuple[dict, list[str]]:
        """Load ``data``; return the clean request and warnings naming ignored fields."""
        if not isinstance(data, dict):
            raise ValidationError({"_schema": ["The body must be a JSON object."]})
        # No-code tools send "" (or whitespace) for a field left empty: that means "not given".
        data = {
            key: value
            for key, value in data.items()
            if not (key in _OPTIONAL and (value is None or (isinstance(value, str) and not value.strip())))
        }
        for key in ("content_type", "if_exists"):  # case does not matter ("Reuse", "audio/MPEG")
            if isinstance(data.get(key), str):
                data[key] = data[key].strip().lower()
        unknown = sorted(key for key in data if key not in self.fields)
        try:
            loaded = self.load(data)
        except ValidationError as err:
            # A request that fails is when a misspelt field name ("url", "Audio_URL") is worth a word.
            if unknown and isinstance(err.messages, dict):
                named = [f"'{key}'" + self._near(key) for key in unknown]
                raise ValidationError({**err.messages, "unknown fields": [", ".join(named)]}) from None
            raise
        warnings = [f"Unknown field '{key}' was ignored." for key in unknown]
        return loaded, warnings

    def _near(self, key: str) -> str:
        """A hint naming the field ``key`` was probably meant to be (the same letters in another
        case, or close): ``" (did you mean 'audio_url'?)"``; empty when none is close."""
        names = {name.lower(): name for name in self.fields}
        close = difflib.get_close_matches(str(key).lower(), list(names), n=1, cutoff=0.5)
        return f" (did you mean '{names[close[0]]}'?)" if close else ""


_OPTIONAL = (
    "user_id",
    "content_type",
    "dry_run",
    "wait_seconds",
    "callback_url",
    "if_exists",
    "convert",
    "metadata",
)


def describe_validation_error(err: ValidationError) -> str:
    """One readable sentence from marshmallow's nested messages."""
    parts = []
    messages = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
    for field_name, problems in sorted(messages.items()):
        text = " ".join(str(p) for p in problems) if isinstance(problems, list) else str(problems)
        text = text.rstrip(".")  # the parts are joined with "; " and the whole ends with one "."
        parts.append(text if field_name == "_schema" else f"{field_name}: {text}")
    return "Invalid request. " + "; ".join(parts) + "."


STATUSES = ("queued", "running", "processing", "ready", "validated", "failed")


class AnswerSchema(Schema):
    """The one answer shape: success, failure and dry run all carry every field (null when unknown)."""

    ok = fields.Boolean(required=True, metadata={"description": "True when the call did what was asked."})
    status = fields.String(
        required=True,
        allow_none=True,
        validate=validate.OneOf(STATUSES),
        metadata={
            "description": "queued, running, processing: the job goes on (HTTP 202); ready: the voice can be "
            "used; validated: a dry run passed; failed: the clone failed, see error_code. null: this request "
            "failed before it reached a job (wrong key or unknown job on status_url), so the clone's state is "
            "unknown: fix the request, it is not a failed clone."
        },
    )
    cloned_voice_item_id = fields.String(allow_none=True, metadata={"description": "Pass to POST music/song."})
    item_id = fields.String(allow_none=True, metadata={"description": "useapi.net's itemId."})
    name = fields.String(allow_none=True, metadata={"description": "The voice name as sent upstream."})
    user_id = fields.String(allow_none=True, metadata={"description": "The useapi account, when given."})
    message = fields.String(allow_none=True, metadata={"description": "Human summary of the outcome."})
    error_code = fields.String(
        allow_none=True,
        validate=validate.OneOf(sorted({cls.error_code for cls in all_error_classes()})),
        metadata={"description": "Stable code to branch on; null on success."},
    )
    error_message = fields.String(allow_none=True, metadata={"description": "What went wrong and what to do."})
    upstream_status = fields.Integer(allow_none=True, metadata={"description": "HTTP status useapi.net answered."})
    audio_format = fields.String(allow_none=True, metadata={"description": "wav, mp3, flac or m4a (from the bytes)."})
    audio_content_type = fields.String(allow_none=True, metadata={"description": "Content-Type sent upstream."})
    audio_bytes = fields.Integer(
        allow_none=True, metadata={"description": "Size of the file sent (the received file unless converted)."}
    )
    audio_duration_seconds = fields.Float(allow_none=True, metadata={"description": "Duration in seconds."})
    audio_sample_rate = fields.Integer(allow_none=True, metadata={"description": "Samples per second."})
    audio_channels = fields.Integer(allow_none=True, metadata={"description": "1 mono, 2 stereo."})
    source_format = fields.String(
        allow_none=True,
        metadata={
            "description": "What was received, from the bytes: wav, mp3, flac, m4a, mp4, opus, ogg, webm, mkv, "
            "aac, aiff, aifc, amr, 3gp, 3g2, caf, wma, mov, avi…"
        },
    )
    converted = fields.Boolean(
        allow_none=True,
        metadata={"description": "True when the relay converted the recording; audio_* then describe what was sent."},
    )
    audio_peak_dbfs = fields.Float(
        allow_none=True,
        metadata={"description": "Loudest sample, dBFS (0 = full scale; -120 = digital silence)."},
    )
    audio_rms_dbfs = fields.Float(
        allow_none=True, metadata={"description": "Average level (RMS over the whole recording), dBFS."}
    )
    dry_run = fields.Boolean(required=True, metadata={"description": "True when nothing was uploaded on purpose."})
    reused = fields.Boolean(
        required=True, metadata={"description": "True when if_exists=reuse answered with an existing voice."}
    )
    request_id = fields.String(required=True, metadata={"description": "Echo of X-Request-Id, or a generated id."})
    warnings = fields.List(fields.String(), required=True, metadata={"description": "Non-fatal notes."})
    metadata = fields.Dict(allow_none=True, metadata={"description": "The request's metadata, untouched."})
    job_id = fields.String(allow_none=True, metadata={"description": "The clone job; GET status_url to follow it."})
    status_url = fields.String(allow_none=True, metadata={"description": "GET this URL for the job's answer."})
    created_at = fields.String(allow_none=True, metadata={"description": "When the job was created (ISO 8601 UTC)."})
    updated_at = fields.String(allow_none=True, metadata={"description": "Last change (ISO 8601 UTC)."})
    completed_at = fields.String(allow_none=True, metadata={"description": "When it ended (ISO 8601 UTC)."})
    queue_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "While queued behind the account's other jobs: 1 = next; 101 = 100 or more ahead. Else null."
        },
    )
    callback_status = fields.String(
        allow_none=True,
        metadata={"description": "pending, delivered or given_up when a callback_url was given; else null."},
    )


ANSWER_FIELDS = tuple(AnswerSchema().fields)


class VoiceQuerySchema(Schema):
    """Query of ``GET /v1/voices``."""

    class Meta:
        unknown = EXCLUDE

    user_id = Identifier(load_default=None, validate=validate.Length(min=1, max=200))
    name = Text(load_default=None, metadata={"description": "Exact name, case-insensitive."})
    name_contains = Text(load_default=None, metadata={"description": "Part of the name, case-insensitive."})
    status = fields.String(load_default=None, validate=validate.OneOf(VOICE_STATUSES))


class VoiceSchema(Schema):
    """One cloned voice, flat."""

    cloned_voice_item_id = fields.String(metadata={"description": "Pass to POST music/song."})
    item_id = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    status = fields.String(validate=validate.OneOf(VOICE_STATUSES))
    upstream_status_code = fields.Integer(allow_none=True, metadata={"description": "useapi's number (30 = ready)."})
    vocal_url = fields.String(allow_none=True)
    created_at = fields.String(allow_none=True, metadata={"description": "ISO 8601 UTC."})
    updated_at = fields.String(allow_none=True, metadata={"description": "ISO 8601 UTC."})
    user_id = fields.String(allow_none=True)


class VoiceAnswerSchema(VoiceSchema):
    """``GET /v1/voices/<id>``: the voice plus ``ok`` and ``request_id``."""

    ok = fields.Boolean()
    request_id = fields.String()


class VoiceListSchema(Schema):
    """``GET /v1/voices``."""

    ok = fields.Boolean()
    count = fields.Integer()
    voices = fields.List(fields.Nested(VoiceSchema))
    complete = fields.Boolean(metadata={"description": "False when the page bound stopped the walk early."})
    warnings = fields.List(fields.String())
    request_id = fields.String()


class DeleteAnswerSchema(Schema):
    """``DELETE /v1/voices/<id>``."""

    ok = fields.Boolean()
    deleted = fields.Boolean(metadata={"description": "False when the voice was already gone (still ok)."})
    cloned_voice_item_id = fields.String()
    request_id = fields.String()
