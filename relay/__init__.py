"""The voice-clone relay: one JSON call in, a voice cloned at useapi.net, one flat answer out."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING  # noqa: E402

from .settings import Settings  # noqa: E402

if TYPE_CHECKING:  # Flask is imported when an app is built, not by `python -m relay.convert`
    from flask import Flask


def create_app(settings: Settings | None = None, workers: int | None = None) -> Flask:
    """Build the WSGI app. ``settings`` defaults to :meth:`Settings.from_env`, read once, here.

    The database is migrated and, unless ``RELAY_INPROCESS_WORKERS=0`` (or ``workers=0``), an
    in-process worker pool starts. ``app.extensions["relay.runtime"].close()`` stops it.
    Gunicorn target: ``relay:create_app()``.
    """
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import api, logs, web
    from .runtime import Runtime

    settings = (Settings.from_env() if settings is None else settings.validated()).check_serving()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    # Heroku and Render terminate TLS in front and say so in X-Forwarded-Proto. X-Forwarded-Host is
    # believed only when the operator says a proxy sets it: any caller can send the header.
    # x_for=0: the client address stays the connecting one (the console's login limit reads
    # X-Forwarded-For itself, beside it; ProxyFix's default would let a client choose its address).
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=0, x_proto=1, x_host=1 if settings.trust_forwarded_host else 0)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_json_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.extensions["relay.settings"] = settings
    app.extensions["relay.runtime"] = Runtime.build(
        settings, settings.inprocess_workers if workers is None else workers
    )
    api.register(app)
    web.register(app)  # the start page and the console
    return app


__all__ = ["Settings", "__version__", "create_app"]
