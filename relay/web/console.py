"""The console: ``/console`` — recent clones, each job's answer and timeline, the account's voices
and a clone to try, behind the relay key.

Without a session every console URL redirects a browser to the login and answers any other client
401 ``unauthorized``; a relay without ``RELAY_API_KEY`` has no console (it never shows job data
without a key). Every form carries a CSRF token. The console reads jobs; it writes only what a
person asks for: a callback sent again, a voice deleted, a clone started through the API itself.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shlex
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from .. import __version__, answers, deadline, events, history, next_steps, urlguard, voices
from ..api import database_unavailable, on_http_error
from ..db import UNAVAILABLE, unavailable, utcnow
from ..errors import CsrfFailed, JobNotFound, LoginRateLimited, NotFound, RelayError, Unauthorized
from ..jobs import Job
from ..tokens import check_token, fingerprint
from ..useapi import Useapi
from .home import public_base
from .security import (
    LoginLimiter,
    Session,
    Sessions,
    csrf_ok,
    key_ok,
    plain_http_alternative,
    security_headers,
    wants_html,
)

log = logging.getLogger("relay.web")
bp = Blueprint("console", __name__, url_prefix="/console")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_TRY_KEY = re.compile(r"^[0-9a-f]{32}$")
# Query parameters that carry a secret: by name (signatures, tokens, keys), and the short names of
# common signed links (Discord's hm, Azure Functions' code).
_SECRET_PARAM = re.compile(
    r"sig|token|key|secret|credential|auth|password|pass|hmac|jwt|hash|^hm$|^code$|^sas$", re.IGNORECASE
)
NOTICES = {
    "resent": "The callback will be sent again now; its attempts appear in the timeline.",
    "resend_refused": "Not sent again: the job has no callback URL, has not ended, or a delivery is running.",
    "resend_query_lost": (
        "Not sent again: the callback URL had a query string or a secret-looking path (a token, a signature, a "
        "webhook's key) that the relay does not keep once a callback is settled unless RELAY_SECRET_KEY is set "
        "(or it was sealed with a key it no longer has)."
    ),
    "signed_out": "You are signed out.",
}
EVENT_LABELS = {
    "received": "Received",
    "reused": "Reused an existing voice",
    "download_started": "Download started",
    "downloaded": "Downloaded",
    "audio_valid": "Audio validated",
    "converted": "Converted",
    "upload_started": "Upload started",
    "upload_sent": "Upload body complete",
    "upload_answered": "Upload answered",
    "upload_failed": "Upload failed",
    "reconcile": "Reconciliation",
    "poll": "Readiness poll",
    "lookup_failed": "Look-up failed (tried again)",
    "ready": "Ready",
    "validated": "Dry run passed",
    "failed": "Failed",
    "callback": "Callback attempt",
    "callback_resend": "Callback re-send asked",
    "crashed": "Step crashed",
}


def _sessions() -> Sessions:
    return current_app.extensions["relay.console.sessions"]


def _limiter() -> LoginLimiter:
    return current_app.extensions["relay.console.limiter"]


def _settings():
    return current_app.extensions["relay.settings"]


def _runtime():
    return current_app.extensions["relay.runtime"]


def _enabled() -> bool:
    return bool(_settings().relay_api_key)


# --- every console request ------------------------------------------------------------------


@bp.before_request
def _guard():
    session = g.console_session = _sessions().read()
    if not _enabled():
        if wants_html():
            return render_template("disabled.html"), 403
        raise Unauthorized("This relay has no RELAY_API_KEY, so its console is off.")
    if request.endpoint == "console.login":
        return None
    if session is None or not session.signed_in:
        if wants_html():
            target = request.full_path.rstrip("?") if request.method == "GET" else url_for("console.clones")
            return redirect(url_for("console.login", next=target), 303)
        raise Unauthorized("Sign in to the console first (POST /console/login with the relay key).")
    if request.method == "POST" and not csrf_ok(session):
        raise CsrfFailed()
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return security_headers(response)


@bp.errorhandler(RelayError)
def _on_error(err: RelayError):
    status, answer = answers.failure(err, answers.blank(g.get("request_id", "")))
    g.answer = answer
    if wants_html():
        response = Response(
            render_template(
                "error.html",
                answer=answer,
                status=status,
                next_step=next_steps.for_code(err.error_code),
                wait=_in_words(err.retry_after),  # a browser shows no Retry-After header
            ),
            status=status,
        )
    else:
        response = jsonify(answer)
        response.status_code = status
    if err.retry_after:
        response.headers["Retry-After"] = str(err.retry_after)
    return response


def unknown_path(err: HTTPException):
    """A URL no route has: under /console, a browser gets the console's error page (with its
    headers); anything else the API's one answer shape."""
    if request.path == "/console" or request.path.startswith("/console/"):
        return _headers(_on_error(NotFound("No such console page: start from the list of recent clones.")))
    return on_http_error(err)


