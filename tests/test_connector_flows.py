"""The Make blueprint and the n8n workflow: importable shapes, no baked-in ids, and requests the relay takes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from relay.schemas import ANSWER_FIELDS
from relay.settings import Settings

from .conftest import HEADERS, RELAY_KEY, post, serve_file
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
    names = [module["module"] for module in blueprint["flow"]]
    assert names == [
        "google-drive:watchFilesInAFolder",
        "json:TransformToJSON",
        "json:TransformToJSON",
        "http:MakeRequest",
        "builtin:BasicRouter",
    ]
    for http in (m for m in found if m["module"] == "http:MakeRequest"):
        assert http["version"] == 4
        assert http["mapper"]["stopOnHttpError"] is False  # failures reach the router as answers with ok=false
        assert http["mapper"]["timeout"] <= 300


def test_the_blueprint_body_is_json_encoded_by_make_never_pasted(client, audio_host):
    """Every mapped value goes through Make's Transform to JSON: a file name with quotes cannot break the body."""
    flow = json.loads(BLUEPRINT.read_text())["flow"]
    drive = {"1.id": "1AbCdEf", "1.name": 'Bob "take 2".m4a'}
    transformed = {}
    for module in flow[1:3]:
        expression = module["mapper"]["object"]
        value = re.sub(r"\{\{(1\.\w+)\}\}", lambda m: drive[m.group(1)], expression)
        if expression.startswith("{{trim(replace(1.name;"):
            # Make's replace() with a regular expression, then trim(): the file extension is dropped
            assert expression == "{{trim(replace(1.name; /\\.[A-Za-z0-9]{1,5}$/; emptystring))}}"
            value = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", drive["1.name"]).strip()
        transformed[f"{module['id']}.json"] = json.dumps(value)  # what Transform to JSON outputs
    http = flow[3]["mapper"]
    template = http["jsonStringBodyContent"]
    assert not re.search(r'"\{\{', template), "a mapped value is pasted inside a JSON string"
    sent = json.loads(re.sub(r"\{\{(\d+\.json)\}\}", lambda m: transformed[m.group(1)], template))
    assert sent["audio_url"] == "https://drive.google.com/file/d/1AbCdEf/view"
    assert sent["name"] == 'Bob "take 2"'
    # The Drive host is not reachable here: serve the same bytes locally, keep the rest of the body.
    sent["audio_url"] = serve_file(audio_host, "wav_pcm16_mono.wav")
    sent["dry_run"] = True
    headers = {h["name"]: h["value"] for h in http["headers"]}
    assert headers["Authorization"] == "Bearer YOUR_RELAY_API_KEY"
    # one Drive file, one clone: Make running the module again for the file gets the first job
    assert headers["Idempotency-Key"] == "drive-file-{{1.id}}"
    sent_headers = {"Authorization": f"Bearer {RELAY_KEY}", "Idempotency-Key": f"drive-file-{drive['1.id']}"}
    response = client.post("/v1/voice-clones", json=sent, headers=sent_headers)
    assert response.status_code == 200, response.json
    assert response.json["name"] == 'Bob "take 2"'
    again = client.post("/v1/voice-clones", json=sent, headers=sent_headers)
    assert again.json["job_id"] == response.json["job_id"]


def test_both_blueprints_send_one_idempotency_key_per_drive_file():
    for path in (SPEC / "make" / "blueprints").glob("*.json"):
        found = modules(json.loads(path.read_text())["flow"])
        posts = [m for m in found if m["module"] == "http:MakeRequest" and m["mapper"]["method"] == "post"]
        assert posts, path.name
        for http in posts:
            headers = {h["name"]: h["value"] for h in http["mapper"]["headers"]}
            assert headers["Idempotency-Key"] == "drive-file-{{1.id}}", path.name


def passes(module: dict, outputs: dict[int, dict]) -> bool:
    """Make's filter on ``module``: OR of AND-ed conditions over ``{{N.data.field}}`` of earlier answers."""
    if "filter" not in module:
        return True

    def value(text: str):
        match = re.fullmatch(r"\{\{(\d+)\.data\.(\w+)\}\}", text)
        return outputs[int(match.group(1))].get(match.group(2)) if match else text

    def holds(condition: dict) -> bool:
        a, operator, b = value(condition["a"]), condition["o"], condition.get("b")
        shown = "" if a is None else str(a).lower() if isinstance(a, bool) else str(a)
        return {
            "boolean:equal": lambda: shown == b,
            "boolean:notequal": lambda: shown != b,
            "text:equal": lambda: shown == b,
            "text:notequal": lambda: shown != b,
            "exist": lambda: a is not None and a != "",
        }[operator]()

    return any(all(holds(c) for c in group) for group in module["filter"]["conditions"])


def routes_taken(router: dict, outputs: dict[int, dict]) -> list[str]:
    return [
        route["flow"][0]["metadata"]["designer"]["name"]
        for route in router["routes"]
        if passes(route["flow"][0], outputs)
    ]


