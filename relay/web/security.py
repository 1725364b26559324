"""Security of the relay's pages: who is a browser, the console's session cookie, CSRF tokens,
the login rate limit and the headers every page carries.

The session is a cookie signed with HMAC (itsdangerous) under a key derived by HKDF from
``RELAY_SECRET_KEY`` and ``RELAY_API_KEY``: changing the relay key ends every session. It holds a
random CSRF token and, once signed in, the login time; it expires :data:`SESSION_SECONDS` after
the login. Nothing secret is in it, and no job data.
"""

from __future__ import annotations

import collections
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Response, current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..settings import Settings

COOKIE = "relay_console"
COOKIE_PATH = "/console"
SESSION_SECONDS = 8 * 3600
CSP = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'; "
    "img-src 'self' data:"
)


def wants_html() -> bool:
    """True when the client prefers HTML over JSON (a browser); API clients (``*/*``, JSON) get JSON."""
    return request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html"


def security_headers(response: Response) -> Response:
    """Headers for every page and static file of the relay's web pages."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if _secure():  # reached over https: browsers keep to it
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


def _secure() -> bool:
    """Over https: directly, by X-Forwarded-Proto from the host's proxy, or because the relay's
    public address is https (a proxy that says nothing, as the session cookie takes it too)."""
    settings = current_app.extensions.get("relay.settings")
    return request.is_secure or bool(settings and (settings.public_url or "").startswith("https://"))


def plain_http_alternative() -> str | None:
    """The https address of this page when it came over plain http from beyond this machine (a
    key typed into it would travel in clear); None over https or on loopback."""
    if _secure():
        return None
    try:
        host = urlsplit("//" + (request.host or "")).hostname or ""
    except ValueError:
        return None
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    shown = f"[{host}]" if ":" in host else host
    return "https://" + shown + request.full_path.rstrip("?")


@dataclass(frozen=True)
class Session:
    csrf: str
    signed_in_at: float | None  # Unix time of the login; None before it

    @property
    def signed_in(self) -> bool:
        return self.signed_in_at is not None


class Sessions:
    """Signs and reads the console's session cookie."""

    def __init__(self, settings: Settings):
        material = f"{settings.secret_key or ''}\0{settings.relay_api_key or ''}".encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"voice-clone-relay console v1").derive(
            material
        )
        self._serializer = URLSafeTimedSerializer(key, salt="relay-console-session")
        self.https_only = (settings.public_url or "").startswith("https://")

    def read(self) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._serializer.loads(raw, max_age=SESSION_SECONDS)
        except BadSignature:  # forged, from another key, or expired (SignatureExpired is a BadSignature)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        at = data.get("at")
        return Session(data["csrf"], float(at) if isinstance(at, (int, float)) else None)

    @staticmethod
    def new(signed_in: bool) -> Session:
        """A fresh session with a new CSRF token."""
        return Session(secrets.token_urlsafe(32), time.time() if signed_in else None)

    def save(self, response: Response, session: Session) -> None:
        value = self._serializer.dumps({"csrf": session.csrf, "at": session.signed_in_at})
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_SECONDS,
            path=COOKIE_PATH,
            secure=self.https_only or request.is_secure,
            httponly=True,
            samesite="Lax",
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE, path=COOKIE_PATH, secure=self.https_only or request.is_secure, httponly=True, samesite="Lax"
        )


def csrf_ok(session: Session | None) -> bool:
    """The form's ``csrf_token`` equals the session's (constant-time)."""
    given = request.form.get("csrf_token", "")
    return session is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def key_ok(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))


class LoginLimiter:
    """Failed logins per client within a window, in this process.

    Two counts: per client as the nearest proxy saw it (the last ``X-Forwarded-For`` entry, which
    Heroku's and Render's routers append; else the connecting address), and per connecting address
    with a higher ceiling, so a client talking to the relay directly cannot dodge the first count by
    inventing ``X-Forwarded-For`` values."""

    MAX_FAILURES = 5
    MAX_PER_ADDRESS = 25
    WINDOW_SECONDS = 300.0
    MAX_TRACKED = 10_000

    def __init__(self, clock=time.monotonic, behind_router: bool = False):
        self.clock = clock
        # On Heroku or Render every request comes through the host's router, which appends the
        # client to X-Forwarded-For, and the connecting address is the router's, shared by every
        # visitor: a count per connecting address there would let 25 wrong keys from anyone lock the
        # owner out. Such a relay counts per client only.
        self.behind_router = behind_router
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def keys(self) -> tuple[tuple[str, int], ...]:
        address = request.remote_addr or "?"
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        client = (f"client:{forwarded or address}", LoginLimiter.MAX_FAILURES)
        if self.behind_router and forwarded:
            return (client,)
        return client, (f"address:{address}", LoginLimiter.MAX_PER_ADDRESS)

    def retry_after(self) -> int:
        """Seconds until this client may try again (0: now)."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key, limit in self.keys():
                times = self._recent(key, now)
                if len(times) >= limit:
                    wait = max(wait, times[0] + self.WINDOW_SECONDS - now)
        return int(wait) + 1 if wait > 0 else 0

    def failed(self) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) >= self.MAX_TRACKED:
                for key in [k for k in self._failures if not self._recent(k, now)]:
                    del self._failures[key]
            for key, _limit in self.keys():
                self._failures.setdefault(key, collections.deque()).append(now)

    def succeeded(self) -> None:
        with self._lock:
            self._failures.pop(self.keys()[0][0], None)

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        times = self._failures.get(key, collections.deque())
        while times and times[0] <= now - self.WINDOW_SECONDS:
            times.popleft()
        return times
