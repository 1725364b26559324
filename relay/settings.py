"""Settings: read once from the environment into a frozen, typed, validated object."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range; the message is one line for the operator."""


FORM_OVERHEAD = 1024 * 1024  # a multipart form's other fields and part headers around its file


@dataclass(frozen=True)
class Settings:
    """Everything the relay is configured with. Secrets are excluded from ``repr``."""

    relay_api_key: str | None = field(default=None, repr=False)
    useapi_token: str | None = field(default=None, repr=False)
    useapi_base_url: str = "https://api.useapi.net/v1"
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_bytes: int = 50 * MiB
    min_seconds: float = 1.0
    max_seconds: float = 0.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    lookup_timeout: float = 25.0
    download_timeout: float = 120.0
    upload_timeout: float = 180.0
    stream_min_bytes: int = 8 * MiB
    max_redirects: int = 5
    max_json_bytes: int = 64 * 1024
    max_list_pages: int = 20
    account_concurrency: int = 10
    database_url: str | None = field(default=None, repr=False)
    data_dir: str = "./data"
    spool_dir: str | None = None  # None: the system temporary folder
    default_wait_seconds: float = 25.0
    max_wait_seconds: float = 280.0
    # Above RELAY_ACCOUNT_CONCURRENCY (10): one account's slow links never hold every worker.
    inprocess_workers: int = 16
    worker_concurrency: int = 16
    threads: int = 64
    max_waiters: int = 0
    request_read_timeout: float = 15.0
    lease_seconds: float = 30.0
    ready_timeout_seconds: float = 1800.0
    reconcile_grace_seconds: float = 30.0
    max_attempts: int = 5
    retry_base_seconds: float = 5.0
    poll_interval_seconds: float = 10.0
    idle_poll_seconds: float = 1.0
    callback_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    callback_timeout: float = 15.0
    callback_first_delay_seconds: float = 2.0
    webhook_secret: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    secret_key_old: str | None = field(default=None, repr=False)
    job_retention_hours: float = 72.0
    public_url: str | None = None
    trust_forwarded_host: bool = False
    max_retry_after_seconds: float = 900.0
    queue_timeout_seconds: float = 3600.0
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int | None = None  # gunicorn processes; None: 1 on SQLite, 2 with DATABASE_URL
    log_level: str = "INFO"
    convert: str = "auto"
    convert_cpu_seconds: float = 60.0
    convert_memory_mb: int = 1024
    convert_timeout: float = 120.0
    convert_max_seconds: float = 3600.0
    silence_dbfs: float = -60.0
    upload_store_bytes: int = 512 * MiB
    database_connections: int = 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise :class:`SettingsError`."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in _SPECS:
            raw = env.get(spec.env)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[spec.attr] = spec.parse(raw.strip())
            except (ValueError, TypeError) as err:
                raise SettingsError(f"{spec.env}={_shown(spec, raw)!r} is invalid: {_why(spec, err)}") from None
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Check ranges and cross-setting rules; return self or raise :class:`SettingsError`."""
        for spec in _SPECS:
            value = getattr(self, spec.attr)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise SettingsError(f"{spec.env} must be a finite number (got {value})")
            if spec.minimum is not None and value < spec.minimum:
                raise SettingsError(f"{spec.env} must be at least {spec.minimum} (got {value})")
            if spec.maximum is not None and value > spec.maximum:
                raise SettingsError(f"{spec.env} must be at most {spec.maximum} (got {value})")
        if self.max_seconds and self.max_seconds < self.min_seconds:
            raise SettingsError("RELAY_MAX_SECONDS must be 0 (off) or at least RELAY_MIN_SECONDS")
        base = urlsplit(self.useapi_base_url)
        if base.scheme not in ("http", "https") or not base.hostname:
            raise SettingsError("USEAPI_BASE_URL must be an http(s) URL such as https://api.useapi.net/v1")
        if self.public_url is not None:
            public = urlsplit(self.public_url)
            if public.scheme not in ("http", "https") or not public.hostname or public.query or public.fragment:
                raise SettingsError(
                    "RELAY_PUBLIC_URL must be the address callers use, with its scheme and no query, such as "
                    f"https://relay.example.com (got {self.public_url!r}): status_url and the pages' links "
                    "start with it"
                )
        if self.default_wait_seconds > self.max_wait_seconds:
            raise SettingsError("RELAY_DEFAULT_WAIT_SECONDS must not exceed RELAY_MAX_WAIT_SECONDS")
        if self.max_waiters >= self.threads:
            raise SettingsError(
                "RELAY_MAX_WAITERS must be below RELAY_THREADS: threads beyond the waiters serve new requests"
            )
        if self.secret_key is not None and len(self.secret_key) < 16:
            raise SettingsError("RELAY_SECRET_KEY must be at least 16 characters (use a long random secret)")
        if self.convert not in ("auto", "off"):
            raise SettingsError("RELAY_CONVERT must be auto or off")
        if self.database_url is not None:
            scheme = urlsplit(self.database_url).scheme.lower()
            if scheme not in _DATABASE_SCHEMES:
                raise SettingsError(
                    f"DATABASE_URL must start with postgres://, postgresql:// or sqlite:/// (got {scheme or 'no'} "
                    "scheme): the relay runs on PostgreSQL or SQLite only"
                )
        if self.spool_dir and not _can_be_folder(self.spool_dir):
            raise SettingsError(
                f"RELAY_SPOOL_DIR={self.spool_dir!r} is not a folder and cannot become one: name a folder, or unset it"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("RELAY_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR")
        if self.useapi_token and not (self.useapi_token.isascii() and self.useapi_token.isprintable()):
            # A pasted zero-width space or curly quote: every call with it would fail, every retry too.
            raise SettingsError(
                "USEAPI_TOKEN must be printable ASCII, as useapi.net's tokens are: it holds a character no "
                "token has (a curly quote, a zero-width space, a line break from a paste). Paste it again as "
                "plain text."
            )
        if self.relay_api_key and not (self.relay_api_key.isascii() and self.relay_api_key.isprintable()):
            # HTTP headers carry Latin-1: such a key would open the console but no API call.
            raise SettingsError(
                "RELAY_API_KEY must be printable ASCII (letters, digits, punctuation): a key with other "
                "characters cannot be sent in an HTTP header. Use a long random secret such as the one "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` prints."
            )
        return self

    def check_serving(self) -> Settings:
        """The rules for a process that answers HTTP (not for the CLI's own commands); raise :class:`SettingsError`."""
        if self.useapi_token and not self.relay_api_key:
            raise SettingsError(
                "USEAPI_TOKEN is set but RELAY_API_KEY is not: anyone could spend your useapi "
                "credits through this relay. Set RELAY_API_KEY to a long random secret."
            )
        if self.inprocess_workers == 0 and (problem := self.unshared_database("web process")):
            raise SettingsError(problem)
        return self

    def unshared_database(self, what: str) -> str | None:
        """On Heroku or Render (``DYNO`` or ``RENDER`` set), a process that relies on another process for
        its jobs cannot use SQLite: each dyno or instance has a disk of its own, so the web process and
        the worker would never see each other's jobs. The problem in one line, or None."""
        if self.database_url or not (os.environ.get("DYNO") or os.environ.get("RENDER")):
            return None
        host = "Heroku" if os.environ.get("DYNO") else "Render"
        fix = (
            "heroku addons:create heroku-postgresql"
            if host == "Heroku"
            else "wire the Blueprint's database in with fromDatabase"
        )
        return (
            f"DATABASE_URL is not set, and on {host} each {what} has a disk of its own: the web process and "
            f"the worker would keep jobs in separate SQLite files and never share one. Attach PostgreSQL ({fix}), "
            "or run one web process with RELAY_INPROCESS_WORKERS and no worker"
        )

    def gunicorn_workers(self) -> int:
        """``WEB_CONCURRENCY``, else 1 on SQLite (writers share one lock best in one process), 2 on PostgreSQL."""
        if self.web_concurrency is not None:
            return self.web_concurrency
        return 2 if self.database_url else 1

    @property
    def waiter_budget(self) -> int:
        """Requests that may wait for their clone at once in one process (``RELAY_MAX_WAITERS``, or
        three quarters of ``RELAY_THREADS``): the other threads always serve new requests."""
        return self.max_waiters or max(1, self.threads * 3 // 4)

    @property
    def upload_request_limit(self) -> int:
        """The largest request body taken: a recording of ``RELAY_MAX_BYTES`` and a multipart form's
        other fields and part headers around it."""
        return self.max_bytes + FORM_OVERHEAD

    def accepts_key(self, relay_key_header: str, authorization: str) -> bool:
        """Whether a request presenting these headers may use the API: the relay key in
        ``Authorization: Bearer`` (or ``X-Relay-Key``), compared in constant time; any request when
        no ``RELAY_API_KEY`` is set."""
        if not self.relay_api_key:
            return True
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else relay_key_header
        return hmac.compare_digest(given.encode("utf-8"), self.relay_api_key.encode("utf-8"))

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated (settings themselves never change)."""
        return dataclasses.replace(self, **changes).validated()

    def describe(self) -> dict[str, Any]:
        """The effective settings by environment name, secrets masked, for ``relay config``."""
        shown = {}
        for spec in _SPECS:
            value = getattr(self, spec.attr)
            if spec.secret:
                value = mask(value)
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            shown[spec.env] = value
        return shown


def mask(secret: str | None) -> str | None:
    """``None`` stays ``None``; anything else shows only its last 4 characters."""
    if not secret:
        return None
    return "****" + secret[-4:] if len(secret) >= 12 else "****"


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


MAX_SCHEDULE_DELAY = 7 * 24 * 3600.0  # one callback delay: a week at most


def _seconds_list(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError("expected numbers of seconds separated by commas, e.g. 5,300,1800") from None
    if not all(0 <= value <= MAX_SCHEDULE_DELAY for value in values):  # also false for nan
        raise ValueError(f"each delay must be between 0 and {MAX_SCHEDULE_DELAY:g} seconds (a week)")
    return values


def _can_be_folder(path: str) -> bool:
    """True when ``path`` is a folder, or the nearest existing part of it is (so it can be made)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path)


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _base_url(raw: str) -> str:
    return raw.rstrip("/")


_DATABASE_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg", "sqlite")


def _why(spec: _Spec, err: Exception) -> str:
    """The reason a value did not parse, in the operator's terms rather than Python's."""
    if spec.parse is int:
        return "expected a whole number"
    if spec.parse is float:
        return "expected a number"
    return str(err)


@dataclass(frozen=True)
class _Spec:
    env: str
    attr: str
    parse: Any
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False


def _shown(spec: _Spec, raw: str) -> str:
    return "****" if spec.secret else raw


_SPECS = (
    _Spec("RELAY_API_KEY", "relay_api_key", str, secret=True),
    _Spec("USEAPI_TOKEN", "useapi_token", str, secret=True),
    _Spec("USEAPI_BASE_URL", "useapi_base_url", _base_url),
    _Spec("RELAY_ALLOWED_NETWORKS", "allowed_networks", _networks),
    _Spec("RELAY_MAX_BYTES", "max_bytes", int, 1, 1024 * MiB),
    _Spec("RELAY_MIN_SECONDS", "min_seconds", float, 0, 3600),
    _Spec("RELAY_MAX_SECONDS", "max_seconds", float, 0, 24 * 3600),
    _Spec("RELAY_CONNECT_TIMEOUT", "connect_timeout", float, 0.1, 120),
    _Spec("RELAY_READ_TIMEOUT", "read_timeout", float, 0.1, 600),
    _Spec("RELAY_LOOKUP_TIMEOUT", "lookup_timeout", float, 0.1, 600),
    _Spec("RELAY_DOWNLOAD_TIMEOUT", "download_timeout", float, 0.1, 3600),
    _Spec("RELAY_UPLOAD_TIMEOUT", "upload_timeout", float, 0.1, 3600),
    _Spec("RELAY_STREAM_MIN_BYTES", "stream_min_bytes", int, 0, 1024 * MiB),
    _Spec("RELAY_MAX_REDIRECTS", "max_redirects", int, 0, 20),
    _Spec("RELAY_MAX_JSON_BYTES", "max_json_bytes", int, 1024, 16 * MiB),
    _Spec("RELAY_MAX_LIST_PAGES", "max_list_pages", int, 1, 500),
    _Spec("RELAY_ACCOUNT_CONCURRENCY", "account_concurrency", int, 0, 1000),
    _Spec("DATABASE_URL", "database_url", str, secret=True),
    _Spec("RELAY_DATA_DIR", "data_dir", str),
    _Spec("RELAY_SPOOL_DIR", "spool_dir", str),
    _Spec("RELAY_DEFAULT_WAIT_SECONDS", "default_wait_seconds", float, 0, 3600),
    _Spec("RELAY_MAX_WAIT_SECONDS", "max_wait_seconds", float, 0, 3600),
    _Spec("RELAY_INPROCESS_WORKERS", "inprocess_workers", int, 0, 64),
    _Spec("RELAY_WORKER_CONCURRENCY", "worker_concurrency", int, 1, 256),
    _Spec("RELAY_THREADS", "threads", int, 2, 1024),
    _Spec("RELAY_MAX_WAITERS", "max_waiters", int, 0, 1023),
    _Spec("RELAY_REQUEST_READ_TIMEOUT", "request_read_timeout", float, 0.1, 600),
    _Spec("RELAY_LEASE_SECONDS", "lease_seconds", float, 1, 60),
    _Spec("RELAY_READY_TIMEOUT_SECONDS", "ready_timeout_seconds", float, 1, 7 * 24 * 3600),
    _Spec("RELAY_RECONCILE_GRACE_SECONDS", "reconcile_grace_seconds", float, 0, 3600),
    _Spec("RELAY_MAX_ATTEMPTS", "max_attempts", int, 1, 50),
    _Spec("RELAY_RETRY_BASE_SECONDS", "retry_base_seconds", float, 0.01, 3600),
    _Spec("RELAY_POLL_INTERVAL_SECONDS", "poll_interval_seconds", float, 0.01, 3600),
    _Spec("RELAY_IDLE_POLL_SECONDS", "idle_poll_seconds", float, 0.01, 60),
    _Spec("RELAY_CALLBACK_SCHEDULE", "callback_schedule", _seconds_list),
    _Spec("RELAY_CALLBACK_TIMEOUT", "callback_timeout", float, 0.1, 120),
    _Spec("RELAY_CALLBACK_FIRST_DELAY_SECONDS", "callback_first_delay_seconds", float, 0, 60),
    _Spec("RELAY_WEBHOOK_SECRET", "webhook_secret", str, secret=True),
    _Spec("RELAY_SECRET_KEY", "secret_key", str, secret=True),
    _Spec("RELAY_SECRET_KEY_OLD", "secret_key_old", str, secret=True),
    _Spec("RELAY_JOB_RETENTION_HOURS", "job_retention_hours", float, 24, 24 * 365),
    _Spec("RELAY_PUBLIC_URL", "public_url", _base_url),
    _Spec("RELAY_TRUST_FORWARDED_HOST", "trust_forwarded_host", _boolean),
    _Spec("RELAY_MAX_RETRY_AFTER_SECONDS", "max_retry_after_seconds", float, 0, 24 * 3600),
    _Spec("RELAY_QUEUE_TIMEOUT_SECONDS", "queue_timeout_seconds", float, 1, 7 * 24 * 3600),
    _Spec("RELAY_HOST", "host", str),
    _Spec("PORT", "port", int, 0, 65535),
    _Spec("WEB_CONCURRENCY", "web_concurrency", int, 1, 64),
    _Spec("RELAY_LOG_LEVEL", "log_level", str.upper),
    _Spec("RELAY_CONVERT", "convert", str.lower),
    _Spec("RELAY_CONVERT_CPU_SECONDS", "convert_cpu_seconds", float, 1, 3600),
    _Spec("RELAY_CONVERT_MEMORY_MB", "convert_memory_mb", int, 64, 65536),
    _Spec("RELAY_CONVERT_TIMEOUT", "convert_timeout", float, 1, 3600),
    _Spec("RELAY_CONVERT_MAX_SECONDS", "convert_max_seconds", float, 1, 24 * 3600),
    _Spec("RELAY_SILENCE_DBFS", "silence_dbfs", float, -120, 0),
    _Spec("RELAY_UPLOAD_STORE_BYTES", "upload_store_bytes", int, 0, 1024 * 1024 * MiB),
    _Spec("RELAY_DATABASE_CONNECTIONS", "database_connections", int, 1, 1000),
)
