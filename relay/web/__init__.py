"""The relay's own web pages: the start page at ``/`` (what this relay is, its health, how to connect
Make, Zapier and n8n to it) and the console at ``/console`` (recent clones, their timelines, voices,
a clone to try), behind the relay key.

Server-rendered (Jinja), a little plain JavaScript, no asset from another origin: every page carries
``Content-Security-Policy: default-src 'self'``. The console reads the job store; the only things it
changes are the ones a person asks for (re-send a callback, delete a voice, start a clone).
"""

from __future__ import annotations

import os

from flask import Flask

from ..settings import Settings
from .security import LoginLimiter, Sessions


def register(app: Flask) -> None:
    """Mount the start page, the console and their static files."""
    from . import console, home

    settings: Settings = app.extensions["relay.settings"]
    app.extensions["relay.console.sessions"] = Sessions(settings)
    # Heroku sets DYNO in every dyno, Render sets RENDER: there the connecting address is the router's.
    router = bool(os.environ.get("DYNO") or os.environ.get("RENDER"))
    app.extensions["relay.console.limiter"] = LoginLimiter(behind_router=router)
    app.register_blueprint(home.bp)
    app.register_blueprint(console.bp)
    app.register_error_handler(404, console.unknown_path)
