"""History: read-only queries over the job store for the console — recent clones, filtered and paged.

Nothing here writes: the console reads jobs as the API and the workers left them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import JSON, Engine, and_, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from .db import jobs, reader
from .jobs import FAILED, READY, TERMINAL, Job

# Status filters, in the words of the answer's ``status``.
STATUS_FILTERS = ("in_progress", "ready", "validated", "failed")
PER_PAGE = 25


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    page: int
    has_next: bool


def recent(
    engine: Engine,
    *,
    status: str | None = None,
    error_code: str | None = None,
    name: str | None = None,
    page: int = 1,
    per_page: int = PER_PAGE,
) -> Page:
    """Jobs newest first, ``per_page`` at a time. ``status`` is one of :data:`STATUS_FILTERS`,
    ``error_code`` matches exactly, ``name`` is a case-insensitive part of the voice name."""
    page = max(page, 1)
    conditions: list[ColumnElement] = []
    if status == "in_progress":
        conditions.append(jobs.c.phase.not_in(TERMINAL))
    elif status in ("ready", "validated"):
        conditions.append(and_(jobs.c.phase == READY, jobs.c.dry_run.is_(status == "validated")))
    elif status == "failed":
        conditions.append(jobs.c.phase == FAILED)
    if error_code:
        conditions.append(_json_text(engine, jobs.c.answer, "error_code") == error_code)
    if name:
        pattern = "%" + name.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        conditions.append(func.lower(_json_text(engine, jobs.c.request, "name")).like(pattern, escape="\\"))
    query = (
        select(jobs)
        .where(*conditions)
        .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        .offset((page - 1) * per_page)
        .limit(per_page + 1)
    )
    with reader(engine) as conn:
        rows = conn.execute(query).all()
    found = [Job.from_row(row) for row in rows[:per_page]]
    return Page(found, page, len(rows) > per_page)


def error_codes(engine: Engine, limit: int = 200, among: int = 1000) -> list[str]:
    """The distinct ``error_code`` values among the newest ``among`` failed jobs (the filter's
    choices): a bounded read on every view of the list, however many jobs are kept."""
    newest = (
        select(jobs.c.answer)
        .where(jobs.c.phase == FAILED)
        .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        .limit(among)
        .subquery()
    )
    code = _json_text(engine, newest.c.answer, "error_code")
    with reader(engine) as conn:
        found = conn.scalars(select(code).where(code.is_not(None)).group_by(code).order_by(code).limit(limit)).all()
    return [c for c in found if c]


def _json_text(engine: Engine, column, key: str) -> ColumnElement:
    """The text of top-level ``key`` of a JSON-text column, on SQLite and PostgreSQL."""
    if engine.dialect.name == "postgresql":
        return func.json_extract_path_text(cast(column, JSON), key)
    return func.json_extract(column, f"$.{key}")
