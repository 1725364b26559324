"""The one exception hierarchy: each subclass is a documented ``error_code`` with its HTTP status."""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Root of every failure the relay reports.

    ``fields`` carries answer fields already known when the failure happened (for example the
    detected audio format when the audio turned out too short), so the answer loses nothing.
    """

    error_code = "internal_error"
    http_status = 500
    default_message = "The relay hit an unexpected error. Retry later; if it persists, check the relay's logs."

    def __init__(self, message: str | None = None, *, retry_after: int | None = None, **fields: Any):
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.fields = fields
        super().__init__(self.message)


# The caller's request
class InvalidRequest(RelayError):
    error_code, http_status = "invalid_request", 400
    default_message = "The request body is not valid JSON for this endpoint."


class Unauthorized(RelayError):
    error_code, http_status = "unauthorized", 401
    default_message = (
        "Missing or wrong relay key. Send 'Authorization: Bearer <RELAY_API_KEY>' or 'X-Relay-Key: <RELAY_API_KEY>'."
    )


class MissingUpstreamToken(RelayError):
    error_code, http_status = "missing_upstream_token", 400
    default_message = "No useapi.net token: send it in the 'X-Useapi-Token' header, or set USEAPI_TOKEN on the relay."


class NotFound(RelayError):
    error_code, http_status = "not_found", 404
    default_message = (
        "No such endpoint. See the README for the relay's endpoints (POST /v1/voice-clones, GET /v1/voices, …)."
    )


class MethodNotAllowed(RelayError):
    error_code, http_status = "method_not_allowed", 405
    default_message = "This endpoint does not accept that HTTP method."


class RequestTooLarge(RelayError):
    error_code, http_status = "request_too_large", 413
    default_message = (
        "The request body is too large for a JSON request. To send the recording itself, use its audio "
        "Content-Type (e.g. audio/wav) with the fields in the query string, or multipart/form-data with the "
        "file in a part named 'file'; or send a link in audio_url."
    )


class RequestTimeout(RelayError):
    error_code, http_status = "request_timeout", 408
    default_message = (
        "The request did not arrive whole within RELAY_REQUEST_READ_TIMEOUT seconds: send it again "
        "in one go (a slow or stalled connection)."
    )


class InvalidVoiceId(RelayError):
    error_code, http_status = "invalid_voice_id", 400
    default_message = (
        "That is not a cloned_voice_item_id. It looks like user:12345-tempolor:<user_id>-voice:<itemId>; "
        "copy it from a clone answer or the voice list."
    )


class VoiceNotFound(RelayError):
    error_code, http_status = "voice_not_found", 404
    default_message = "useapi.net has no cloned voice with that id on this account."


class VoiceExists(RelayError):
    error_code, http_status = "voice_exists", 409


class JobNotFound(RelayError):
    error_code, http_status = "job_not_found", 404
    default_message = "No clone job with that id (jobs are kept for RELAY_JOB_RETENTION_HOURS)."


class IdempotencyKeyReused(RelayError):
    error_code, http_status = "idempotency_key_reused", 422
    default_message = (
        "This Idempotency-Key was already used with a different request body. Use a new key for a new clone."
    )


class SecretKeyRequired(RelayError):
    error_code, http_status = "secret_key_required", 400
    default_message = (
        "This relay runs its jobs in a separate worker process but has no RELAY_SECRET_KEY, so it cannot keep "
        "a per-request X-Useapi-Token safely. The operator must set RELAY_SECRET_KEY (or USEAPI_TOKEN)."
    )


RESUBMIT = "Submit the clone again."  # the advice of an error, unless a voice exists or may (relay/worker.py)


class TokenUnavailable(RelayError):
    error_code, http_status = "token_unavailable", 503
    default_message = (
        "The relay restarted before this job finished and could not keep its useapi token "
        f"(set RELAY_SECRET_KEY so tokens survive restarts). {RESUBMIT}"
    )


class UploadStorageFull(RelayError):
    error_code, http_status = "upload_storage_full", 503
    default_message = "The relay holds too many uploaded files waiting for their jobs. Retry in a minute."


class CloneFailed(RelayError):
    error_code, http_status = "clone_failed", 422
    default_message = "useapi.net reports that cloning this voice failed. Try another recording."


class ReadyTimeout(RelayError):
    error_code, http_status = "ready_timeout", 504


class StorageFull(RelayError):
    error_code, http_status = "storage_full", 503


class RelayRestarting(RelayError):
    error_code, http_status = "relay_restarting", 503
    default_message = (
        "The relay is restarting (a deploy, or the host's daily restart) and stopped receiving this request "
        "before it arrived whole; nothing was kept. Send it again in a few seconds."
    )


class DatabaseUnavailable(RelayError):
    """The relay's own database did not answer (down, restarting, locked, out of connections)."""

    error_code, http_status = "database_unavailable", 503
    default_message = (
        "The relay's own database did not answer just now (unreachable, restarting, busy or out of connections). "
        "Retry in a few seconds; if it goes on, the operator checks the database and GET /readyz."
    )


