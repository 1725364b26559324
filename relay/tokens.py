"""Tokens: keep a job's per-request useapi token until the job ends, never in clear text at rest.

With ``RELAY_SECRET_KEY`` set, the token is sealed with Fernet (AES-128-CBC + HMAC-SHA256) under a
key derived from it by HKDF, and stored with the job, so any worker process can finish the job.
Without it, the token lives only in this process's memory: an in-process worker can finish the job,
but after a restart the job fails with ``token_unavailable`` instead of the token touching disk.
``RELAY_SECRET_KEY_OLD`` (comma-separated) keeps older keys readable while rotating.
"""

from __future__ import annotations

import base64
import hashlib
import threading

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import RESUBMIT, InvalidRequest, TokenUnavailable
from .settings import Settings

SERVER, SEALED, MEMORY = "server", "sealed", "memory"


def account_key(token: str | None, user_id: str | None) -> str | None:
    """A stable, one-way name for a (token, user_id) pair: what per-account limits group by."""
    if not token:
        return None
    material = f"voice-clone-relay account v1\0{token}\0{user_id or ''}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def fingerprint(token: str) -> str:
    """Enough of a token to tell accounts apart (its last 4 characters), never enough to use it."""
    return "…" + token[-4:] if len(token) >= 12 else "…"


def _fernet(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"voice-clone-relay token v1").derive(
        secret.encode("utf-8")
    )
    return Fernet(base64.urlsafe_b64encode(key))


class TokenVault:
    """Seals tokens for jobs and opens them for workers (one vault per process)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        keys = [settings.secret_key] if settings.secret_key else []
        keys += [k.strip() for k in (settings.secret_key_old or "").split(",") if k.strip()]
        self._fernet = MultiFernet([_fernet(k) for k in keys]) if keys else None
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def durable(self) -> bool:
        """True when sealed tokens survive restarts (a secret key is set)."""
        return self._fernet is not None

    def seal(self, job_id: str, token: str | None) -> tuple[str, str | None, str | None]:
        """``(token_kind, sealed, fingerprint)`` for a job; ``token`` None means the server token."""
        if token is None or token == self.settings.useapi_token:
            return SERVER, None, fingerprint(self.settings.useapi_token) if self.settings.useapi_token else None
        if (sealed := self.seal_text(token)) is not None:
            return SEALED, sealed, fingerprint(token)
        with self._lock:
            self._memory[job_id] = token
        return MEMORY, None, fingerprint(token)

    def open(self, job_id: str, kind: str, sealed: str | None, needed: bool = True) -> str | None:
        """The token a worker should use for the job, or raise :class:`TokenUnavailable`.
        ``needed``: False for a dry run, which may go without one."""
        if kind == SERVER:
            if not self.settings.useapi_token and needed:
                # Accepted by a process that has USEAPI_TOKEN, picked up by one that has none (a
                # Render worker service whose variables were set apart from the web service's).
                raise TokenUnavailable(
                    "This job was accepted with the relay's own useapi token (USEAPI_TOKEN), but the worker "
                    "process that picked it up has no USEAPI_TOKEN: the operator must set the same USEAPI_TOKEN "
                    f"on every process, the worker's included (on Render: the worker service too). {RESUBMIT}"
                )
            return self.settings.useapi_token
        if kind == SEALED and sealed and self._fernet is not None:
            token = self.open_text(sealed)
            if token is None:
                raise TokenUnavailable(
                    "This job's useapi token was sealed with a RELAY_SECRET_KEY the relay no longer has "
                    f"(add the old key to RELAY_SECRET_KEY_OLD). {RESUBMIT}"
                )
            return token
        if kind == MEMORY:
            with self._lock:
                token = self._memory.get(job_id)
            if token:
                return token
        raise TokenUnavailable()

    def seal_text(self, text: str) -> str | None:
        """``text`` (a useapi token, a callback URL with its query) sealed for storage; None without a secret key."""
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii") if self._fernet is not None else None

    def open_text(self, sealed: str) -> str | None:
        """What :meth:`seal_text` sealed; None when no key this relay has opens it."""
        if self._fernet is None or not sealed:
            return None
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except InvalidToken:
            return None

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._memory.pop(job_id, None)


def check_token(token: str | None) -> None:
    """Refuse a useapi token no HTTP header can carry (a curly quote, a zero-width space or a line
    break from a paste): useapi's tokens are printable ASCII. ``None``: none given, nothing to check."""
    if token is not None and token.startswith("YOUR_") and token.isupper():
        raise InvalidRequest(
            f"The useapi.net token is still the placeholder {token[:40]!r} of a shipped blueprint or workflow: put "
            "your token there, or leave the value empty to use the relay's USEAPI_TOKEN."
        )
    if token is not None and not (token.isascii() and token.isprintable()):
        raise InvalidRequest(
            "The useapi.net token holds a character no token has (a curly quote, a zero-width space or a "
            "line break, often from a paste). Copy it again from useapi.net and paste it as plain text."
        )
