"""useapi.net: the one client for every TemPolor cloned-voice call the relay makes.

Foreign errors (requests' exceptions, useapi's ``{error, code}`` bodies) are translated here, once,
into :mod:`relay.errors`. Every answer is parsed against its documented shape; anything else is
:class:`UpstreamInvalidAnswer`, never "no voices" and never a success without an id. Every call
has one total deadline (:mod:`relay.deadline`).

The upload is never retried here, and an upload whose whole body was sent but whose answer is
missing or unreadable says so (``maybe_created``): it may have created a voice.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from . import __version__, deadline
from .deadline import DeadlineAdapter
from .errors import (
    UpstreamError,
    UpstreamInvalidAnswer,
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
# The last bytes of an upload wait until the job has written down that the whole body is about to
# go: until then, a crash or a broken connection leaves a request useapi cannot act on.
TAIL = 64 * 1024
# user:<id>-tempolor:<user_id>-voice:<itemId>; the account part may hold e-mail-like characters.
VOICE_ID = re.compile(r"^user:[A-Za-z0-9_]{1,64}-tempolor:[A-Za-z0-9._@+-]{1,128}-voice:[A-Za-z0-9_-]{1,128}$")
_MAX_MESSAGE = 300
# useapi's answers are a few KB (a page of voices, an upload's ids). One far larger is not an
# answer, and reading it whole could take the process's memory: it is read up to this and refused.
ANSWER_LIMIT = 4 * 1024 * 1024


# Connections to useapi are kept alive between look-ups (voice lists, status polls) of every clone
# (a new TLS connection costs round trips to useapi's edge each time), up to this long idle: peers
# close idle connections after a while. Uploads never reuse one: if useapi's edge closed a reused
# connection just as a whole body went out, the relay could not tell that from a voice created
# with its answer lost, and would have to reconcile (and maybe fail with upload_unconfirmed) for
# nothing. A fresh connection that breaks after the whole body is a real doubt; a stale one is not.
KEEP_IDLE_SECONDS = 20.0
_POOL_SIZE = 64  # connections kept per host; more clones at once open (and close) extra ones


class BlockAdapter(DeadlineAdapter):
    """Connections under the current deadline that read a file body in :data:`UPLOAD_BLOCK` pieces."""

    def __init__(self, **kwargs: Any):
        super().__init__(blocksize=UPLOAD_BLOCK, **kwargs)


_shared: dict[tuple[int, bool], BlockAdapter] = {}
_shared_lock = threading.Lock()


def shared_adapter(uploads: bool = False) -> BlockAdapter:
    """This process's adapter for useapi's look-ups, whose connections every client reuses, or
    (``uploads``) the one for uploads, which opens a new connection for each."""
    key = (os.getpid(), uploads)  # a forked process (gunicorn's workers) must not share its parent's sockets
    with _shared_lock:
        adapter = _shared.get(key)
        if adapter is None:
            adapter = _shared[key] = BlockAdapter(
                max_idle=0.0 if uploads else KEEP_IDLE_SECONDS, pool_connections=4, pool_maxsize=_POOL_SIZE
            )
        return adapter


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
        # One session for look-ups and one for uploads (see KEEP_IDLE_SECONDS): same headers, pools
        # of the process (sessions are cheap; the connections are what is kept).
        self.session, self._uploads = requests.Session(), requests.Session()
        for session, uploads in ((self.session, False), (self._uploads, True)):
            session.trust_env = False  # the operator's base URL is used as configured
            session.headers.update(
                {
                    "Authorization": f"Bearer {token}",
                    "User-Agent": f"voice-clone-relay/{__version__}",
                    # Answers as sent: a compressed one could expand far past ANSWER_LIMIT in memory.
                    "Accept-Encoding": "identity",
                }
            )
            for scheme in ("https://", "http://"):
                session.mount(scheme, shared_adapter(uploads))

    def __enter__(self) -> Useapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the connections belong to the process's :func:`shared_adapter`."""

    def upload_voice(
        self, path: str, size: int, content_type: str, name: str, user_id: str | None, progress=None, before_tail=None
    ) -> UploadResult:
        """Stream the file at ``path`` as the raw body of ``POST …/cloned-voices/``.

        ``progress(bytes_sent, size)`` is called as the body goes out; see :meth:`upload_body`
        for ``before_tail``."""
        with open(path, "rb") as handle:
            body = UploadBody(handle, size, before_tail=before_tail, progress=progress)
            return self.upload_body(body, content_type, name, user_id)

    def upload_body(
        self,
        body: UploadBody,
        content_type: str,
        name: str,
        user_id: str | None,
        total: float | None = None,
    ) -> UploadResult:
        """``POST …/cloned-voices/`` with ``body`` (see :class:`UploadBody`) as the raw body.

        If the body's ``before_tail()`` (run just before the last :data:`TAIL` bytes go; the worker
        writes down "the body is complete" there) raises, the request ends short of its length and
        that error is raised from here, as is anything else producing the body raises.
        ``total``: the call's deadline (default ``RELAY_UPLOAD_TIMEOUT``).

        Raises :class:`UpstreamError`: ``reached=False`` when the body provably never completed
        (safe to send again), ``maybe_created=True`` when it did and no readable answer came.
        """
        params = {"name": name}
        if user_id:
            params["user_id"] = user_id
        counted, size = body, body.size
        try:
            response = self._call(
                "POST",
                VOICES_PATH,
                session=self._uploads,
                params=params,
                data=counted,
                headers={"Content-Type": content_type, "Content-Length": str(size)},
                timeout=(self.settings.connect_timeout, self.settings.upload_timeout),
                total=total or self.settings.upload_timeout,
                what="the upload",
                sent=counted,
            )
        except UpstreamError as err:
            if counted.complete and err.reached and err.fields.get("upstream_status") is None:
                err.maybe_created = True  # the whole body went out and no answer came back
            raise
        payload = _json(response)
        voice_id, item_id = _id(payload.get("clonedVoiceItemId")), _id(payload.get("itemId"))
        if (
            response.status_code not in (200, 202)
            or not voice_id
            or not VOICE_ID.match(voice_id)
            or not item_id
            or not voice_id.endswith(f"-voice:{item_id}")  # the two ids name one voice, or neither is sure
        ):
            raise UpstreamInvalidAnswer(
                f"useapi.net answered the upload with HTTP {response.status_code} but not with the documented "
                f"{{itemId, clonedVoiceItemId}} ({_shape(response)}). A voice may have been created: the relay "
                "checks the account's voices before anything else.",
                upstream_status=response.status_code,
                maybe_created=True,
            )
        # Ready only on useapi's own word: a 200 whose result is anything but true (false, a string)
        # leaves it to the voice's status, read by the polls that follow.
        sure = response.status_code == 200 and payload.get("result", True) is True
        return UploadResult(
            status="ready" if sure else "processing",
            upstream_status=response.status_code,
            cloned_voice_item_id=voice_id,
            item_id=item_id,
            message=next((said for key in ("message", "result") if isinstance(said := payload.get(key), str)), None),
        )

    def list_voices(self, user_id: str | None, cursor: str | None = None) -> dict[str, Any]:
        """One page of ``GET …/cloned-voices/``: ``{records, hasNext, cursor}``, strictly parsed."""
        params = {key: value for key, value in (("user_id", user_id), ("cursor", cursor)) if value}
        response = self._call("GET", VOICES_PATH, params=params, what="the voice listing")
        page = _json(response)
        records, has_next, next_cursor = page.get("records"), page.get("hasNext"), page.get("cursor")
        readable = [r for r in records if _is_record(r)] if isinstance(records, list) else []
        if (
            not isinstance(records, list)
            or (records and not readable)  # nothing on the page reads as a voice: not a listing
            or not isinstance(has_next, bool)
            or not (next_cursor is None or isinstance(next_cursor, (str, int)))
        ):
            raise _invalid(response, "the voice listing", "{records: [...], hasNext, cursor}")
        # A record without a voice id or with an odd status is skipped, not the whole account: the
        # walk then says the listing is not complete, so "no such voice" is never certain.
        return {
            "records": readable,
            "hasNext": has_next,
            "cursor": _text(next_cursor) or None,
            "unreadable": len(records) - len(readable),
        }

    def get_voice(self, cloned_voice_item_id: str) -> dict[str, Any] | None:
        """``GET …/cloned-voices/<id>``; ``None`` when useapi has no such voice (404)."""
        response = self._call(
            "GET", VOICES_PATH + quote_id(cloned_voice_item_id), what="the voice lookup", missing_ok=True
        )
        if response.status_code == 404:
            return None
        record = _json(response)
        named = record.get("clonedVoiceItemId")
        if (
            response.status_code != 200
            or not is_status(record.get("status"))
            or (named is not None and named != cloned_voice_item_id)  # another voice than the one asked for
        ):
            raise _invalid(response, "the voice lookup", "the record of that voice, with a numeric status")
        return record

    def delete_voice(self, cloned_voice_item_id: str) -> bool:
        """``DELETE …/cloned-voices/<id>``; ``False`` when the voice no longer exists (404)."""
        response = self._call(
            "DELETE", VOICES_PATH + quote_id(cloned_voice_item_id), what="the voice deletion", missing_ok=True
        )
        if response.status_code == 404:
            return False
        done = response.status_code == 204 or (response.status_code == 200 and _json(response).get("result") is True)
        if not done:
            raise _invalid(response, "the voice deletion", "{result: true}")
        return True

    def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        timeout=None,
        total: float | None = None,
        missing_ok: bool = False,
        sent: UploadBody | None = None,
        session: requests.Session | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        timeout = timeout or (self.settings.connect_timeout, self.settings.read_timeout)
        total = total or self.settings.connect_timeout + self.settings.read_timeout
        outer = deadline.current()
        with deadline.bounded(total) as limit:
            # The bound that applies, as the message says it: an enclosing one (a look-up's
            # RELAY_LOOKUP_TIMEOUT over a walk of pages) when it ends first.
            bound = round(outer.seconds if outer is not None and limit.seconds < total else total, 1)
            try:
                response = (session or self.session).request(
                    method, self.base + path, timeout=timeout, allow_redirects=False, stream=True, **kwargs
                )
                whole = _read_answer(response)
            except requests.RequestException as err:
                raise self._translate(err, method, what, bound, limit.expired, sent) from None
        if limit.expired:  # the watchdog cut the answer short: whatever arrived is not the answer
            raise self._translate(requests.Timeout(), method, what, bound, True, sent)
        if not whole:
            raise UpstreamInvalidAnswer(
                f"useapi.net answered {what} with HTTP {response.status_code} and more than "
                f"{ANSWER_LIMIT // (1024 * 1024)} MiB, not the documented answer of a few KB. "
                + (
                    "A voice may have been created: the relay checks the account's voices before anything else."
                    if sent is not None and sent.complete
                    else "Try again later; if it persists, useapi.net may have changed or be failing."
                ),
                upstream_status=response.status_code,
                maybe_created=sent is not None and sent.complete,
            )
        if missing_ok and response.status_code == 404:
            if _says_missing(response):
                return response
            raise _wrong_address(response, what)
        if not 200 <= response.status_code < 300:
            complete = method == "POST" and sent is not None and sent.complete
            raise _error_for(response, what, self._token, complete, self.settings.max_retry_after_seconds)
        return response

    def _translate(self, err, method: str, what: str, total: float, expired: bool, sent) -> UpstreamError:
        reason = getattr(err.args[0] if err.args else None, "reason", None)
        never_connected = isinstance(err, requests.ConnectTimeout) or isinstance(
            reason, (NewConnectionError, ConnectTimeoutError)
        )
        if never_connected and not expired:  # (a deadline that passed while connecting is a timeout)
            host = urlsplit(self.base).hostname or self.base
            return UpstreamUnavailable(
                f"useapi.net could not be reached for {what}: {_connect_failure(err, reason, host)}. Try again "
                "later; if it persists, check USEAPI_BASE_URL and this server's outbound network.",
                reached=False,
            )
        if sent is not None and not sent.complete:
            # The body stopped short of its Content-Length: not a request useapi can act on.
            return UpstreamUnavailable(
                f"The connection to useapi.net broke while the upload was being sent ({type(err).__name__}); "
                "nothing was created. Try again later.",
                reached=False,
            )
        maybe = (
            " The voice may still have been created: the relay checks the account's voices before anything else."
            if method == "POST"
            else " Try again later."
        )
        if expired or isinstance(err, requests.Timeout):
            return UpstreamTimeout(f"useapi.net did not answer {what} within {total:g} s.{maybe}")
        return UpstreamUnavailable(f"The connection to useapi.net failed during {what} ({type(err).__name__}).{maybe}")


