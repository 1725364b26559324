"""Answers: build the one normalized answer, and translate any error into it (the only place)."""

from __future__ import annotations

from typing import Any

from .errors import RelayError
from .schemas import ANSWER_FIELDS


def blank(request_id: str, **known: Any) -> dict[str, Any]:
    """An answer with every field present (nulls, no warnings, not ok), then ``known`` applied."""
    answer: dict[str, Any] = dict.fromkeys(ANSWER_FIELDS)
    answer.update(ok=False, status="failed", dry_run=False, reused=False, request_id=request_id, warnings=[])
    answer.update(known)
    return answer


def failure(err: RelayError, answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``(http_status, answer)`` for ``err``, keeping what ``answer`` already knew."""
    answer = {**answer, **{k: v for k, v in err.fields.items() if k in ANSWER_FIELDS}}
    answer.update(
        ok=False,
        status="failed",
        error_code=err.error_code,
        error_message=err.message,
        message=err.message,
    )
    return err.http_status, answer