def _in_words(seconds: int | None) -> str | None:
    if not seconds:
        return None
    if seconds < 90:
        return f"{seconds} seconds"
    return f"about {round(seconds / 60)} minutes"


def _on_database_error(err: Exception):
    if not unavailable(err):  # a statement the database refused: a bug
        log.error("unexpected error", exc_info=err, extra={"fields": {"request_id": g.get("request_id")}})
        return _on_error(RelayError())
    return _on_error(database_unavailable(err))


for _unavailable in UNAVAILABLE:
    bp.register_error_handler(_unavailable, _on_database_error)


@bp.app_template_filter("markup")
def _markup(text: str | None) -> Markup:
    """README-style text (`code` spans) as HTML, everything else escaped."""
    parts = str(escape(text or "")).split("`")
    return Markup("".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts)))


@bp.app_context_processor
def _globals() -> dict[str, Any]:
    session: Session | None = g.get("console_session")
    return {
        "signed_in": bool(session and session.signed_in),
        "csrf_token": session.csrf if session else "",
        "version": __version__,
        "plain_http": plain_http_alternative(),
    }


# --- signing in and out ---------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    session: Session | None = g.console_session
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if session is not None and session.signed_in:
            return redirect(target, 303)
        if session is None:  # a session before the login, so the login form has a CSRF token too
            session = g.console_session = _sessions().new(signed_in=False)
        notice = NOTICES.get(request.args.get("notice", ""))
        response = Response(render_template("login.html", next=target, notice=notice))
        _sessions().save(response, session)
        return response
    wait = _limiter().retry_after()
    if wait:
        raise LoginRateLimited(retry_after=wait)
    if not csrf_ok(session):
        raise CsrfFailed()
    if not key_ok(request.form.get("key", "").strip(), _settings().relay_api_key):  # a pasted key's space
        _limiter().failed()
        if not wants_html():
            raise Unauthorized("Wrong relay key.")
        html = render_template("login.html", next=target, error="That is not this relay's key.", notice=None)
        return Response(html, status=401)
    _limiter().succeeded()
    response = redirect(target, 303)
    # A new CSRF token: nothing from before the login carries over.
    _sessions().save(response, _sessions().new(signed_in=True))
    return response


@bp.post("/logout")
def logout():
    response = redirect(url_for("console.login", notice="signed_out"), 303)
    _sessions().clear(response)
    return response


def _safe_next(target: str | None) -> str:
    """Only a path inside the console: never another host (no open redirect)."""
    if (
        target
        and target.startswith("/console")
        and not target.startswith("//")
        and "\\" not in target
        and target.isprintable()  # no CR/LF: a header value cannot hold them
    ):
        return target
    return url_for("console.clones")


# --- recent clones --------------------------------------------------------------------------


MAX_PAGE = 1_000_000