class UploadBody:
    """An upload's body: ``size`` bytes of the file ``handle``, handed to the connection as
    :class:`relay.deadline.FileRange` pieces of at most :data:`STEP` bytes (sent with
    ``sendfile`` on a plain connection). It counts what the connection has taken, reports it
    (``progress(sent, size)``, once per piece), and holds the last :data:`TAIL` bytes until
    ``before_tail()`` has run. ``source``: a file still being written (:class:`relay.stream.GrowingFile`),
    whose ``ready(position, want)`` says how much may go now."""

    STEP = 1024 * 1024

    def __init__(self, handle: BinaryIO, size: int, before_tail=None, progress=None, source=None):
        self.handle, self.size, self.sent = handle, size, 0
        self._tail_at = size - min(TAIL, size) if before_tail is not None else size
        self._before_tail, self._progress, self._source = before_tail, progress, source

    @property
    def complete(self) -> bool:
        return self.sent >= self.size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[deadline.FileRange]:
        while self.sent < self.size:
            if self._before_tail is not None and self.sent >= self._tail_at:
                hook, self._before_tail = self._before_tail, None
                hook()
            end = self._tail_at if self._before_tail is not None else self.size
            count = min(end - self.sent, self.STEP)
            if self._source is not None:
                count = self._source.ready(self.sent, count)
                if not count:
                    raise OSError(f"the file ended at byte {self.sent} of {self.size}")
            yield deadline.FileRange(self.handle, self.sent, count, UPLOAD_BLOCK)
            self.sent += count  # the connection took the piece: the generator resumes after send()
            if self._progress is not None:
                self._progress(self.sent, self.size)


