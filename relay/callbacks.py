"""Callbacks: POST a finished job's answer to the caller's URL, signed the Standard Webhooks way.

Headers: ``webhook-id`` (the same on every retry of one job), ``webhook-timestamp`` (Unix seconds)
and ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``. The key is
``RELAY_WEBHOOK_SECRET``: a ``whsec_<base64>`` secret is base64-decoded, anything else is used as
its UTF-8 bytes. Delivery goes through the same URL guard and address pinning as downloads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from dataclasses import dataclass

import requests

from . import __version__, deadline, fetch, urlguard
from .errors import RelayError
from .settings import Settings


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a webhook secret (``whsec_`` + base64, or plain text)."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except ValueError:
            pass
    return secret.encode("utf-8")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class Delivery:
    """What one delivery attempt did: ``delivered``, ``gone`` (410: stop) or a failure to retry."""

    delivered: bool
    gone: bool
    detail: str


def deliver(url: str, body: bytes, webhook_id: str, settings: Settings) -> Delivery:
    """POST ``body`` to ``url`` once. Success is a whole 2xx answer (status, headers and up to 64 KiB
    of body) within ``RELAY_CALLBACK_TIMEOUT`` in total — DNS and connect included —; no redirects.
    A receiver that drips its answer is cut off at that deadline and the attempt counts as failed."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"voice-clone-relay/{__version__}",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
    }
    if settings.webhook_secret:
        headers["webhook-signature"] = sign(settings.webhook_secret, webhook_id, timestamp, body)
    too_slow = Delivery(False, False, f"no whole answer within {settings.callback_timeout:g} s")
    with deadline.bounded(settings.callback_timeout) as limit:
        try:
            target = urlguard.check(url, settings.allowed_networks, deadline.resolve)
            with fetch.pinned_session(target) as session:
                response = session.post(
                    target.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    stream=True,
                    timeout=(settings.connect_timeout, settings.callback_timeout),
                )
                with response:  # the answer must end in time too (up to 64 KiB of it is read)
                    received = 0
                    for chunk in response.iter_content(16 * 1024):
                        received += len(chunk)
                        if received >= 64 * 1024:
                            break
        except RelayError as err:
            if limit.expired:
                return too_slow
            return Delivery(False, err.error_code == "url_not_allowed", err.message)
        except (requests.RequestException, OSError) as err:
            if limit.expired or isinstance(err, requests.Timeout):
                return too_slow
            return Delivery(False, False, f"connection failed ({type(err).__name__})")
        except ValueError:  # requests parses a redirect's Location even when it does not follow it
            return Delivery(False, False, "the receiver redirected to an address that cannot be parsed")
    if limit.expired:
        return too_slow
    if 200 <= response.status_code < 300:
        return Delivery(True, False, f"HTTP {response.status_code}")
    return Delivery(False, response.status_code == 410, f"HTTP {response.status_code}")


def next_delay(schedule: tuple[float, ...], attempts: int) -> float | None:
    """Seconds to wait before the next attempt after ``attempts`` failures, with ±10 % jitter;
    ``None`` when the schedule is used up."""
    if attempts - 1 >= len(schedule):
        return None
    base = schedule[attempts - 1]
    return base * random.uniform(0.9, 1.1)
