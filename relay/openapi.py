"""OpenAPI: the relay's HTTP contract, generated from the marshmallow schemas (never kept by hand).

``relay openapi`` writes it to ``connector_spec/openapi.yaml``; ``GET /openapi.json`` serves it;
a test fails when the two disagree.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from . import __version__
from .errors import all_error_classes
from .schemas import (
    AnswerSchema,
    CloneRequestSchema,
    DeleteAnswerSchema,
    VoiceAnswerSchema,
    VoiceListSchema,
    VoiceQuerySchema,
)

VOICE_ID = "user:12345-tempolor:67890-voice:abcdef123456789"
JOB_ID = "5018e74be430411d905919bb0e9dbedd"

_ANSWER_EXAMPLE: dict[str, Any] = {
    "ok": True,
    "status": "ready",
    "cloned_voice_item_id": VOICE_ID,
    "item_id": "abcdef123456789",
    "name": "My voice",
    "user_id": "67890",
    "message": "The voice is cloned and ready: use cloned_voice_item_id with POST music/song.",
    "error_code": None,
    "error_message": None,
    "upstream_status": 200,
    "audio_format": "m4a",
    "audio_content_type": "audio/mp4",
    "audio_bytes": 9384,
    "audio_duration_seconds": 2.046,
    "audio_sample_rate": 22050,
    "audio_channels": 2,
    "source_format": "m4a",
    "converted": False,
    "audio_peak_dbfs": -1.2,
    "audio_rms_dbfs": -21.3,
    "dry_run": False,
    "reused": False,
    "request_id": "3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e",
    "warnings": ["Dropbox share link rewritten to download the file (dl=1)."],
    "metadata": {"row": 7},
    "job_id": JOB_ID,
    "status_url": f"https://relay.example.com/v1/voice-clones/{JOB_ID}",
    "created_at": "2026-11-25T07:59:50Z",
    "updated_at": "2026-11-25T07:59:52Z",
    "completed_at": "2026-11-25T07:59:52Z",
    "queue_position": None,
    "callback_status": None,
}
_QUEUED_EXAMPLE = {
    **_ANSWER_EXAMPLE,
    "status": "processing",
    "message": "useapi.net is still cloning the voice; the relay checks until it is ready.",
    "upstream_status": 202,
    "completed_at": None,
}
_FAILED_EXAMPLE = {
    **_ANSWER_EXAMPLE,
    "ok": False,
    "status": "failed",
    "cloned_voice_item_id": None,
    "item_id": None,
    "upstream_status": None,
    "error_code": "not_audio",
    "error_message": (
        "Expected audio but received an HTML web page (153 bytes) titled 'Google Drive - Virus scan warning'. "
        "The link opens a web page (a login, preview or virus-scan page), not the file: share it publicly "
        "and use a direct download link."
    ),
    "message": None,
    "audio_format": None,
    "audio_content_type": None,
    "audio_bytes": 153,
    "audio_duration_seconds": None,
    "audio_sample_rate": None,
    "audio_channels": None,
    "source_format": None,
    "converted": None,
    "audio_peak_dbfs": None,
    "audio_rms_dbfs": None,
    "warnings": [],
}
_FAILED_EXAMPLE["message"] = _FAILED_EXAMPLE["error_message"]
_VOICE_EXAMPLE = {
    "cloned_voice_item_id": VOICE_ID,
    "item_id": "abcdef123456789",
    "name": "My voice",
    "status": "ready",
    "upstream_status_code": 30,
    "vocal_url": "https://cdn.example.com/cloned-voice/abcdef123456789.mp3",
    "created_at": "2024-05-24T15:43:45Z",
    "updated_at": "2024-05-24T15:48:20Z",
    "user_id": "67890",
}
EXAMPLES = {
    "answer_ready": _ANSWER_EXAMPLE,
    "answer_processing": _QUEUED_EXAMPLE,
    "answer_failed": _FAILED_EXAMPLE,
    "voice": {"ok": True, **_VOICE_EXAMPLE, "request_id": "3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e"},
    "voice_list": {
        "ok": True,
        "count": 1,
        "voices": [_VOICE_EXAMPLE],
        "complete": True,
        "warnings": [],
        "request_id": "3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e",
    },
    "deleted": {
        "ok": True,
        "deleted": True,
        "cloned_voice_item_id": VOICE_ID,
        "request_id": "3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e",
    },
}


def error_table() -> str:
    """Markdown list of every error code with its HTTP status, for the spec's descriptions."""
    rows = sorted({(cls.error_code, cls.http_status) for cls in all_error_classes()})
    return "\n".join(f"- `{code}` (HTTP {status})" for code, status in rows)


def _json(schema: str, example: str | None = None, examples: dict | None = None) -> dict:
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    if example:
        media["example"] = EXAMPLES[example]
    if examples:
        media["examples"] = {name: {"value": EXAMPLES[key]} for name, key in examples.items()}
    return {"application/json": media}


