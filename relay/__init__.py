"""The voice-clone relay: one JSON call in, a voice cloned at useapi.net, one flat answer out."""

from __future__ import annotations

__version__ = "0.1.0"

from flask import Flask  # noqa: E402

from .settings import Settings  # noqa: E402


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app. ``settings`` defaults to :meth:`Settings.from_env`, read once, here.

    Gunicorn target: ``relay:create_app()``.
    """
    from . import api, logs

    settings = Settings.from_env() if settings is None else settings.validated()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_json_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.extensions["relay.settings"] = settings
    logs.configure(settings.log_level)
    api.register(app)
    return app


__all__ = ["Settings", "__version__", "create_app"]
