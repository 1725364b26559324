"""The start page: ``GET /`` — what the relay is, its health, and how to connect each tool to it.

A browser gets HTML; an API client (``Accept: */*`` or JSON) gets a short JSON description. No job
data and no secret appear here: it is public.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Blueprint, current_app, g, jsonify, render_template, request
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__, db
from ..db import utcnow
from .security import security_headers, wants_html

log = logging.getLogger("relay.web")

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/assets")
bp.after_request(security_headers)
HEARTBEAT_STALE_SECONDS = 30


@dataclass(frozen=True)
class Health:
    database: bool
    schema_version: int | None
    schema_latest: int
    worker_heartbeat_age_seconds: float | None
    server_token: bool
    console: bool

    @property
    def workers(self) -> bool:
        age = self.worker_heartbeat_age_seconds
        return age is not None and age <= HEARTBEAT_STALE_SECONDS

    @property
    def ok(self) -> bool:
        # a newer schema: a newer release migrated it (a deploy or rollback under way); this code runs on it
        return self.database and (self.schema_version or 0) >= self.schema_latest and self.workers


def health() -> Health:
    """The same facts as ``/readyz``, plus which settings a user must know about (never their values)."""
    runtime = current_app.extensions["relay.runtime"]
    settings = current_app.extensions["relay.settings"]
    try:
        version = db.current_version(runtime.engine)
        heartbeat = runtime.store.last_heartbeat()
        reachable = True
    except SQLAlchemyError as err:
        log.warning("start page: database unreachable (%s)", type(err).__name__)
        version, heartbeat, reachable = None, None, False
    age = None if heartbeat is None else round((utcnow() - heartbeat).total_seconds(), 1)
    return Health(reachable, version, db.LATEST, age, bool(settings.useapi_token), bool(settings.relay_api_key))


def public_base() -> str:
    """This relay's address as callers should use it."""
    settings = current_app.extensions["relay.settings"]
    return settings.public_url or f"{request.scheme}://{request.host}"


@bp.get("/")
def home():
    state = health()
    base = public_base()
    if not wants_html():
        return jsonify(
            ok=True,
            service="voice-clone-relay",
            version=__version__,
            database=state.database,
            workers=state.workers,
            server_useapi_token=state.server_token,
            clone_url=f"{base}/v1/voice-clones",
            openapi_url=f"{base}/openapi.json",
            console_url=f"{base}/console",
            request_id=g.request_id,
        )
    # Make's module asks to wait 280 s; this relay waits at most RELAY_MAX_WAIT_SECONDS (25 on Heroku).
    make_wait = min(280, int(current_app.extensions["relay.settings"].max_wait_seconds))
    return render_template("home.html", base=base, health=state, version=__version__, make_wait=make_wait)