@pytest.mark.parametrize(
    ("path", "clone", "poll_id"),
    [("drive-folder-to-cloned-voice.json", 4, 8), ("drive-file-to-cloned-voice.json", 3, 7)],
    ids=["link", "file"],
)
def test_the_blueprint_takes_the_route_that_matches_each_real_answer(
    make_app, job_settings, fake, audio_host, path, clone, poll_id
):
    # A 202 (still cloning) must never take the "ready" route: that would store an empty voice id.
    client = make_app(job_settings).test_client()
    good, bad = serve_file(audio_host, "wav_pcm16_mono.wav"), serve_file(audio_host, "drive_interstitial.html")
    flow = json.loads((SPEC / "make" / "blueprints" / path).read_text())["flow"]
    router = flow[clone]
    assert flow[clone - 1]["id"] == clone and flow[clone - 1]["module"] == "http:MakeRequest"
    ready = post(client, {"audio_url": good, "name": "Ready", "wait_seconds": 20}).json
    assert ready["status"] == "ready"
    assert routes_taken(router, {clone: ready}) == ["Voice ready: use cloned_voice_item_id"]
    failed = post(client, {"audio_url": bad, "name": "Not audio", "wait_seconds": 20}).json
    assert failed["status"] == "failed"
    assert routes_taken(router, {clone: failed}) == ["Failed: branch on error_code"]
    fake.ready_after_polls = 10_000  # useapi keeps cloning: the relay answers 202 when the wait ends
    going = post(client, {"audio_url": good, "name": "Slow", "wait_seconds": 0.5}).json
    assert going["status"] in ("queued", "running", "processing") and going["ok"] is True
    assert routes_taken(router, {clone: going}) == ["Wait 5 minutes (Make's longest sleep)"]
    poll = router["routes"][1]["flow"][2]
    assert router["routes"][1]["flow"][1]["id"] == poll_id
    still = client.get(going["status_url"], headers=HEADERS).json
    assert routes_taken(poll, {clone: going, poll_id: still}) == ["Still cloning: check status_url later"]
    wrong_key = client.get(going["status_url"], headers={"Authorization": "Bearer wrong"}).json
    assert routes_taken(poll, {clone: going, poll_id: wrong_key}) == ["Failed: branch on error_code"]
    assert routes_taken(poll, {clone: going, poll_id: ready}) == ["Voice ready: use cloned_voice_item_id"]


def node_types(workflow: dict) -> list[str]:
    """The workflow's node types in order, once every node is checked to be a whole n8n node with
    nothing account-specific (no credentials) baked in."""
    for node in workflow["nodes"]:
        assert {"parameters", "id", "name", "type", "typeVersion", "position"} <= set(node)
        assert "credentials" not in node
    return [node["type"] for node in workflow["nodes"]]


# One key per execution and item: n8n's "Retry On Fail" reruns the node within the same execution. The
# resume URL without its query names the n8n instance and the execution (the id alone restarts at 1 on a
# new instance); a key met again with another body is a clear 422, never someone else's clone.
N8N_KEY = "={{ $execution.resumeUrl.split('?')[0] }}/item-{{ $itemIndex }}"


def n8n_idempotency_key(http: dict) -> str:
    return {h["name"]: h["value"] for h in http["headerParameters"]["parameters"]}["Idempotency-Key"]


def test_the_n8n_workflow_waits_for_the_relays_callback():
    workflow = json.loads(N8N.read_text())
    assert workflow["id"]  # `n8n import:workflow --input=<file>` needs one
    nodes = {node["name"]: node for node in workflow["nodes"]}
    assert node_types(workflow) == [
        "n8n-nodes-base.manualTrigger",
        "n8n-nodes-base.httpRequest",
        "n8n-nodes-base.if",
        "n8n-nodes-base.wait",
        "n8n-nodes-base.set",
        "n8n-nodes-base.if",
    ]
    http = nodes["Start the clone (relay)"]["parameters"]
    assert http["url"].endswith("/v1/voice-clones") and http["method"] == "POST"
    assert "callback_url: $execution.resumeUrl" in http["jsonBody"]
    assert n8n_idempotency_key(http) == N8N_KEY  # Retry On Fail, or a rerun, never pays twice
    # a relay that refuses at once (401, 422) must reach the branch, not stop the workflow
    assert http["options"]["response"]["response"]["neverError"] is True
    wait = nodes["Wait for the relay's callback"]["parameters"]
    assert (wait["resume"], wait["httpMethod"]) == ("webhook", "POST")
    assert wait["limitWaitTime"] is True and wait["limitType"] == "afterTimeInterval"
    limit = wait["resumeAmount"] * {"minutes": 60, "hours": 3600}[wait["resumeUnit"]]
    assert limit > Settings().ready_timeout_seconds
    going = nodes["Still cloning?"]["parameters"]["conditions"]["conditions"][0]["leftValue"]
    assert all(status in going for status in ("queued", "running", "processing"))
    cloned = nodes["Cloned?"]["parameters"]["conditions"]["conditions"]
    assert [c["leftValue"] for c in cloned] == ["={{ $json.ok }}", "={{ $json.status }}"]
    assert cloned[1]["rightValue"] == "ready"
    assert "ok" in ANSWER_FIELDS and "status" in ANSWER_FIELDS  # the answer always has both
    chain = {
        name: [[link["node"] for link in group] for group in links["main"]]
        for name, links in workflow["connections"].items()
    }
    assert chain == {
        "When clicking 'Test workflow'": [["Start the clone (relay)"]],
        "Start the clone (relay)": [["Still cloning?"]],
        "Still cloning?": [["Wait for the relay's callback"], ["The relay's answer"]],
        "Wait for the relay's callback": [["The relay's answer"]],
        "The relay's answer": [["Cloned?"]],
    }


