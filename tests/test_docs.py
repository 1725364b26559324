"""The README documents every error code and every setting the code knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import all_error_classes
from relay.schemas import ANSWER_FIELDS
from relay.settings import _SPECS

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("code", sorted({cls.error_code for cls in all_error_classes()}))
def test_every_error_code_is_documented(code):
    assert f"| `{code}` |" in README


@pytest.mark.parametrize("env", [spec.env for spec in _SPECS])
def test_every_setting_is_documented(env):
    assert f"| `{env}` |" in README


@pytest.mark.parametrize("field", ANSWER_FIELDS)
def test_every_answer_field_is_documented(field):
    assert f"`{field}`" in README


CONNECTORS = (Path(__file__).parent.parent / "connector_spec" / "README.md").read_text()


@pytest.mark.parametrize("code", sorted({cls.error_code for cls in all_error_classes()}))
def test_the_recipes_say_what_every_error_code_means_for_a_scenario(code):
    assert f"`{code}`" in CONNECTORS


def test_the_readmes_sample_answer_has_every_field_in_order():
    # "Every field is always present": the sample a newcomer compares with has them all too.
    import json
    import re

    sample = re.search(r"A real answer \(HTTP 200\):\n\n```json\n(.*?)\n```", README, re.DOTALL).group(1)
    keys = list(json.loads(sample))
    assert [key for key in keys if key in ANSWER_FIELDS] == list(ANSWER_FIELDS)
