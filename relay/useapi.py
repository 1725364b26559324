"""useapi.net: the one client for every TemPolor cloned-voice call the relay makes.

Foreign errors (requests' exceptions, useapi's ``{error, code}`` bodies) are translated here, once,
into :mod:`relay.errors`. The upload is never retried: a lost answer may still have created a voice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from . import __version__
from .errors import (
    UpstreamError,
    UpstreamPaymentRequired,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from .settings import Settings

VOICES_PATH = "/tempolor/music/cloned-voices/"
# urllib3 sends a file body in blocks of this size. Its default, 16 KiB, costs a read, a send and a
# Python round per 16 KiB: a 40 MB upload took 38 ms on loopback with it, 22-24 ms with 64-256 KiB.
UPLOAD_BLOCK = 256 * 1024


class BlockAdapter(HTTPAdapter):
    """An adapter whose connections read a file body in :data:`UPLOAD_BLOCK` pieces."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = UPLOAD_BLOCK
        super().init_poolmanager(*args, **kwargs)


@dataclass(frozen=True)
class UploadResult:
    """useapi's answer to an upload: ``status`` is ``ready`` (HTTP 200) or ``processing`` (202)."""

    status: str
    upstream_status: int
    cloned_voice_item_id: str | None
    item_id: str | None
    message: str | None


class Useapi:
    """A client bound to one token. Use as a context manager, or call :meth:`close`."""

    def __init__(self, settings: Settings, token: str):
        self.settings = settings
        self.base = settings.useapi_base_url
        self._token = token
        self.session = requests.Session()
        self.session.trust_env = False  # the operator's base URL is used as configured
        adapter = BlockAdapter()
        for scheme in ("https://", "http://"):
            self.session.mount(scheme, adapter)
        self.session.headers.update(
            {"Authorization": f"Bearer {token}", "User-Agent": f"voice-clone-relay/{__version__}"}
        )

    def __enter__(self) -> Useapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def upload_voice(
        self, path: str, size: int, content_type: str, name: str, user_id: str | None, progress=None
    ) -> UploadResult:
        """Stream the file at ``path`` as the raw body of ``POST …/cloned-voices/``.

        ``progress(bytes_sent, size)`` is called as the body goes out."""
        with open(path, "rb") as handle:
            body = handle if progress is None else _ProgressReader(handle, size, progress)
            return self.upload_body(body, size, content_type, name, user_id)

    def upload_body(self, body: BinaryIO, size: int, content_type: str, name: str, user_id: str | None) -> UploadResult:
        """``POST …/cloned-voices/`` with ``size`` bytes read from ``body`` as the raw body.

        Whatever ``body.read`` raises (other than a network error) ends the request short of
        ``size`` bytes and is raised from here."""
        params = {"name": name}
        if user_id:
            params["user_id"] = user_id
        response = self._call(
            "POST",
            VOICES_PATH,
            params=params,
            data=body,
            headers={"Content-Type": content_type, "Content-Length": str(size)},
            timeout=(self.settings.connect_timeout, self.settings.upload_timeout),
            what="the upload",
        )
        payload = _json(response)
        return UploadResult(
            status="ready" if response.status_code == 200 else "processing",
            upstream_status=response.status_code,
            cloned_voice_item_id=_text(payload.get("clonedVoiceItemId")),
            item_id=_text(payload.get("itemId")),
            message=_text(payload.get("message")) or _text(payload.get("result")),
        )

    def list_voices(self, user_id: str | None, cursor: str | None = None) -> dict[str, Any]:
        """One page of ``GET …/cloned-voices/``: ``{records, hasNext, cursor}``."""
        params = {key: value for key, value in (("user_id", user_id), ("cursor", cursor)) if value}
        page = _json(self._call("GET", VOICES_PATH, params=params, what="the voice listing"))
        records = page.get("records")
        return {
            "records": [r for r in records if isinstance(r, dict)] if isinstance(records, list) else [],
            "hasNext": bool(page.get("hasNext")),
            "cursor": _text(page.get("cursor")) or None,
        }

    def get_voice(self, cloned_voice_item_id: str) -> dict[str, Any] | None:
        """``GET …/cloned-voices/<id>``; ``None`` when useapi has no such voice (404)."""
        response = self._call(
            "GET", VOICES_PATH + quote_id(cloned_voice_item_id), what="the voice lookup", missing_ok=True
        )
        return None if response.status_code == 404 else _json(response)

    def delete_voice(self, cloned_voice_item_id: str) -> bool:
        """``DELETE …/cloned-voices/<id>``; ``False`` when the voice no longer exists (404)."""
        response = self._call(
            "DELETE", VOICES_PATH + quote_id(cloned_voice_item_id), what="the voice deletion", missing_ok=True
        )
        return response.status_code != 404

    def _call(
        self, method: str, path: str, *, what: str, timeout=None, missing_ok: bool = False, **kwargs: Any
    ) -> requests.Response:
        timeout = timeout or (self.settings.connect_timeout, self.settings.read_timeout)
        try:
            response = self.session.request(method, self.base + path, timeout=timeout, **kwargs)
        except requests.ConnectTimeout:
            raise UpstreamUnavailable(
                "useapi.net could not be reached (connect timed out). Try again later.", reached=False
            ) from None
        except requests.ReadTimeout:
            raise UpstreamTimeout(
                f"useapi.net did not answer {what} within {timeout[1]:g} s. "
                + (
                    "The voice may still have been created: list your voices before trying again."
                    if method == "POST"
                    else "Try again later."
                )
            ) from None
        except requests.ConnectionError as err:
            if isinstance(getattr(err.args[0] if err.args else None, "reason", None), NewConnectionError):
                raise UpstreamUnavailable(
                    f"useapi.net could not be reached for {what} (connection failed). Try again later.", reached=False
                ) from None
            raise self._lost(err, method, what) from None
        except requests.RequestException as err:
            raise self._lost(err, method, what) from None
        if missing_ok and response.status_code == 404:
            return response
        if response.status_code not in (200, 201, 202, 204):
            raise _error_for(response, what, self._token)
        return response

    @staticmethod
    def _lost(err: Exception, method: str, what: str) -> UpstreamUnavailable:
        sent = "The voice may still have been created: list your voices before trying again. "
        return UpstreamUnavailable(
            f"The connection to useapi.net failed during {what} ({type(err).__name__}). "
            + (sent if method == "POST" else "")
            + "Try again later."
        )