# The audio URL and what it serves
class UrlNotAllowed(RelayError):
    error_code, http_status = "url_not_allowed", 422


class DownloadFailed(RelayError):
    error_code, http_status = "download_failed", 422


class DownloadTooLarge(RelayError):
    error_code, http_status = "download_too_large", 422


class NotAudio(RelayError):
    error_code, http_status = "not_audio", 422


class UnsupportedAudioFormat(RelayError):
    error_code, http_status = "unsupported_audio_format", 422


class AudioCorrupt(RelayError):
    error_code, http_status = "audio_corrupt", 422


class AudioTooShort(RelayError):
    error_code, http_status = "audio_too_short", 422


class AudioTooLong(RelayError):
    error_code, http_status = "audio_too_long", 422


class AudioSilent(RelayError):
    error_code, http_status = "audio_silent", 422
    default_message = "The recording is silent: nothing to clone."


class DecodeLimitExceeded(RelayError):
    """Decoding or converting the file tripped a limit (CPU, memory, wall time, output size)."""

    error_code, http_status = "decode_limit_exceeded", 422


# useapi.net
class UpstreamError(RelayError):
    """useapi.net answered with an error, or did not answer.

    ``reached`` is False only when the request certainly never became a request useapi could act
    on (no connection, or the body stopped short of its length), which makes even an upload safe
    to send again. ``maybe_created`` is True when an upload's whole body was sent but no readable
    answer came back: a voice may exist, so the upload is never sent again — it is reconciled.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        upstream_status: int | None = None,
        reached: bool = True,
        maybe_created: bool = False,
        **kwargs: Any,
    ):
        super().__init__(message, upstream_status=upstream_status, **kwargs)
        self.reached = reached
        self.maybe_created = maybe_created


class UpstreamUnauthorized(UpstreamError):
    error_code, http_status = "upstream_unauthorized", 401


class UpstreamPaymentRequired(UpstreamError):
    error_code, http_status = "upstream_payment_required", 402


class UpstreamRejected(UpstreamError):
    error_code, http_status = "upstream_rejected", 422


class UpstreamRateLimited(UpstreamError):
    error_code, http_status = "upstream_rate_limited", 429


class UpstreamUnavailable(UpstreamError):
    error_code, http_status = "upstream_unavailable", 502


class UpstreamTimeout(UpstreamError):
    error_code, http_status = "upstream_timeout", 504


class UpstreamInvalidAnswer(UpstreamError):
    """useapi.net answered, but not in the documented shape (an HTML page, ``{}``, a list without records)."""

    error_code, http_status = "upstream_invalid_answer", 502


class UploadUnconfirmed(UpstreamError):
    """An upload whose body was sent but whose answer never came, and no new voice appeared in time."""

    error_code, http_status = "upload_unconfirmed", 502


class QueueTimeout(RelayError):
    error_code, http_status = "queue_timeout", 503


# The console (relay/web): only its pages answer these
class CsrfFailed(RelayError):
    error_code, http_status = "csrf_failed", 403
    default_message = "The form's security token is missing or expired: reload the page and send the form again."


class LoginRateLimited(RelayError):
    error_code, http_status = "login_rate_limited", 429
    default_message = "Too many wrong keys from this address: wait a few minutes, then try again."


def all_error_classes() -> list[type[RelayError]]:
    """Every concrete error class, root included, for docs and tests."""
    found: list[type[RelayError]] = []
    pending: list[type[RelayError]] = [RelayError]
    while pending:
        cls = pending.pop(0)
        if cls is not UpstreamError:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
