"""SSRF through the public endpoint: no bad URL reaches a listening internal server."""

from __future__ import annotations

import pytest

from .conftest import clone


def bad_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/a.wav",
        f"http://localhost:{port}/a.wav",
        f"http://2130706433:{port}/a.wav",
        f"http://0x7f000001:{port}/a.wav",
        f"http://0177.0.0.1:{port}/a.wav",
        f"http://127.1:{port}/a.wav",
        f"http://0:{port}/a.wav",
        f"http://[::1]:{port}/a.wav",
        f"http://[::ffff:127.0.0.1]:{port}/a.wav",
        f"http://[::ffff:7f00:1]:{port}/a.wav",
        f"http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/a.wav",
        f"http://127.0.0.1.:{port}/a.wav",
        f"HTTP://LOCALHOST:{port}/a.wav",
        f"http://user:pw@127.0.0.2:{port}/a.wav",
        f"http://127.0.0.2:{port}\\@127.0.0.1:{port}/a.wav",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://10.0.0.1/a.wav",
        "http://192.168.0.1/a.wav",
        f"file:///etc/passwd#:{port}",
        f"ftp://127.0.0.2:{port}/a.wav",
        f"gopher://127.0.0.1:{port}/_GET",
        f"dict://127.0.0.1:{port}/",
    ]


def test_no_bad_url_reaches_an_internal_server(client, useapi):
    port = useapi.port  # a real server listening on 127.0.0.1, standing in for any internal service
    useapi.expect_request("/a.wav").respond_with_data(b"secret internal data")
    for url in bad_urls(port):
        response = clone(client, {"audio_url": url, "name": "x", "dry_run": True})
        assert response.status_code in (400, 422), url
        assert response.json["error_code"] in ("url_not_allowed", "invalid_request"), (url, response.json)
    assert useapi.log == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_from_an_allowed_host_to_an_internal_one_is_refused(client, audio_host, useapi, status):
    useapi.expect_request("/a.wav").respond_with_data(b"secret internal data")
    audio_host.expect_request("/share").respond_with_data(
        "", status=status, headers={"Location": f"http://localhost:{useapi.port}/a.wav"}
    )
    response = clone(client, {"audio_url": audio_host.url_for("/share"), "name": "x", "dry_run": True})
    assert (response.status_code, response.json["error_code"]) == (422, "url_not_allowed")
    assert useapi.log == []