class _ProgressReader:
    """A file wrapper that reports how much of it has been read (sent)."""

    def __init__(self, handle, size: int, progress):
        self.handle, self.size, self.progress, self.sent = handle, size, progress, 0

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = -1) -> bytes:
        chunk = self.handle.read(amount)
        self.sent += len(chunk)
        self.progress(self.sent, self.size)
        return chunk

    def __iter__(self):
        while chunk := self.read(64 * 1024):
            yield chunk


def _error_for(response: requests.Response, what: str, token: str) -> UpstreamError:
    status = response.status_code
    payload = _json(response)
    said = _text(payload.get("error")) or _text(payload.get("message")) or response.reason or "no details"
    said = said[:300]
    if token:  # never pass a token back, even if the upstream echoes it
        said = said.replace(token, "****")
    if status == 401:
        return UpstreamUnauthorized(
            f"useapi.net refused the token ({said}). Check the useapi token (X-Useapi-Token or USEAPI_TOKEN).",
            upstream_status=status,
        )
    if status == 402:
        return UpstreamPaymentRequired(
            f"useapi.net needs an active subscription ({said}). Renew it at useapi.net.", upstream_status=status
        )
    if status == 429:
        return UpstreamRateLimited(
            f"useapi.net is rate limiting this account ({said}). Wait and try again.",
            upstream_status=status,
            retry_after=_retry_after(response),
        )
    if 400 <= status < 500:
        return UpstreamRejected(f"useapi.net rejected {what}: {said} (HTTP {status}).", upstream_status=status)
    return UpstreamUnavailable(
        f"useapi.net failed with HTTP {status} ({said}). Try again later.", upstream_status=status
    )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _retry_after(response: requests.Response) -> int | None:
    value = response.headers.get("Retry-After", "")
    return int(value) if value.isdigit() else None


def quote_id(cloned_voice_item_id: str) -> str:
    """The id as a path segment (``:`` kept, anything else unusual percent-encoded)."""
    return quote(cloned_voice_item_id, safe=":-_.")