N8N_BINARY = SPEC / "n8n" / "clone-voice-from-binary.json"


def test_the_n8n_binary_workflow_sends_the_item_as_a_multipart_file(client):
    workflow = json.loads(N8N_BINARY.read_text())
    assert node_types(workflow) == [
        "n8n-nodes-base.manualTrigger",
        "n8n-nodes-base.readWriteFile",
        "n8n-nodes-base.httpRequest",
        "n8n-nodes-base.if",
        "n8n-nodes-base.wait",
        "n8n-nodes-base.set",
        "n8n-nodes-base.if",
    ]
    # After the upload, the same routing as the link workflow (immediate refusals, a bounded wait).
    link = json.loads(N8N.read_text())
    after = json.dumps([n["parameters"] for n in workflow["nodes"][3:]]).replace("7a2d3b20", "6f1c2a10")
    assert after == json.dumps([n["parameters"] for n in link["nodes"][2:]])  # node ids aside
    assert workflow["id"] != link["id"]
    http = next(node for node in workflow["nodes"] if node["type"] == "n8n-nodes-base.httpRequest")["parameters"]
    assert http["contentType"] == "multipart-form-data" and http["url"].endswith("/v1/voice-clones")
    parts = http["bodyParameters"]["parameters"]
    binary = [p for p in parts if p.get("parameterType") == "formBinaryData"]
    assert binary == [{"parameterType": "formBinaryData", "name": "file", "inputDataFieldName": "data"}]
    fields = {p["name"]: p["value"] for p in parts if p.get("parameterType") != "formBinaryData"}
    assert fields["callback_url"] == "={{ $execution.resumeUrl }}"
    assert n8n_idempotency_key(http) == N8N_KEY
    # What n8n sends for a binary item read from disk: the file as part "file", the fields as text.
    sent = {name: value for name, value in fields.items() if not value.startswith("=")}
    sent.update(metadata=json.dumps({"file": "voice-note.ogg"}), dry_run="true", wait_seconds="20")
    sent["file"] = (io.BytesIO((MEDIA / "voice_note.opus").read_bytes()), "voice-note.ogg")
    response = post_form(client, sent)
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
    assert {f["a"] for f in filters} == {"{{3.data.ok}}", "{{7.data.ok}}"}  # the answer, and the status poll
    # Fill the fields the way Make does with what Drive's two modules output, and send them.
    outputs = {"1.id": "1AbCdEf", "1.name": "Interview take 3.ogg", "2.fileName": "take-3.ogg"}
    data = (MEDIA / "voice_note.opus").read_bytes()
    sent = {}
    for field in http["multipartBodyContent"]:
        if field["multipartFieldType"] == "file":
            assert field["data"] == "{{2.data}}"
            sent[field["name"]] = (io.BytesIO(data), outputs[field["fileName"].strip("{}")])
        elif field["value"].startswith("{{trim(replace(1.name;"):
            # Make's replace() with a regular expression, then trim(): the file extension is dropped
            assert field["value"] == "{{trim(replace(1.name; /\\.[A-Za-z0-9]{1,5}$/; emptystring))}}"
            sent[field["name"]] = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", outputs["1.name"]).strip()
        else:
            sent[field["name"]] = re.sub(r"\{\{([\w.]+)\}\}", lambda m: outputs[m.group(1)], field["value"])
    sent.update(dry_run="true", wait_seconds="20")  # a test: validate only, wait less than Make's 280 s
    response = post_form(client, sent)
    assert response.status_code == 200, response.json
    assert response.json["metadata"] == {"drive_file_id": "1AbCdEf"}
    assert response.json["name"] == "Interview take 3"
    assert (response.json["source_format"], response.json["converted"]) == ("opus", True)


def post_form(client, sent: dict):
    """POST ``sent`` as multipart/form-data, as Make's and n8n's HTTP modules send a file."""
    return client.post(
        "/v1/voice-clones",
        data=sent,
        content_type="multipart/form-data",
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
