"""The Make custom app and blueprint: every file checked by Make's own JSON Schemas, and true to the API."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from relay.errors import all_error_classes
from relay.schemas import ANSWER_FIELDS, VoiceSchema

from .conftest import RELAY_KEY
from .test_convert import MEDIA

ROOT = Path(__file__).parent.parent
MAKE = ROOT / "connector_spec" / "make"
SCHEMAS = Path(__file__).parent / "vendor" / "make-schemas"
BASE_URI = "https://make-schemas.invalid/"

# Which of Make's schemas checks which file (the SDK's own file associations; see tests/vendor/make-schemas/README.md).
CHECKS = [
    (re.compile(r"\.communication\.iml\.json$"), "api.json"),
    (re.compile(r"\.(params|mappable-params|static-params|interface)\.iml\.json$"), "parameters.json"),
    (re.compile(r"\.samples\.iml\.json$"), "samples.json"),
    (re.compile(r"(^|/)base\.iml\.json$"), "base.json"),
    (re.compile(r"(^|/)common\.json$"), "common.json"),
    (re.compile(r"(^|/)groups\.json$"), "groups.json"),
    (re.compile(r"(^|/)makecomapp\.json$"), "makecomapp.schema.json"),
]


@pytest.fixture(scope="module")
def registry() -> Registry:
    assert SCHEMAS.is_dir(), f"Make's schemas are expected in {SCHEMAS}"
    resources = []
    for path in SCHEMAS.glob("*.json"):
        contents = json.loads(path.read_text())
        resources.append((BASE_URI + path.name, Resource(contents=contents, specification=DRAFT7)))
    return Registry().with_resources(resources)


def app_files() -> list[Path]:
    return sorted(p for p in MAKE.rglob("*.json") if "blueprints" not in p.parts)


@pytest.mark.parametrize("path", app_files(), ids=lambda p: str(p.relative_to(MAKE)))
def test_every_app_file_passes_makes_schema(registry, path):
    relative = str(path.relative_to(MAKE))
    schema_name = next((name for pattern, name in CHECKS if pattern.search(relative)), None)
    assert schema_name, f"no Make schema is known for {relative}"
    validator = Draft7Validator({"$ref": BASE_URI + schema_name}, registry=registry)
    errors = sorted(validator.iter_errors(json.loads(path.read_text())), key=lambda e: e.path)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_makecomapp_lists_every_file_and_only_existing_ones():
    index = json.loads((MAKE / "makecomapp.json").read_text())
    listed = {p for p in index["generalCodeFiles"].values() if p}
    for components in index["components"].values():
        for component in components.values():
            listed |= {p for p in component["codeFiles"].values() if p}
    on_disk = {str(p.relative_to(MAKE)) for p in app_files()} - {"makecomapp.json"}
    assert listed == on_disk


def test_the_modules_the_issue_asks_for_exist():
    modules = json.loads((MAKE / "makecomapp.json").read_text())["components"]["module"]
    kinds = {name: module["moduleType"] for name, module in modules.items()}
    assert kinds == {
        "cloneVoice": "action",
        "cloneVoiceFromFile": "action",
        "startVoiceClone": "action",
        "getCloneJob": "action",
        "listVoices": "search",
        "deleteVoice": "action",
        "watchVoiceCloneFinished": "instant_trigger",
    }
    assert modules["watchVoiceCloneFinished"]["webhook"] == "voiceCloneFinished"


@pytest.mark.parametrize(
    "module", ["cloneVoice", "cloneVoiceFromFile", "startVoiceClone", "getCloneJob", "watchVoiceCloneFinished"]
)
def test_answer_interfaces_and_samples_match_the_answer_field_for_field(module):
    folder = MAKE / "modules" / module
    interface = json.loads((folder / f"{module}.interface.iml.json").read_text())
    sample = json.loads((folder / f"{module}.samples.iml.json").read_text())
    assert [field["name"] for field in interface] == list(ANSWER_FIELDS)
    assert set(sample) == set(ANSWER_FIELDS)


def test_the_voice_list_iterates_flat_voices():
    folder = MAKE / "modules" / "listVoices"
    communication = json.loads((folder / "listVoices.communication.iml.json").read_text())
    assert communication["response"]["iterate"] == "{{body.voices}}"
    # A listing not read to its end is an error, never zero bundles: "no such voice" would not be
    # certain, and a find-then-clone scenario would pay for a voice that exists.
    # (What did match is output: it exists, whatever was not read.)
    assert communication["response"]["valid"]["condition"] == "{{body.complete || length(body.voices) > 0}}"
    assert communication["response"]["valid"]["message"].startswith("listing_incomplete:")
    interface = json.loads((folder / "listVoices.interface.iml.json").read_text())
    assert [field["name"] for field in interface] == list(VoiceSchema().fields)


def test_the_app_waits_as_long_as_make_allows():
    base = json.loads((MAKE / "general" / "base.iml.json").read_text())
    assert base["timeout"] == 300000
    assert "body.error_message" in base["response"]["error"]["message"]
    clone = json.loads((MAKE / "modules/cloneVoice/cloneVoice.communication.iml.json").read_text())
    assert clone["body"]["wait_seconds"] == 280  # under the 300 s timeout; the relay clamps to its own limit
    start = json.loads((MAKE / "modules/startVoiceClone/startVoiceClone.communication.iml.json").read_text())
    assert start["body"]["wait_seconds"] == 0 and "callback_url" in start["body"]


@pytest.mark.parametrize(
    ("code", "make_type"),
    [
        ("unauthorized", "InvalidAccessTokenError"),
        ("upstream_unauthorized", "InvalidAccessTokenError"),
        ("upstream_rate_limited", "RateLimitError"),
        ("upstream_unavailable", "ConnectionError"),
        ("upstream_timeout", "ConnectionError"),
        ("token_unavailable", "ConnectionError"),
        ("internal_error", "ConnectionError"),
        ("voice_exists", "DuplicateDataError"),
        ("upstream_payment_required", "InvalidConfigurationError"),
        ("not_audio", "DataError"),
        ("invalid_request", "DataError"),
        ("job_not_found", "DataError"),
    ],
)
def test_make_gets_an_error_type_per_relay_error(code, make_type):
    """base.iml.json maps each HTTP status the relay answers to Make's error type, so an error handler can branch."""
    error = json.loads((MAKE / "general" / "base.iml.json").read_text())["response"]["error"]
    status = next(cls.http_status for cls in all_error_classes() if cls.error_code == code)
    assert error[str(status)]["type"] == make_type
    assert error[str(status)]["message"] == error["message"]