@bp.get("")
def clones():
    status = request.args.get("status") or None
    status = status if status in history.STATUS_FILTERS else None
    error_code = (request.args.get("error_code") or "").strip() or None
    name = (request.args.get("name") or "").strip() or None
    try:
        # Past any real page, but within what a database offset holds (a huge one was a 500).
        page_number = min(max(int(request.args.get("page", "1")), 1), MAX_PAGE)
    except ValueError:
        page_number = 1
    engine = _runtime().engine
    page = history.recent(engine, status=status, error_code=error_code, name=name, page=page_number)
    now = utcnow()
    rows = [_row(job, now) for job in page.jobs]
    filters = {k: v for k, v in {"status": status, "error_code": error_code, "name": name}.items() if v}
    return render_template(
        "clones.html",
        rows=rows,
        page=page,
        filters=filters,
        statuses=history.STATUS_FILTERS,
        error_codes=sorted(set(history.error_codes(engine)) | ({error_code} if error_code else set())),
        refresh=any(not row["job"].terminal for row in rows),
        prev_url=url_for("console.clones", **filters, page=page.page - 1) if page.page > 1 else None,
        next_url=url_for("console.clones", **filters, page=page.page + 1) if page.has_next else None,
    )


def _row(job: Job, now: datetime) -> dict[str, Any]:
    answer = answers.for_job(job, now)
    return {
        "job": job,
        "answer": answer,
        "name": job.request.get("name"),
        "account": _account(job),
        "took": _took(job, now),
        "source": _source(job),
        "created": _when(job.created_at),
    }


def _account(job: Job) -> str:
    user = job.request.get("user_id") or "default account"
    if not job.token_fingerprint:  # a dry run sent without any token
        return f"{user} · no token"
    kind = "server token" if job.token_kind == "server" else "token"
    return f"{user} · {kind} {job.token_fingerprint}"


def _took(job: Job, now: datetime) -> str:
    seconds = ((job.completed_at or now) - job.created_at).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _source(job: Job) -> str:
    url = job.request.get("audio_url")
    return events.host(url) if url else "uploaded file"


def _when(moment: datetime | None, precise: bool = False) -> str:
    if moment is None:
        return ""
    shown = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if precise else moment.strftime("%Y-%m-%d %H:%M:%S")
    return shown + " UTC"


# --- one job --------------------------------------------------------------------------------


@bp.get("/clones/<job_id>")
def job_page(job_id: str):
    job = _job(job_id)
    answer = answers.for_job(job, utcnow())
    curl, lost_query = _curl(job)
    return render_template(
        "job.html",
        job=job,
        row=_row(job, utcnow()),
        answer=answer,
        answer_json=json.dumps(answer, indent=2, ensure_ascii=False),
        timeline=_timeline(job),
        next_step=next_steps.for_code(answer.get("error_code")),
        curl=curl,
        curl_lost_query=lost_query,
        notice=NOTICES.get(request.args.get("notice", "")),
    )


@bp.post("/clones/<job_id>/resend-callback")
def resend_callback(job_id: str):
    job = _job(job_id)
    runtime = _runtime()
    url = None
    if job.callback_sealed is not None:  # the stored URL lost a query: the whole one is sealed, or gone
        url = runtime.vault.open_text(job.callback_sealed)
        if url is None:
            return redirect(url_for("console.job_page", job_id=job.id, notice="resend_query_lost"), 303)
    resent = runtime.store.resend_callback(job.id, url)
    if resent:
        events.record(runtime.engine, job.id, "callback_resend", "asked from the console")
        runtime.notifier.work_arrived()
    return redirect(url_for("console.job_page", job_id=job.id, notice="resent" if resent else "resend_refused"), 303)


def _job(job_id: str) -> Job:
    job = _runtime().store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise JobNotFound()
    return job


