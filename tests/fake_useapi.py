"""A stateful useapi.net stand-in: uploads create voices, voices become ready, lists page.

It runs on a threaded pytest-httpserver on 127.0.0.1 and counts what it was sent, so tests can
assert "exactly one upload" and "never more than N at once" across processes.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response
from werkzeug.exceptions import ClientDisconnected

UPLOAD = "/v1/tempolor/music/cloned-voices/"
_HEAD_AT = "fake_useapi.head_at"


class _Server(HTTPServer):
    """pytest-httpserver that also notes when each request's head arrived and which requests'
    bodies ended short of their Content-Length (it reads every body before any handler runs, and
    answers those 400 without one)."""

    def __init__(self, fake: FakeUseapi, **kwargs):
        super().__init__(**kwargs)
        self.fake = fake

    def application(self, request: Request) -> Response:
        request.environ[_HEAD_AT] = time.time()
        try:
            request.get_data()
        except ClientDisconnected:
            with self.fake.lock:
                self.fake.incomplete.append({"path": request.path, "started": request.environ[_HEAD_AT]})
            raise
        return super().application(request)


class FakeUseapi:
    def __init__(self, token: str, user_id: str = "67890"):
        self.token = token
        self.user_id = user_id
        self.server = _Server(self, host="127.0.0.1", port=0, threaded=True)
        self.lock = threading.Lock()
        self.voices: dict[str, dict] = {}
        self.uploads: list[dict] = []
        self.incomplete: list[dict] = []  # uploads whose body stopped short of its Content-Length
        self.accepted = 0
        self.in_flight: dict[str, int] = {}  # per user_id (account)
        self.max_in_flight: dict[str, int] = {}
        # knobs a test turns
        self.upload_delay = 0.0  # seconds the upload is held before answering
        self.ready_after_polls = 0  # 0: ready at once (200); n: 202, then ready after n polls
        self.unsure_200 = False  # … but answered 200 {"result": false, …} instead of 202
        self.clones_fail = False  # each clone fails at once (status 40)
        self.list_ready_only = True  # TemPolor lists a voice only once it is ready
        self.refusals: list[tuple[int, dict]] = []  # (status, headers) answered to the next uploads
        self.refusals_for: dict[str, list[tuple[int, dict]]] = {}  # the same, per user_id
        self.refusal_body: dict | None = None  # the body of refusals (default: useapi's own)
        # faults: the voice is made, then the answer is this (status, body text, content type) …
        self.upload_answer: tuple[int, str, str] | None = None
        self.unnamed = False  # … the voice is listed without its name (an interrupted rename)
        self.ready_after_seconds: float | None = None  # … and becomes ready only after this long
        self.list_answer: tuple[int, str, str] | None = None  # the voice list answers this instead
        self.list_calls = 0
        self.lookup_delay = 0.0  # seconds a list or read of voices is held before answering
        self.lookup_refusals: list[tuple[int, dict]] = []  # (status, headers) answered to the next looks
        # per upload, in the order they arrive: {"delay": s, "answer": (status, text, type)} instead of
        # upload_delay and upload_answer
        self.upload_plans: list[dict] = []

    def start(self) -> FakeUseapi:
        self.server.expect_request(UPLOAD, method="POST").respond_with_handler(self._upload)
        self.server.expect_request(UPLOAD, method="GET").respond_with_handler(self._list)
        self.server.expect_request(re.compile(f"^{re.escape(UPLOAD)}.+$"), method="GET").respond_with_handler(self._get)
        self.server.expect_request(re.compile(f"^{re.escape(UPLOAD)}.+$"), method="DELETE").respond_with_handler(
            self._delete
        )
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.clear()
        if self.server.is_running():
            self.server.stop()

    @property
    def base_url(self) -> str:
        return self.server.url_for("/v1")

    def upload_count(self) -> int:
        """Uploads that useapi took (refusals with 429/5xx do not count)."""
        with self.lock:
            return self.accepted

    # --- handlers -------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def _upload(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"error": "Unauthorized", "code": 401}, 401)
        started = request.environ[_HEAD_AT]
        body = request.get_data()
        account = request.args.get("user_id", "")
        with self.lock:
            own = self.refusals_for.get(account)
            refusal = own.pop(0) if own else (self.refusals.pop(0) if self.refusals else None)
            plan = self.upload_plans.pop(0) if self.upload_plans and refusal is None else {}
            self.uploads.append(
                {
                    "name": request.args.get("name"),
                    "user_id": account,
                    "bytes": len(body),
                    "content_type": request.headers.get("Content-Type"),
                    "body": body if len(body) <= 4 * 1024 * 1024 else None,
                    "started": started,
                    "at": time.time(),
                }
            )
        if refusal is not None:
            status, headers = refusal
            said = "Too many requests" if status == 429 else "Server error"
            response = _json(self.refusal_body or {"error": said, "code": status}, status)
            response.headers.update(headers)
            return response
        with self.lock:
            self.in_flight[account] = self.in_flight.get(account, 0) + 1
            self.max_in_flight[account] = max(self.max_in_flight.get(account, 0), self.in_flight[account])
            item_id = uuid.uuid4().hex[:15]
        try:
            if not body:
                return _json({"error": "Empty file received", "code": 400}, 400)
            voice_id = f"user:12345-tempolor:{self.user_id}-voice:{item_id}"
            ready = self.ready_after_polls == 0 and self.ready_after_seconds is None
            with self.lock:
                self.accepted += 1
                self.voices[voice_id] = {
                    "itemId": item_id,
                    "name": "" if self.unnamed else request.args.get("name", ""),
                    "status": 40 if self.clones_fail else 30 if ready else 0,
                    "polls_left": self.ready_after_polls if self.ready_after_seconds is None else 10**9,
                    "ready_at": time.time() + (self.ready_after_seconds or 0),
                    "createTime": int(time.time() * 1000),
                    "updateTime": int(time.time() * 1000),
                    "clonedVoiceItemId": voice_id,
                    "vocalUrl": f"https://cdn.example/{item_id}.mp3",
                }
            time.sleep(plan.get("delay", self.upload_delay))
            if (lost := plan.get("answer", self.upload_answer)) is not None:
                status, text, kind = lost
                return Response(text, status=status, content_type=kind)
            if ready or self.unsure_200:
                return _json({"result": ready, "itemId": item_id, "clonedVoiceItemId": voice_id}, 200)
            return _json(
                {"itemId": item_id, "clonedVoiceItemId": voice_id, "message": "still processing after 120 seconds"},
                202,
            )
        finally:
            with self.lock:
                self.in_flight[account] -= 1

    def _ripen(self) -> None:
        """Voices whose time has come are ready (call with the lock held)."""
        now = time.time()
        for voice in self.voices.values():
            if voice["status"] == 0 and self.ready_after_seconds is not None and now >= voice["ready_at"]:
                voice["status"] = 30

    def _list(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"error": "Unauthorized", "code": 401}, 401)
        time.sleep(self.lookup_delay)
        if (refused := self._lookup_refusal()) is not None:
            with self.lock:
                self.list_calls += 1
            return refused
        with self.lock:
            self.list_calls += 1
            if self.list_answer is not None:
                status, text, kind = self.list_answer
                return Response(text, status=status, content_type=kind)
            self._ripen()
            records = [
                {k: v for k, v in voice.items() if k not in ("polls_left", "ready_at")}
                for voice in self.voices.values()
                if voice["status"] == 30 or not self.list_ready_only
            ]
        return _json({"records": records, "hasNext": False, "cursor": ""}, 200)

    def _get(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"error": "Unauthorized", "code": 401}, 401)
        voice_id = request.path[len(UPLOAD) :]
        time.sleep(self.lookup_delay)
        if (refused := self._lookup_refusal()) is not None:
            return refused
        with self.lock:
            self._ripen()
            voice = self.voices.get(voice_id)
            if voice is None:
                return _json({"error": f"No record found for {voice_id}", "code": 404}, 404)
            if voice["status"] == 0:
                voice["polls_left"] -= 1
                if voice["polls_left"] <= 0:
                    voice["status"] = 30
            shown = {k: v for k, v in voice.items() if k not in ("polls_left", "ready_at")}
        return _json({**shown, "status_name": "COMPLETED" if shown["status"] == 30 else "PROCESSING"}, 200)

    def _lookup_refusal(self) -> Response | None:
        with self.lock:
            if not self.lookup_refusals:
                return None
            status, headers = self.lookup_refusals.pop(0)
        said = {401: "Unauthorized", 429: "Too many requests"}.get(status, "Server error")
        response = _json({"error": said, "code": status}, status)
        response.headers.update(headers)
        return response

    def _delete(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"error": "Unauthorized", "code": 401}, 401)
        voice_id = request.path[len(UPLOAD) :]
        with self.lock:
            if self.voices.pop(voice_id, None) is None:
                return _json({"error": f"No record found for {voice_id}", "code": 404}, 404)
        return _json({"result": True}, 200)


def _json(payload: dict, status: int) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")
