"""The Make blueprint and the n8n workflow: importable shapes, no baked-in ids, and requests the relay takes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from relay.schemas import ANSWER_FIELDS

from .conftest import RELAY_KEY, serve_file
from .test_convert import MEDIA

SPEC = Path(__file__).parent.parent / "connector_spec"
BLUEPRINT = SPEC / "make" / "blueprints" / "drive-folder-to-cloned-voice.json"
N8N = SPEC / "n8n" / "clone-voice-with-callback.json"


def modules(flow: list[dict]):
    for module in flow:
        yield module
        for route in module.get("routes", []):
            yield from modules(route["flow"])


def test_the_blueprint_has_makes_shape_and_no_account_specific_ids():
    blueprint = json.loads(BLUEPRINT.read_text())
    assert {"name", "flow", "metadata"} <= set(blueprint)
    found = list(modules(blueprint["flow"]))
    ids = [module["id"] for module in found]
    assert len(ids) == len(set(ids))
    for module in found:
        assert {"id", "module", "version", "metadata"} <= set(module)
        assert "__IMTCONN__" not in module.get("parameters", {})
        assert "__IMTHOOK__" not in module.get("parameters", {})
    names = [module["module"] for module in found]
    assert names[:3] == ["google-drive:watchFilesInAFolder", "http:MakeRequest", "builtin:BasicRouter"]
    http = found[1]
    assert http["version"] == 4 and http["mapper"]["url"].endswith("/v1/voice-clones")
    assert http["mapper"]["stopOnHttpError"] is False  # failures reach the router as answers with ok=false
    assert http["mapper"]["timeout"] <= 300
    filters = [module["filter"]["conditions"][0][0] for module in found if "filter" in module]
    assert {f["a"] for f in filters} == {"{{2.data.ok}}"}


def test_the_blueprints_request_is_one_the_relay_takes(client, audio_host, useapi):
    """Fill the blueprint's IML with what the Drive trigger outputs, and send it."""
    http = json.loads(BLUEPRINT.read_text())["flow"][1]["mapper"]
    drive_output = {"1.id": "1AbCdEf", "1.name": "Interview take 3"}
    body = re.sub(r"\{\{(1\.\w+)\}\}", lambda m: drive_output[m.group(1)], http["jsonStringBodyContent"])
    sent = json.loads(body)
    assert sent["audio_url"] == "https://drive.google.com/file/d/1AbCdEf/view"
    # The Drive host is not reachable here: serve the same bytes locally, keep the rest of the body.
    sent["audio_url"] = serve_file(audio_host, "wav_pcm16_mono.wav")
    sent["dry_run"] = True
    headers = {h["name"]: h["value"] for h in http["headers"]}
    assert headers["Authorization"] == "Bearer YOUR_RELAY_API_KEY"
    response = client.post("/v1/voice-clones", json=sent, headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status_code == 200, response.json
    for reference in ("ok", "cloned_voice_item_id", "error_code", "error_message"):
        assert reference in response.json
    assert response.json["metadata"] == {"drive_file_id": "1AbCdEf"}


def test_the_n8n_workflow_waits_for_the_relays_callback():
    workflow = json.loads(N8N.read_text())
    nodes = {node["name"]: node for node in workflow["nodes"]}
    types = [node["type"] for node in workflow["nodes"]]
    assert types == [
        "n8n-nodes-base.manualTrigger",
        "n8n-nodes-base.httpRequest",
        "n8n-nodes-base.wait",
        "n8n-nodes-base.if",
    ]
    for node in workflow["nodes"]:
        assert {"parameters", "id", "name", "type", "typeVersion", "position"} <= set(node)
        assert "credentials" not in node  # nothing account-specific baked in
    http = nodes["Start the clone (relay)"]["parameters"]
    assert http["url"].endswith("/v1/voice-clones") and http["method"] == "POST"
    assert "callback_url: $execution.resumeUrl" in http["jsonBody"]
    wait = nodes["Wait for the relay's callback"]["parameters"]
    assert (wait["resume"], wait["httpMethod"]) == ("webhook", "POST")
    condition = nodes["Cloned?"]["parameters"]["conditions"]["conditions"][0]
    assert condition["leftValue"] == "={{ $json.body.ok }}"
    assert "ok" in ANSWER_FIELDS  # the callback body is the answer: body.ok is always there
    chain = workflow["connections"]
    order = []
    name = "When clicking 'Test workflow'"
    while name in chain:
        name = chain[name]["main"][0][0]["node"]
        order.append(name)
    assert order == ["Start the clone (relay)", "Wait for the relay's callback", "Cloned?"]


N8N_BINARY = SPEC / "n8n" / "clone-voice-from-binary.json"


def test_the_n8n_binary_workflow_sends_the_item_as_a_multipart_file(client):
    workflow = json.loads(N8N_BINARY.read_text())
    types = [node["type"] for node in workflow["nodes"]]
    assert types == [
        "n8n-nodes-base.manualTrigger",
        "n8n-nodes-base.readWriteFile",
        "n8n-nodes-base.httpRequest",
        "n8n-nodes-base.wait",
        "n8n-nodes-base.if",
    ]
    for node in workflow["nodes"]:
        assert "credentials" not in node
    http = next(node for node in workflow["nodes"] if node["type"] == "n8n-nodes-base.httpRequest")["parameters"]
    assert http["contentType"] == "multipart-form-data" and http["url"].endswith("/v1/voice-clones")
    parts = http["bodyParameters"]["parameters"]
    binary = [p for p in parts if p.get("parameterType") == "formBinaryData"]
    assert binary == [{"parameterType": "formBinaryData", "name": "file", "inputDataFieldName": "data"}]
    fields = {p["name"]: p["value"] for p in parts if p.get("parameterType") != "formBinaryData"}
    assert fields["callback_url"] == "={{ $execution.resumeUrl }}"
    # What n8n sends for a binary item read from disk: the file as part "file", the fields as text.
    sent = {name: value for name, value in fields.items() if not value.startswith("=")}
    sent.update(metadata=json.dumps({"file": "voice-note.ogg"}), dry_run="true", wait_seconds="20")
    sent["file"] = (io.BytesIO((MEDIA / "voice_note.opus").read_bytes()), "voice-note.ogg")
    response = client.post(
        "/v1/voice-clones",
        data=sent,
        content_type="multipart/form-data",
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
    assert response.status_code == 200, response.json
    assert (response.json["source_format"], response.json["converted"]) == ("opus", True)
    assert response.json["metadata"] == {"file": "voice-note.ogg"}


FILE_BLUEPRINT = SPEC / "make" / "blueprints" / "drive-file-to-cloned-voice.json"


def test_the_file_blueprint_downloads_the_file_and_sends_it_as_multipart(client):
    blueprint = json.loads(FILE_BLUEPRINT.read_text())
    found = list(modules(blueprint["flow"]))
    assert [m["module"] for m in found][:4] == [
        "google-drive:watchFilesInAFolder",
        "google-drive:getAFile",
        "http:MakeRequest",
        "builtin:BasicRouter",
    ]
    ids = [module["id"] for module in found]
    assert len(ids) == len(set(ids))
    for module in found:
        assert "__IMTCONN__" not in module.get("parameters", {})
    http = found[2]["mapper"]
    assert http["contentType"] == "multipart" and http["stopOnHttpError"] is False and http["timeout"] <= 300
    filters = [module["filter"]["conditions"][0][0] for module in found if "filter" in module]
    assert {f["a"] for f in filters} == {"{{3.data.ok}}"}
    # Fill the fields the way Make does with what Drive's two modules output, and send them.
    outputs = {"1.id": "1AbCdEf", "1.name": "Interview take 3", "2.fileName": "take-3.ogg"}
    data = (MEDIA / "voice_note.opus").read_bytes()
    sent = {}
    for field in http["multipartBodyContent"]:
        if field["multipartFieldType"] == "file":
            assert field["data"] == "{{2.data}}"
            sent[field["name"]] = (io.BytesIO(data), outputs[field["fileName"].strip("{}")])
        else:
            sent[field["name"]] = re.sub(r"\{\{([\w.]+)\}\}", lambda m: outputs[m.group(1)], field["value"])
    sent.update(dry_run="true", wait_seconds="20")  # a test: validate only, wait less than Make's 280 s
    response = client.post(
        "/v1/voice-clones",
        data=sent,
        content_type="multipart/form-data",
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
    assert response.status_code == 200, response.json
    assert response.json["metadata"] == {"drive_file_id": "1AbCdEf"}
    assert (response.json["source_format"], response.json["converted"]) == ("opus", True)