def _errors(*statuses: int) -> dict:
    return {
        str(status): {
            "description": "The failure, in the one answer shape.",
            "content": _json("Answer", "answer_failed"),
        }
        for status in statuses
    }


LOCAL_SERVER = "http://127.0.0.1:8000"


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document as a dict."""
    spec = APISpec(
        title="Voice clone relay",
        version=__version__,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Clone a voice at useapi.net (TemPolor) from an audio URL or a file with one call and "
            "one flat answer. Every failure uses the Answer shape with an `error_code`:\n\n" + error_table(),
        },
        components={
            "securitySchemes": {
                "relayKey": {"type": "http", "scheme": "bearer", "description": "RELAY_API_KEY"},
                "relayKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Relay-Key"},
            }
        },
        security=[{"relayKey": []}, {"relayKeyHeader": []}],
        servers=[
            {
                "url": LOCAL_SERVER,
                "description": "`relay serve` on this machine. Replace with your relay's address (e.g. "
                "https://<app>.herokuapp.com); the document the relay serves at /openapi.json names itself.",
            }
        ],
    )
    spec.components.schema("CloneRequest", schema=CloneRequestSchema)
    spec.components.schema("Answer", schema=AnswerSchema)
    spec.components.schema("VoiceList", schema=VoiceListSchema)
    spec.components.schema("VoiceAnswer", schema=VoiceAnswerSchema)
    spec.components.schema("DeleteAnswer", schema=DeleteAnswerSchema)
    token_header = {
        "in": "header",
        "name": "X-Useapi-Token",
        "required": False,
        "schema": {"type": "string"},
        "description": "useapi.net API token; wins over the relay's USEAPI_TOKEN.",
    }
    request_id = {
        "in": "header",
        "name": "X-Request-Id",
        "required": False,
        "schema": {"type": "string", "maxLength": 200},
        "description": "Echoed as request_id and in the X-Request-Id answer header.",
    }
    voice_id = {
        "in": "path",
        "name": "cloned_voice_item_id",
        "required": True,
        "schema": {"type": "string", "example": VOICE_ID},
        "description": "As returned by a clone or the voice list (user:…-tempolor:…-voice:…).",
    }
    spec.path(
        path="/v1/voice-clones",
        operations={
            "post": {
                "operationId": "cloneVoice",
                "summary": "Clone a voice from an audio URL",
                "description": "Creates a durable clone job and waits up to `wait_seconds` for its end. "
                "200: ready (or validated for a dry run); 202: still going (follow `status_url`, or get the "
                "callback); 4xx: the caller can fix it; 502/504: useapi.net's problem.",
                "parameters": [
                    token_header,
                    request_id,
                    {
                        "in": "header",
                        "name": "Idempotency-Key",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 255},
                        "description": "Same key + same body: the same job, never a second upload.",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CloneRequest"},
                            "example": {
                                "audio_url": "https://www.dropbox.com/s/abc123/my-voice.m4a?dl=0",
                                "name": "My voice",
                                "user_id": "67890",
                                "if_exists": "reuse",
                                "metadata": {"row": 7},
                            },
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The clone ended: ready, or validated (dry run).",
                        "content": _json("Answer", "answer_ready"),
                    },
                    "202": {
                        "description": "Still going: queued, running or processing.",
                        "content": _json("Answer", "answer_processing"),
                    },
                    **_errors(400, 401, 402, 409, 413, 422, 429, 500, 502, 503, 504),
                },
            }
        },
    )
    spec.path(
        path="/v1/voice-clones/{job_id}",
        operations={
            "get": {
                "operationId": "getCloneJob",
                "summary": "Read a clone job",
                "description": "200 whenever the job exists: `ok`, `status` and `error_code` say how the clone "
                "went. 404 `job_not_found` otherwise.",
                "parameters": [{"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "The job's answer.",
                        "content": _json(
                            "Answer",
                            examples={
                                "ready": "answer_ready",
                                "processing": "answer_processing",
                                "failed": "answer_failed",
                            },
                        ),
                    },
                    **_errors(401, 404, 503),
                },
            }
        },
    )
    spec.path(
        path="/v1/voices",
        operations={
            "get": {
                "operationId": "listVoices",
                "summary": "List (and find) cloned voices",
                "description": "Every cloned voice of the account, across useapi's pages, flat.",
                "parameters": [token_header, {"in": "query", "schema": VoiceQuerySchema}],
                "responses": {
                    "200": {"description": "The voices.", "content": _json("VoiceList", "voice_list")},
                    **_errors(400, 401, 402, 422, 429, 502, 504),
                },
            }
        },
    )
    spec.path(
        path="/v1/voices/{cloned_voice_item_id}",
        operations={
            "get": {
                "operationId": "getVoice",
                "summary": "Read one cloned voice",
                "parameters": [token_header, voice_id],
                "responses": {
                    "200": {"description": "The voice.", "content": _json("VoiceAnswer", "voice")},
                    **_errors(400, 401, 402, 404, 422, 429, 502, 504),
                },
            },
            "delete": {
                "operationId": "deleteVoice",
                "summary": "Delete a cloned voice (idempotent)",
                "description": "A voice that is already gone answers 200 with `deleted: false`.",
                "parameters": [token_header, voice_id],
                "responses": {
                    "200": {"description": "Deleted, or already gone.", "content": _json("DeleteAnswer", "deleted")},
                    **_errors(400, 401, 402, 422, 429, 502, 504),
                },
            },
        },
    )
    spec.path(
        path="/v1/auth",
        operations={
            "get": {
                "operationId": "checkAuth",
                "summary": "Check the relay key (for a connector's connection test)",
                "parameters": [token_header],
                "responses": {
                    "200": {
                        "description": "The key is right; `useapi_token` says which token would be used.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "ok": {"type": "boolean"},
                                        "version": {"type": "string"},
                                        "useapi_token": {
                                            "type": ["string", "null"],
                                            "enum": ["request", "server", None],
                                        },
                                        "useapi_account": {
                                            "type": ["string", "null"],
                                            "description": "`ok`: useapi took the token (one free look at "
                                            "its voices); `not checked: <error_code>` when useapi could not "
                                            "be asked; null without a token. A token useapi refuses is 401 "
                                            "`upstream_unauthorized` (402 without a subscription).",
                                        },
                                        "request_id": {"type": "string"},
                                    },
                                },
                                "example": {
                                    "ok": True,
                                    "version": __version__,
                                    "useapi_token": "request",
                                    "useapi_account": "ok",
                                    "request_id": "3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e",
                                },
                            }
                        },
                    },
                    # 400: secret_key_required (a per-request token this relay cannot keep), or a token no
                    # header can carry; 401/402: the relay key, or a token useapi refuses
                    **_errors(400, 401, 402),
                },
            }
        },
    )
    for path, summary in (
        ("/healthz", "Process alive"),
        ("/readyz", "Ready to serve"),
        ("/readyz/web", "Ready to take requests (a worker not required)"),
    ):
        spec.path(
            path=path,
            operations={
                "get": {
                    "operationId": path.strip("/").replace("/", "_"),
                    "summary": summary,
                    "security": [],
                    "responses": {
                        "200": {
                            "description": summary,
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"ok": {"type": "boolean"}, "version": {"type": "string"}},
                                    }
                                }
                            },
                        },
                        **(
                            {
                                "503": {
                                    "description": "Not ready; `problems` says why.",
                                    "content": {"application/json": {"schema": {"type": "object"}}},
                                }
                            }
                            if path.startswith("/readyz")
                            else {}
                        ),
                    },
                }
            },
        )
    return _with_file_forms(spec.to_dict())


RAW_QUERY = ("name", "user_id", "dry_run", "wait_seconds", "callback_url", "if_exists", "convert", "metadata")


def _with_file_forms(document: dict) -> dict:
    """Add the two file forms of ``POST /v1/voice-clones`` beside JSON: multipart (the file in part
    ``file``, the other fields as text) and the raw recording as the body (fields in the query)."""
    fields = document["components"]["schemas"]["CloneRequest"]["properties"]
    form_fields = {name: dict(value) for name, value in fields.items() if name != "audio_url"}
    form_fields["metadata"] = {"type": "string", "description": "A JSON object written as text (up to 4 KB)."}
    form_fields["file"] = {
        "type": "string",
        "format": "binary",
        "description": "The recording: WAV, MP3, FLAC, M4A, or any format the relay converts (see the README).",
    }
    operation = document["paths"]["/v1/voice-clones"]["post"]
    content = operation["requestBody"]["content"]
    content["multipart/form-data"] = {
        "schema": {"type": "object", "properties": form_fields, "required": ["file", "name"]},
        "encoding": {"file": {"contentType": "audio/*, video/*, application/octet-stream"}},
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    for media_type in ("application/octet-stream", "audio/*", "video/*"):
        content[media_type] = binary
    for name in RAW_QUERY:
        schema = dict(form_fields[name])
        description = schema.pop("description", "")
        operation["parameters"].append(
            {
                "in": "query",
                "name": name,
                "required": False,
                "schema": schema,
                "description": "Used only when the body is the raw recording (audio/*, video/*, "
                f"application/octet-stream){'; then required' if name == 'name' else ''}. {description}".strip(),
            }
        )
    operation["summary"] = "Clone a voice from an audio URL or a file"
    operation["description"] += (
        " The recording comes three ways: JSON with `audio_url`; `multipart/form-data` with the file in the "
        "part `file` and the other fields as form fields (`metadata` as JSON text); or the raw recording as "
        "the body (`audio/*`, `video/*`, `application/octet-stream`) with the fields in the query string."
    )
    return document


def to_yaml(document: dict[str, Any]) -> str:
    """The document as YAML (stable key order, as generated)."""
    import yaml

    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
