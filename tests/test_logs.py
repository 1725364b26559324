"""Logs: one JSON line per request; no token, key or signed-URL query ever appears."""

from __future__ import annotations

import json
import logging

from relay.logs import JsonFormatter

from .conftest import RELAY_KEY, TOKEN, clone, serve_file


def test_a_clone_logs_one_line_without_secrets(make_app, settings, audio_host, useapi, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(settings.replace(useapi_token="server-token-zzzzzzzzzzzz"))
    serve_file(audio_host, "wav_pcm16_mono.wav", path="/v.wav")
    useapi.expect_request("/v1/tempolor/music/cloned-voices/").respond_with_json(
        {"error": f"Unauthorized {TOKEN}", "code": 401}, status=401
    )
    signed = audio_host.url_for("/v.wav") + "?X-Amz-Signature=sig-s3cr3t&X-Amz-Credential=cred-s3cr3t"
    clone(app.test_client(), {"audio_url": signed, "name": "x"})
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("relay")]
    access = [json.loads(line) for line in lines if '"relay.access"' in line]
    assert len(access) == 1
    assert access[0]["status"] == 401 and access[0]["error_code"] == "upstream_unauthorized"
    assert access[0]["audio_url"] == audio_host.url_for("/v.wav")
    text = "\n".join(lines)
    for secret in (TOKEN, RELAY_KEY, "server-token-zzzzzzzzzzzz", "sig-s3cr3t", "cred-s3cr3t"):
        assert secret not in text


def test_a_secret_in_a_links_path_is_not_logged_answered_or_kept(make_app, job_settings, audio_host, caplog):
    """A Telegram bot's file link carries the bot's token in its path: it reaches neither the
    access line, nor the error message (answered, stored, sent to the callback), nor the job row."""
    caplog.set_level(logging.DEBUG)
    app = make_app(job_settings)
    bot = "bot7712345678:AAHsEcReT-kQ9xZ_abcdefghijklmnopq"
    link = audio_host.url_for(f"/file/{bot}/voice/missing_9.oga")  # not served: the host answers 404
    response = clone(app.test_client(), {"audio_url": link, "name": "From a bot"})
    assert response.json["error_code"] == "download_failed", response.json
    assert "/file/…/voice/missing_9.oga" in response.json["error_message"]
    job = app.extensions["relay.runtime"].store.get(response.json["job_id"])
    formatter = JsonFormatter()
    lines = "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("relay"))
    for where in (lines, json.dumps(response.json), json.dumps(job.request), json.dumps(job.answer)):
        assert "AAHsEcReT" not in where