def _error_for(
    response: requests.Response, what: str, token: str, complete: bool, max_retry_after: float
) -> UpstreamError:
    """The error for a non-2xx answer. ``complete``: an upload whose whole body went out, so
    useapi may have made the voice unless the answer is useapi's own refusal."""
    status = response.status_code
    payload = _json(response)
    said_error = isinstance(payload.get("error"), str)
    # useapi's own refusal: {error, code} (a gateway's JSON has an error too, rarely a code) with a
    # 4xx, or a 503 with Retry-After ("unable to handle the request now", RFC 9110). After a whole
    # body no other 5xx proves that nothing was made, useapi's own {error, code} 500 included (it
    # creates a voice, then names it): that is reconciled, never uploaded again.
    refused = status < 500 or (status == 503 and bool(response.headers.get("Retry-After")))
    readable = said_error and isinstance(payload.get("code"), int) and refused
    said = _text(payload.get("error")) or _text(payload.get("message")) or response.reason or "no details"
    said = scrub(said, token)[:_MAX_MESSAGE]  # scrubbed first: a cut could leave part of a token
    if status == 401:
        return UpstreamUnauthorized(
            f"useapi.net refused the token ({said}). Check the useapi token (X-Useapi-Token or USEAPI_TOKEN).",
            upstream_status=status,
        )
    if status == 402:
        return UpstreamPaymentRequired(
            f"useapi.net needs an active subscription ({said}). Renew it at useapi.net.", upstream_status=status
        )
    if status == 429 and (readable or not complete):
        # useapi's own 429, or any 429 before the whole body went out: nothing was made, so it is
        # sent again after the wait. A 429 page from a layer in front after the whole body proves
        # nothing: it is reconciled below, as a 5xx would be.
        return UpstreamRateLimited(
            f"useapi.net is rate limiting this account ({said}). Wait and try again.",
            upstream_status=status,
            retry_after=_retry_after(response, max_retry_after),
        )
    if 300 <= status < 400:
        return _invalid(response, what, "an answer, not a redirect", maybe_created=complete)
    if status == 404 and not readable:
        return _wrong_address(response, what)
    if complete and not readable:
        # A 5xx or a proxy's page after the whole body went through: useapi may have taken it.
        how = f"({said})" if said_error and status >= 500 else "without useapi's own answer"
        return UpstreamUnavailable(
            f"useapi.net's side failed with HTTP {status} during {what}, {how}, after the whole recording "
            "went out. The voice may still have been created: the relay checks the account's voices before "
            "anything else.",
            upstream_status=status,
            maybe_created=True,
        )
    if 400 <= status < 500:
        return UpstreamRejected(f"useapi.net rejected {what}: {said} (HTTP {status}).", upstream_status=status)
    return UpstreamUnavailable(
        f"useapi.net failed with HTTP {status} ({said}). Try again later.",
        upstream_status=status,
        retry_after=_retry_after(response, max_retry_after),  # e.g. a 503 during maintenance
    )


