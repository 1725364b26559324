"""The URL guard: which addresses and URLs may be fetched."""

from __future__ import annotations

import ipaddress

import pytest

from relay import urlguard
from relay.errors import DownloadFailed, UrlNotAllowed

FORBIDDEN_ADDRESSES = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::",
    "2002:a9fe:a9fe::1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "::127.0.0.1",
    "2001:db8::1",
    "fec0::1",  # site-local: deprecated, still routed inside some networks
]
PUBLIC_ADDRESSES = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("text", FORBIDDEN_ADDRESSES)
def test_non_global_addresses_are_forbidden(text):
    assert not urlguard.is_allowed(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(text):
    assert urlguard.is_allowed(ipaddress.ip_address(text))


def test_allowed_networks_open_exactly_what_they_name():
    allowed = (ipaddress.ip_network("127.0.0.2/32"),)
    assert urlguard.is_allowed(ipaddress.ip_address("127.0.0.2"), allowed)
    assert not urlguard.is_allowed(ipaddress.ip_address("127.0.0.1"), allowed)
    assert not urlguard.is_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), allowed)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.wav",
        "gopher://example.com/",
        "data:audio/wav;base64,AAAA",
        "javascript:alert(1)",
        "example.com/a.wav",
        "http://user:pass@example.com/a.wav",
        "http://user@example.com/",
        "http:///a.wav",
        "http://example.com:0/",
        "http://exa mple.com/",
        "http://example.com\\@127.0.0.1/",
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/",
        "http://10.1.2.3/",
        "http://[fe80::1%25eth0]/",
        "http://example.com:99999/",
        "",
        # names no resolver takes: an empty label, a label over 63 characters, brackets around IPv4
        "http://a..b/x.wav",
        "http://localhost../",
        "http://.example/",
        "http://example.com../",
        "http://" + "a" * 64 + ".com/",
        "http://[127.0.0.1]/",
        "http://[::1/",
    ],
)
def test_literal_check_refuses(url):
    with pytest.raises(UrlNotAllowed):
        urlguard.check_literal(url)


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0", "localhost", "LOCALHOST.", "127.000.000.001"],
)
def test_odd_notations_resolve_to_a_forbidden_address(host):
    # getaddrinfo turns each of these into 127.0.0.1 or 0.0.0.0; the resolved address is what counts.
    with pytest.raises(UrlNotAllowed):
        urlguard.check(f"http://{host}:8080/a.wav")


def test_a_refusal_says_how_an_operator_allows_a_private_network_and_names_the_scheme():
    with pytest.raises(UrlNotAllowed, match=r"10\.0\.0\.7 is not a public .* RELAY_ALLOWED_NETWORKS"):
        urlguard.check_literal("http://10.0.0.7:5678/webhook")
    with pytest.raises(UrlNotAllowed, match=r"can be fetched, not ftp:\. Use"):
        urlguard.check_literal("ftp://example.com/a.wav")
    with pytest.raises(UrlNotAllowed, match=r"not a URL without a scheme\. Use"):
        urlguard.check_literal("example.com/a.wav")


def test_every_resolved_address_must_be_allowed():
    with pytest.raises(UrlNotAllowed):
        urlguard.check("https://example.com/a.wav", resolve=lambda host, port: ["93.184.216.34", "10.0.0.5"])


def test_a_public_name_is_pinned_to_its_checked_address():
    target = urlguard.check("https://Example.COM/a.wav?sig=1", resolve=lambda host, port: ["93.184.216.34"])
    assert (target.host, target.port, target.address) == ("example.com", 443, "93.184.216.34")


def test_internationalized_names_are_encoded_before_resolving():
    seen = []
    urlguard.check("https://bücher.example/a.wav", resolve=lambda host, port: seen.append(host) or ["93.184.216.34"])
    assert seen == ["xn--bcher-kva.example"]


def test_an_unresolvable_name_is_a_download_failure():
    with pytest.raises(DownloadFailed):
        urlguard.check("http://no-such-host.invalid/a.wav")


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "https://bucket.s3.amazonaws.com/v.wav?X-Amz-Signature=abc&X-Amz-Credential=k",
            "https://bucket.s3.amazonaws.com/v.wav",
        ),
        ("https://user:secret@example.com:8443/a.mp3#frag", "https://example.com:8443/a.mp3"),
        ("http://[::1]:80/x?y=1", "http://[::1]:80/x"),
        # A secret in the path: a Telegram bot's file link, a JWT or key as a segment; file names stay.
        (
            "https://api.telegram.org/file/bot7712345678:AAHsEcReT-kQ9xZ_abcdefghijklmnopq/voice/file_7.oga",
            "https://api.telegram.org/file/…/voice/file_7.oga",
        ),
        ("https://x.example/eyJhbGciOiJIUzI1NiJ9eyJzdWIiOiIxMjM0NTY3ODkwIn0/v.mp3", "https://x.example/…/v.mp3"),
        (
            "https://x.example/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV/v",
            "https://x.example/…/v",
        ),
        (
            "https://api.telegram.org/file/bot77123%3AAAHsEcReT-kQ9xZ/voice/f.oga",
            "https://api.telegram.org/file/…/voice/f.oga",
        ),
        ("https://hook.eu1.make.com/abcdefghij0123456789klmnopqrstuv", "https://hook.eu1.make.com/…"),
        ("https://x.example/my_interview_recording_2024_final_take3.m4a", None),
        ("https://x.example/recordings/2024/interview-with-the-whole-team-final.wav", None),
    ],
)
def test_redact_drops_credentials_queries_and_fragments(url, redacted):
    assert urlguard.redact(url) == (url if redacted is None else redacted)