def _timeline(job: Job) -> list[dict[str, str]]:
    """The job's recorded events, after its arrival (the job row's own creation time)."""
    source = _source(job)
    arrival = "dry run" if job.dry_run else "clone"
    items = [
        {
            "at": _when(job.created_at, precise=True),
            "label": "Received",
            "detail": f"{arrival} request, audio from {source}",
        }
    ]
    for event in events.for_job(_runtime().engine, job.id):
        items.append(
            {
                "at": _when(event.at, precise=True),
                "label": EVENT_LABELS.get(event.kind, event.kind),
                "detail": event.detail or "",
            }
        )
    if job.terminal and len(items) == 1:  # ended before events were recorded (an older relay)
        items.append(
            {"at": _when(job.completed_at, precise=True), "label": EVENT_LABELS.get(job.phase, job.phase), "detail": ""}
        )
    return items


def _curl(job: Job) -> tuple[str, bool]:
    """A curl command that sends this request again, and whether a link in it lost its query.
    Keys and tokens are shell variables; query parameters whose names look secret (signature,
    token, key…) are masked. A link the relay cut once the job was done with it is opened from
    its sealed copy; without one it ends in ``?…`` (the query was not kept)."""
    body: dict[str, Any] = {}
    for field in ("audio_url", "name", "user_id", "content_type", "dry_run", "if_exists", "convert", "metadata"):
        value = job.request.get(field)
        if (field, value) in (("if_exists", "create"), ("convert", "auto")):
            continue
        if value not in (None, False, ""):
            body[field] = value
    lost = False
    for field, sealed in (("audio_url", job.audio_url_sealed), ("callback_url", job.callback_sealed)):
        url = body.get(field) if field == "audio_url" else job.callback_url
        if not url:
            continue
        whole = _runtime().vault.open_text(sealed) if sealed else None
        if whole is None and sealed is not None:  # it had a query, or a secret path, the relay did not keep
            lost = True
            body[field] = url if "…" in url else url + "?…"
        else:
            body[field] = _masked_url(whole or url)
    lines = [
        f"curl -s {shlex.quote(public_base() + '/v1/voice-clones')}",
        '-H "Authorization: Bearer $RELAY_API_KEY"',
    ]
    if job.token_kind != "server":
        lines.append('-H "X-Useapi-Token: $USEAPI_TOKEN"')
    if job.request.get("upload_id") is not None:
        # The recording came in the request: send a file again as a form, the fields as its parts.
        lines.append('-F "file=@$RECORDING"')
        for field, value in body.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            lines.append("--form-string " + shlex.quote(f"{field}={text}"))  # never "@file" or ";type="
        return " \\\n  ".join(lines), lost
    lines.append('-H "Content-Type: application/json"')
    lines.append("-d " + shlex.quote(json.dumps(body, ensure_ascii=False)))
    return " \\\n  ".join(lines), lost


def _masked_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    path = "/".join("****" if urlguard.secret_segment(segment) else segment for segment in parts.path.split("/"))
    query = [(k, "****" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query, safe="*"), parts.fragment))


# --- voices ---------------------------------------------------------------------------------


