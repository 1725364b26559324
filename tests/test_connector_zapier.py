"""The Zapier app: `npm test` runs Zapier's schema checks and its app tester against a live relay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import RELAY_KEY, TOKEN, over_http, serve_file
from .test_convert import MEDIA

ZAPIER = Path(__file__).parent.parent / "connector_spec" / "zapier"


@pytest.fixture
def live_relay(make_app, job_settings):
    with over_http(make_app(job_settings)) as base:
        yield base


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_zapier_app_runs_green_against_a_live_relay(live_relay, fake, audio_host):
    if not shutil.which("npm") or not (ZAPIER / "node_modules" / "zapier-platform-core").is_dir():
        pytest.skip("run `npm ci` in connector_spec/zapier first (.ci/run does)")
    env = {
        **os.environ,
        "RELAY_URL": live_relay,
        "RELAY_KEY": RELAY_KEY,
        "USEAPI_TOKEN": TOKEN,
        "AUDIO_URL": serve_file(audio_host, "m4a_aac.m4a", path="/voice.m4a"),
        "FILE_URL": _serve_voice_note(audio_host),
    }
    result = subprocess.run(["npm", "test"], cwd=ZAPIER, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# skipped 0" in result.stdout
    assert fake.upload_count() == 1


def _serve_voice_note(audio_host) -> str:
    """A voice note behind a URL shaped like the one Zapier hands an app for a file field."""
    path = "/cli/files/hydrate/4f2a9c/voice-note.ogg"
    audio_host.expect_request(path).respond_with_data((MEDIA / "voice_note.opus").read_bytes())
    return audio_host.url_for(path)