def _wrong_address(response: requests.Response, what: str) -> UpstreamInvalidAnswer:
    """A 404 that is not useapi's own answer: no such address, so nothing was made or found there
    (a web site's page for an unknown path: USEAPI_BASE_URL without ``api.``, or a proxy's)."""
    return UpstreamInvalidAnswer(
        f"useapi.net answered {what} with HTTP 404 and {_shape(response)}, not useapi's own answer: that address "
        f"does not exist ({response.url.split('?', 1)[0]}). Check USEAPI_BASE_URL: it is https://api.useapi.net/v1 "
        "unless you run a stand-in.",
        upstream_status=404,
    )


def _says_missing(response: requests.Response) -> bool:
    """A 404 that is useapi's own "No record found" (``{error, code: 404}``): the voice does not
    exist. A proxy's page or an empty 404 says nothing about the voice, and is an error."""
    payload = _json(response)
    return isinstance(payload.get("error"), str) and payload.get("code") == 404


def scrub(text: str, token: str | None) -> str:
    """``text`` without ``token`` in it (useapi may echo what it was sent)."""
    return text.replace(token, "****") if token else text


def _invalid(
    response: requests.Response, what: str, expected: str, maybe_created: bool = False
) -> UpstreamInvalidAnswer:
    return UpstreamInvalidAnswer(
        f"useapi.net answered {what} with HTTP {response.status_code} and {_shape(response)}, not the documented "
        f"{expected}. Try again later; if it persists, useapi.net may have changed or be failing.",
        upstream_status=response.status_code,
        maybe_created=maybe_created,
    )


