"""Next steps: for each ``error_code``, what a scenario (or the person reading the console) should do.

The one copy of the README's error table: the console renders it, and a test keeps the README's
table equal to it (``tests/test_console.py``).
"""

from __future__ import annotations

NEXT_STEPS: dict[str, str] = {
    "invalid_request": "Fix the body: the message names the field (also: empty, non-JSON, non-UTF-8, too deeply nested).",
    "unauthorized": "Send the relay key (`Authorization: Bearer …` or `X-Relay-Key`).",
    "missing_upstream_token": "Send `X-Useapi-Token` or set `USEAPI_TOKEN` on the relay.",
    "not_found": "Wrong path.",
    "method_not_allowed": "Wrong HTTP method.",
    "request_too_large": "The JSON body is over `RELAY_MAX_JSON_BYTES`, or an uploaded file is over `RELAY_MAX_BYTES`.",
    "request_timeout": "The request did not arrive whole within `RELAY_REQUEST_READ_TIMEOUT` (a stalled or very slow connection): send it again.",
    "upload_storage_full": "The relay already holds (or is receiving) `RELAY_UPLOAD_STORE_BYTES` of uploaded files waiting for their jobs, or this account half of it: retry after `Retry-After`, or send a link.",
    "invalid_voice_id": "The path id is not a `cloned_voice_item_id` (`user:…-tempolor:…-voice:…`).",
    "voice_not_found": "useapi.net has no voice with that id (it answered 404: `upstream_status` 404).",
    "voice_exists": '`if_exists: "fail"` and the account has a voice with that name; its id is in `cloned_voice_item_id`.',
    "job_not_found": "No job with that id (or it is older than `RELAY_JOB_RETENTION_HOURS`).",
    "idempotency_key_reused": "The `Idempotency-Key` was used before with another body: use a new key.",
    "secret_key_required": "The relay runs workers in a separate process without `RELAY_SECRET_KEY`, so it cannot keep a per-request `X-Useapi-Token`: the operator sets `RELAY_SECRET_KEY` (or `USEAPI_TOKEN`).",
    "url_not_allowed": "Not a public http(s) URL (private/loopback/metadata address, credentials in the URL, other scheme), also after a redirect.",
    "download_failed": "The link did not download (HTTP error at the source, DNS, refused, reset, too slow, redirect loop). Fix or re-share the link.",
    "download_too_large": "Over `RELAY_MAX_BYTES` (by `Content-Length` or while streaming).",
    "not_audio": "The link gave a web page, document, image, empty file or an MP4 without audio (the message says which): use the file's direct download link (shared publicly), or send the recording itself.",
    "unsupported_audio_format": 'Audio useapi does not take and the relay did not convert (`convert: "never"` or `RELAY_CONVERT=off`; or a format the relay does not decode, e.g. MIDI): convert to WAV, MP3, FLAC or M4A.',
    "audio_corrupt": "Looks like an accepted format but is truncated or damaged (or more than 10 % of its frames cannot be decoded).",
    "audio_too_short": "Shorter than `RELAY_MIN_SECONDS` (or no samples).",
    "audio_too_long": "Longer than `RELAY_MAX_SECONDS` (or, decoded, than `RELAY_CONVERT_MAX_SECONDS`).",
    "audio_silent": "Digital silence or near-silence for the whole length (peak below `RELAY_SILENCE_DBFS`): a muted microphone or a failed export. Nothing was uploaded.",
    "decode_limit_exceeded": "Decoding or converting the file tripped a limit: CPU time (`RELAY_CONVERT_CPU_SECONDS`), memory (`RELAY_CONVERT_MEMORY_MB`), wall time (`RELAY_CONVERT_TIMEOUT`) or output size (`RELAY_MAX_BYTES`). Send a shorter or simpler recording, or WAV/MP3/FLAC/M4A.",
    "upstream_unauthorized": "useapi.net refused the token: fix the token.",
    "upstream_payment_required": "useapi.net subscription needed.",
    "upstream_rejected": 'useapi.net refused the request (400/404/other 4xx, e.g. "Empty file received"); its message is quoted.',
    "upstream_rate_limited": "Wait (`Retry-After`) and retry. A clone's answer (and its status reads) carries the `Retry-After` useapi sent.",
    "upstream_unavailable": "useapi.net failed (5xx) or could not be reached, also after the relay's own retries.",
    "upstream_timeout": "useapi.net did not answer a look-up (voice list or voice) within its deadline, repeatedly. Nothing was uploaded twice; retry later.",
    "upstream_invalid_answer": 'useapi.net answered, but not in its documented shape (an HTML page with status 200, `{}`, a list without `records`, an upload answer without `clonedVoiceItemId`). Never read as "no voices" or as success. After an upload, the relay first looks for the voice it may have made; this code ends a job only when a look-up itself keeps getting such answers.',
    "upload_unconfirmed": "useapi.net received the whole recording, but its answer was lost or unreadable, and no new voice of that name (or unnamed) appeared on the account within `RELAY_READY_TIMEOUT_SECONDS` of the upload (when the listing itself could not be read to its end, the message says so). A new voice of that name that failed at useapi ends the job `clone_failed` at once. **A voice may exist and may have been charged**: check `GET /v1/voices?name=<name>` before sending the clone again. The relay never uploads again on a guess.",
    "clone_failed": "useapi.net accepted the file but reports the clone failed: try another recording.",
    "ready_timeout": "Accepted, but not ready within `RELAY_READY_TIMEOUT_SECONDS`; `cloned_voice_item_id` is kept — check it later with `GET /v1/voices/<id>`.",
    "token_unavailable": "The relay process holding a job's per-request token (kept in memory only, without `RELAY_SECRET_KEY`) stopped before the job ended, or the worker that picked the job up has no `USEAPI_TOKEN` while the web process accepted it with one (the operator sets it on every process): submit again — unless the answer has a `cloned_voice_item_id` (useapi had accepted the upload: check that voice) or its message says the upload may have created a voice (check `GET /v1/voices?name=` first).",
    "queue_timeout": "No worker started the clone within `RELAY_QUEUE_TIMEOUT_SECONDS` (workers not running, or far more work than workers). Nothing was uploaded: send it again.",
    "storage_full": "The relay could not write the recording to its own disk (full, or `RELAY_SPOOL_DIR` unusable). The relay's problem, not the link's: the operator frees space; retry later.",
    "relay_restarting": "The relay stopped (a deploy, the host's daily restart) while the request was still arriving; nothing was kept: send it again after `Retry-After`.",
    "database_unavailable": "The relay's own database could not be used (down, restarting, busy, full or read-only, or every connection of `RELAY_DATABASE_CONNECTIONS` in use): retry after `Retry-After`; the operator checks `/readyz`. A clone request answered so with `status` null may have been stored just before: send it again with the same `Idempotency-Key` (safe), or look for it before sending it without one.",
    "csrf_failed": "The console form was not sent from its own page, or the page is too old: reload it and send the form again.",
    "login_rate_limited": "Too many wrong relay keys from one address: wait `Retry-After` seconds, then sign in with the right key.",
    "internal_error": "A bug in the relay; the `request_id` finds it in the logs.",
}


def for_code(error_code: str | None) -> str | None:
    """What to do about ``error_code`` (README markup: `code` spans), or None."""
    return NEXT_STEPS.get(error_code or "")
