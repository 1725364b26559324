"""The OpenAPI document: generated, committed, valid, and true to real answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from relay.openapi import EXAMPLES, build_spec
from relay.schemas import ANSWER_FIELDS

from .conftest import RELAY_KEY, TOKEN, clone, serve_file

COMMITTED = Path(__file__).parent.parent / "connector_spec" / "openapi.yaml"
SPEC_URI = "urn:relay:openapi"


def generated() -> dict:
    return json.loads(json.dumps(build_spec()))


def check(instance, component: str) -> None:
    registry = Registry().with_resource(SPEC_URI, Resource(contents=generated(), specification=DRAFT202012))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"{SPEC_URI}#/components/schemas/{component}",
    }
    Draft202012Validator(schema, registry=registry).validate(instance)


def test_the_committed_document_is_the_generated_one():
    assert yaml.safe_load(COMMITTED.read_text()) == generated(), (
        "run: relay openapi --output connector_spec/openapi.yaml"
    )


def test_the_document_is_valid_openapi_3_1():
    document = generated()
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_the_app_serves_the_document_naming_itself_as_the_server(client):
    response = client.get("/openapi.json", base_url="https://relay.example.com")
    assert response.status_code == 200
    served = [{"url": "https://relay.example.com", "description": "this relay"}]
    assert response.json == {**generated(), "servers": served}


def test_the_committed_document_names_a_server():
    assert generated()["servers"][0]["url"].startswith("http")


@pytest.mark.parametrize(
    ("example", "component"),
    [
        ("answer_ready", "Answer"),
        ("answer_processing", "Answer"),
        ("answer_failed", "Answer"),
        ("voice", "VoiceAnswer"),
        ("voice_list", "VoiceList"),
        ("deleted", "DeleteAnswer"),
    ],
)
def test_every_example_fits_its_schema(example, component):
    check(EXAMPLES[example], component)


def test_answer_examples_have_exactly_the_answer_fields():
    for name in ("answer_ready", "answer_processing", "answer_failed"):
        assert set(EXAMPLES[name]) == set(ANSWER_FIELDS)


def test_every_error_code_is_in_the_document():
    from relay.errors import all_error_classes

    enum = generated()["components"]["schemas"]["Answer"]["properties"]["error_code"]["enum"]
    assert {cls.error_code for cls in all_error_classes()} | {None} == set(enum)


def test_real_answers_fit_the_documented_schema(client, audio_host):
    ok = clone(client, {"audio_url": serve_file(audio_host, "wav_pcm16_mono.wav"), "name": "x", "dry_run": True})
    assert ok.status_code == 200
    check(ok.json, "Answer")
    assert set(ok.json) == set(ANSWER_FIELDS)
    failed = clone(
        client, {"audio_url": serve_file(audio_host, "drive_interstitial.html"), "name": "x", "dry_run": True}
    )
    assert failed.json["error_code"] == "not_audio"
    check(failed.json, "Answer")
    for response in (
        client.get("/nowhere"),
        client.post("/v1/voice-clones", data="{", headers={"Authorization": f"Bearer {RELAY_KEY}"}),
    ):
        check(response.json, "Answer")


def test_the_statuses_the_voice_routes_really_answer_are_documented(client, useapi):
    """useapi refusing a look (its own 400) is 422 upstream_rejected on every voice route: a client
    generated from the document (Postman, n8n's import) needs a model for it."""
    voice_id = "user:12345-tempolor:67890-voice:abcdef123456789"
    refusal = {"error": "clonedVoiceItemId has incorrect format", "code": 400}
    useapi.expect_request("/v1/tempolor/music/cloned-voices/").respond_with_json(refusal, status=400)
    useapi.expect_request(f"/v1/tempolor/music/cloned-voices/{voice_id}").respond_with_json(refusal, status=400)
    headers = {"Authorization": f"Bearer {RELAY_KEY}", "X-Useapi-Token": TOKEN}
    paths = generated()["paths"]
    for method, path, documented in (
        ("get", "/v1/voices", paths["/v1/voices"]["get"]),
        ("get", f"/v1/voices/{voice_id}", paths["/v1/voices/{cloned_voice_item_id}"]["get"]),
        ("delete", f"/v1/voices/{voice_id}", paths["/v1/voices/{cloned_voice_item_id}"]["delete"]),
    ):
        answer = client.open(path, method=method.upper(), headers=headers)
        assert (answer.status_code, answer.json["error_code"]) == (422, "upstream_rejected"), (path, answer.json)
        assert "422" in documented["responses"], (method, path)
    assert "503" in paths["/v1/voice-clones/{job_id}"]["get"]["responses"]  # database_unavailable