def _shape(response: requests.Response) -> str:
    """What an unexpected answer was, in a few words (never its text: it may echo secrets)."""
    kind = (response.headers.get("Content-Type") or "no content type").split(";")[0].strip()
    try:
        payload = response.json()
    except ValueError:
        return f"{len(response.content)} bytes of {kind}"
    if isinstance(payload, dict):
        keys = ", ".join(sorted(map(str, payload))[:6])
        return f"a JSON object with {{{keys}}}" if keys else "an empty JSON object"
    return f"JSON {type(payload).__name__}"


def _connect_failure(err, reason, host: str) -> str:
    """Why a connection to ``host`` was never made, in a few words."""
    said = str(reason or err).lower()
    if "errno -2]" in said or "errno -3]" in said or "errno -5]" in said or "resolv" in said:
        return f"the name {host} did not resolve (DNS)"
    if "refused" in said:
        return f"{host} refused the connection"
    # (urllib3's NewConnectionError is a ConnectTimeoutError too: the other causes come first)
    if isinstance(err, requests.ConnectTimeout) or isinstance(reason, ConnectTimeoutError):
        return f"connecting to {host} timed out"
    return f"the connection to {host} failed"


def _read_answer(response: requests.Response) -> bool:
    """Read a streamed answer into ``response.content``, up to :data:`ANSWER_LIMIT` bytes; False
    (and the connection closed) when it is longer."""
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > ANSWER_LIMIT:
            response.close()
            return False
    response._content = bytes(body)  # what requests itself keeps once it has read a body
    return True


def is_status(value: Any) -> bool:
    """A voice status as documented: a number (0 processing, 30 ready, others failed), or its digits."""
    if isinstance(value, str):
        return value.isascii() and value.isdigit() and len(value) <= 9
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9


def _is_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and _is_voice_id(record.get("clonedVoiceItemId"))
        and (record.get("status") is None or is_status(record["status"]))
    )


def _is_voice_id(value: Any) -> bool:
    return isinstance(value, str) and VOICE_ID.match(value) is not None


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _id(value: Any) -> str | None:
    """An id as useapi documents them: text, or a whole number (never ``true``)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _retry_after(response: requests.Response, cap: float) -> int | None:
    """``Retry-After`` in seconds (digits or an HTTP date), never more than ``cap``."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return int(min(max(seconds, 0), cap))


def quote_id(cloned_voice_item_id: str) -> str:
    """The id as a path segment (``:`` kept, anything else unusual percent-encoded)."""
    return quote(cloned_voice_item_id, safe=":-_.")
