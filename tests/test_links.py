"""Share links rewritten to direct downloads."""

from __future__ import annotations

import pytest

from relay.links import direct_download

DRIVE = "https://drive.google.com/uc?export=download&id=1AbC_d-EfG"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://drive.google.com/file/d/1AbC_d-EfG/view?usp=sharing", DRIVE),
        ("https://drive.google.com/file/d/1AbC_d-EfG/view", DRIVE),
        ("https://drive.google.com/open?id=1AbC_d-EfG", DRIVE),
        ("https://drive.google.com/uc?id=1AbC_d-EfG", DRIVE),
        (  # a file shared before 2017 needs its resource key
            "https://drive.google.com/file/d/1AbC_d-EfG/view?usp=sharing&resourcekey=0-XyZ",
            DRIVE + "&resourcekey=0-XyZ",
        ),
        ("https://drive.google.com/open?id=1AbC_d-EfG&resourcekey=0-XyZ", DRIVE + "&resourcekey=0-XyZ"),
        ("https://www.dropbox.com/s/abc123/voice.m4a?dl=0", "https://www.dropbox.com/s/abc123/voice.m4a?dl=1"),
        (
            "https://www.dropbox.com/scl/fi/x/voice.wav?rlkey=k&dl=0",
            "https://www.dropbox.com/scl/fi/x/voice.wav?rlkey=k&dl=1",
        ),
        ("https://www.dropbox.com/s/abc123/voice.m4a", "https://www.dropbox.com/s/abc123/voice.m4a?dl=1"),
    ],
)
def test_share_links_become_direct_downloads(given, expected):
    url, note = direct_download(given)
    assert url == expected
    assert note


@pytest.mark.parametrize(
    "given",
    [
        DRIVE,
        "https://drive.google.com/uc?export=download&id=1AbC_d-EfG&resourcekey=0-XyZ&confirm=t",
        "https://www.dropbox.com/s/abc123/voice.m4a?dl=1",
        "https://www.dropbox.com/s/abc123/voice.m4a?raw=1",
        "https://example.com/file/d/123/view",
        "https://bucket.s3.amazonaws.com/voice.wav?X-Amz-Signature=abc",
    ],
)
def test_other_links_are_left_alone(given):
    assert direct_download(given) == (given, None)