@bp.route("/voices", methods=["GET", "POST"])
def voices_page():
    typed = (request.form.get("token") or "").strip() or None  # for this request only: never stored
    try:
        check_token(typed)
    except RelayError as err:
        return render_template(
            "voices.html",
            listed=None,
            error=_error_view(err),
            notice=None,
            typed=None,
            user_id=(request.values.get("user_id") or "").strip(),
            account=None,
            server_token=bool(_settings().useapi_token),
        )
    user_id = (request.values.get("user_id") or "").strip() or None
    token = typed or _settings().useapi_token
    account = f"{user_id or 'default account'} · {'token' if typed else 'server token'} {fingerprint(token or '')}"
    listed, error, notice = None, None, None
    if request.method == "POST" and request.form.get("action") == "delete" and request.form.get("confirm") != "yes":
        # From the table: "<id> <name>" (ids hold no space); from elsewhere: voice_id and voice_name.
        picked_id, _, picked_name = (request.form.get("voice") or "").partition(" ")
        return render_template(
            "voice_delete.html",
            voice_id=picked_id or request.form.get("voice_id", ""),
            voice_name=picked_name or request.form.get("voice_name"),
            typed=typed,
            user_id=user_id,
            account=account,
        )
    # One bound for the page's useapi calls, as the API's look-ups have: an answer after the
    # host's 30 s reaches nobody (Heroku shows its own error page instead).
    with deadline.bounded(_settings().lookup_timeout):
        if request.method == "POST" and request.form.get("action") == "delete":
            voice_id = request.form.get("voice_id", "")
            try:
                voices.check_id(voice_id)
                with Useapi(_settings(), token or "") as client:
                    deleted = client.delete_voice(voice_id)
                notice = f"Deleted {voice_id}." if deleted else f"{voice_id} was already gone."
            except RelayError as err:
                error = _error_view(err)
        if token and (request.method == "GET" or request.form.get("action") in ("list", "delete")):
            try:
                with Useapi(_settings(), token) as client:
                    found, stopped = voices.list_all(client, user_id, _settings().max_list_pages)
                listed = {"voices": found, "complete": stopped is None, "stopped": stopped}
            except RelayError as err:
                error = error or _error_view(err)
    return render_template(
        "voices.html",
        listed=listed,
        error=error,
        notice=notice,
        typed=typed,
        user_id=user_id or "",
        account=account if token else None,
        server_token=bool(_settings().useapi_token),
    )


def _error_view(err: RelayError) -> dict[str, Any]:
    return {"code": err.error_code, "message": err.message, "next_step": next_steps.for_code(err.error_code)}


# --- try a clone ----------------------------------------------------------------------------


@bp.route("/try", methods=["GET", "POST"])
def try_clone():
    form = {
        "audio_url": (request.form.get("audio_url") or "").strip(),
        "name": (request.form.get("name") or "").strip(),
        "user_id": (request.form.get("user_id") or "").strip(),
        "dry_run": request.method == "GET" or request.form.get("dry_run") == "yes",
    }
    result = None
    if request.method == "POST":
        body: dict[str, Any] = {"audio_url": form["audio_url"], "name": form["name"], "dry_run": form["dry_run"]}
        if form["user_id"]:
            body["user_id"] = form["user_id"]
        # The form's one-time key: a second click, or a reload that sends the form again, gets this
        # job's answer instead of starting (and paying for) a second clone.
        try_key = (request.form.get("try_key") or "").strip()
        key = f"console-try-{try_key}" if _TRY_KEY.match(try_key) else None
        typed = (request.form.get("token") or "").strip() or None
        try:
            check_token(typed)
            status, answer = _through_the_api(body, typed, key)
        except RelayError as err:  # a token no header can carry: refused before any job exists
            status, answer = answers.failure(err, answers.blank(g.request_id))
        result = {
            "status": status,
            "answer": answer,
            "answer_json": json.dumps(answer, indent=2, ensure_ascii=False),
            "next_step": next_steps.for_code(answer.get("error_code")),
            "job_url": url_for("console.job_page", job_id=answer["job_id"]) if answer.get("job_id") else None,
        }
    return render_template(
        "try.html",
        form=form,
        result=result,
        server_token=bool(_settings().useapi_token),
        try_key=secrets.token_hex(16),  # a new one per page shown: the next Send is a new clone
    )


def _through_the_api(body: dict[str, Any], token: str | None, key: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST /v1/voice-clones in this process, through the API's own route: the same checks, job,
    wait and answer as any caller gets. A typed token goes only into that request; ``key`` is its
    Idempotency-Key."""
    headers = {"Authorization": f"Bearer {_settings().relay_api_key}", "X-Request-Id": f"{g.request_id}-try"}
    if token:
        headers["X-Useapi-Token"] = token
    if key:
        headers["Idempotency-Key"] = key
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with app.app_context():  # the inner request gets its own g (request id, log fields)
        response = app.test_client().post(
            "/v1/voice-clones", json=body, headers=headers, base_url=request.host_url.rstrip("/")
        )
    return response.status_code, response.get_json()