def test_every_status_the_relay_answers_has_a_make_error_type():
    error = json.loads((MAKE / "general" / "base.iml.json").read_text())["response"]["error"]
    assert {str(cls.http_status) for cls in all_error_classes()} <= set(error)


def test_the_connection_is_tested_against_an_auth_checking_endpoint(client):
    communication = json.loads((MAKE / "connections/relay/relay.communication.iml.json").read_text())
    assert communication["url"].endswith("/v1/auth")
    assert client.get("/v1/auth").status_code == 401  # a wrong or missing key fails the test


def test_every_module_calls_a_route_the_relay_has(app):
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    for path in MAKE.glob("modules/*/*.communication.iml.json"):
        url = json.loads(path.read_text())["url"]
        route = re.sub(r"\{\{parameters\.(\w+)\}\}", r"<\1>", url)
        normalized = {re.sub(r"<[^>]+>", "<>", r) for r in routes}
        assert re.sub(r"<[^>]+>", "<>", route) in normalized, url


def test_sensitive_headers_are_sanitized_in_makes_logs():
    for path in (MAKE / "general/base.iml.json", MAKE / "connections/relay/relay.communication.iml.json"):
        sanitize = json.loads(path.read_text())["log"]["sanitize"]
        assert {"request.headers.authorization", "request.headers.x-useapi-token"} <= set(sanitize)


def test_the_file_module_sends_a_multipart_request_the_relay_takes(client):
    """Fill the module's body the way Make does (a mapped file, every other field as text) and send it."""
    communication = json.loads(
        (MAKE / "modules/cloneVoiceFromFile/cloneVoiceFromFile.communication.iml.json").read_text()
    )
    assert communication["type"] == "multipart/form-data"
    params = json.loads((MAKE / "modules/cloneVoiceFromFile/cloneVoiceFromFile.mappable-params.iml.json").read_text())
    assert {p["name"]: p["type"] for p in params if p["name"] in ("fileName", "data")} == {
        "fileName": "filename",
        "data": "buffer",
    }
    given = {
        "fileName": "voice-note.ogg",
        "data": (MEDIA / "voice_note.opus").read_bytes(),
        "name": "From Make",
        "user_id": "",  # unmapped fields arrive empty
        "if_exists": "create",
        "dry_run": "true",
        "convert": "auto",
        "metadata": '{"row": 7}',
        "idempotency_key": "",
    }

    def send(**changes):
        values = {**given, **changes}
        fill = lambda text: re.sub(r"\{\{parameters\.(\w+)\}\}", lambda m: values[m.group(1)], text)  # noqa: E731
        form = {}
        for key, value in communication["body"].items():
            if isinstance(value, dict):  # the file: value and file name
                form[key] = (io.BytesIO(values["data"]), values["fileName"])
            elif isinstance(value, str):
                form[key] = fill(value)
            else:
                form[key] = str(value)
        form["wait_seconds"] = "20"  # the test client is not Make: it need not wait 280 s
        headers = {name: fill(value) for name, value in communication["headers"].items()}
        headers["Authorization"] = f"Bearer {RELAY_KEY}"
        response = client.post("/v1/voice-clones", data=form, content_type="multipart/form-data", headers=headers)
        assert response.status_code == 200, response.json
        return response.json

    body = send()  # the key left unmapped: Make sends the header blank
    assert (body["status"], body["source_format"], body["converted"]) == ("validated", "opus", True)
    assert body["metadata"] == {"row": 7}
    assert send()["job_id"] != body["job_id"]
    keyed = send(idempotency_key="form-entry-7")
    assert send(idempotency_key="form-entry-7")["job_id"] == keyed["job_id"]  # Make ran the module again


def test_each_clone_module_can_send_an_idempotency_key():
    for module in ("cloneVoice", "cloneVoiceFromFile", "startVoiceClone"):
        communication = json.loads((MAKE / f"modules/{module}/{module}.communication.iml.json").read_text())
        assert communication["headers"] == {"Idempotency-Key": "{{parameters.idempotency_key}}"}
        params = json.loads((MAKE / f"modules/{module}/{module}.mappable-params.iml.json").read_text())
        (param,) = [p for p in params if p["name"] == "idempotency_key"]
        assert param["required"] is False
