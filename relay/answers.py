"""Answers: build the one normalized answer, and translate any error into it (the only place)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import RelayError
from .schemas import ANSWER_FIELDS

if TYPE_CHECKING:
    from .jobs import Job


def blank(request_id: str, **known: Any) -> dict[str, Any]:
    """An answer with every field present (nulls, no warnings, not ok), then ``known`` applied."""
    answer: dict[str, Any] = dict.fromkeys(ANSWER_FIELDS)
    answer.update(ok=False, status="failed", dry_run=False, reused=False, request_id=request_id, warnings=[])
    answer.update(known)
    return answer


RETRY_AFTER = "_retry_after"  # a failed job's wait in seconds, sent as the Retry-After header


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


def for_job(job: Job, now: datetime) -> dict[str, Any]:
    """The answer a job gives right now: its stored answer plus the job's own fields.

    Until the job ends, ``status`` tells how far it got: ``queued`` (waiting for a worker, or for
    a retry), ``running`` (a worker has it) or ``processing`` (useapi accepted it and is cloning).
    """
    # Keys starting with "_" are the relay's own notes between a job's steps, never part of an answer.
    stored = {key: value for key, value in (job.answer or {}).items() if not key.startswith("_")}
    answer = blank(stored.pop("request_id", ""), **stored)
    if not job.terminal:
        if job.phase == "uploaded":
            status = "processing"
        elif job.lease_expires_at is not None and job.lease_expires_at > now:
            status = "running"
        else:
            status = "queued"
        answer.update(ok=True, status=status, error_code=None, error_message=None)
        if status == "running":
            answer["message"] = "The clone is being worked on."
        elif status == "queued" and job.follows and job.exclusive_key is None:
            answer["message"] = (
                f"The clone waits for job {job.follows}, which makes a voice of the same name for this account."
            )
        elif status == "queued" and job.attempts and job.next_run_at is not None and job.next_run_at > now:
            # Tried and put back (useapi unreachable or busy, say): not the same as no worker at all.
            answer["message"] = "The clone waits to be tried again" + (
                "; warnings say what happened." if answer.get("warnings") else "."
            )
        elif status == "queued":
            answer["message"] = "The clone is waiting for a worker."
    answer.update(
        job_id=job.id,
        status_url=job.status_url,
        created_at=_iso(job.created_at),
        updated_at=_iso(job.updated_at),
        completed_at=_iso(job.completed_at),
        # The row records a callback's state once the job has ended; until then it is pending too.
        callback_status=job.callback_status or ("pending" if job.callback_url else None),
    )
    return answer


def http_status_for_job(job: Job) -> int:
    """The HTTP status a request that saw ``job`` in its current state answers with."""
    return (job.http_status or 200) if job.terminal else 202


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"
