"""Worker: the steps of one clone job, phase by phase, until it is ready or failed.

The runner (:mod:`relay.runner`) claims a job and calls :meth:`CloneWorker.process`; each step
commits its phase before its side effect, and resuming a phase is safe:

- received: download and validate (no side effects yet), then upload;
- uploading: the upload began. If its last bytes never left (``body_sent_at`` unset), useapi
  cannot have acted on it: send it again. If they did, a voice may exist: reconcile — list the
  account's voices until ``RELAY_READY_TIMEOUT_SECONDS`` after the upload began and adopt the new
  one — and never upload again on a guess (``upload_unconfirmed`` when none appears);
- uploaded: poll the voice until it is ready, failed, or ``RELAY_READY_TIMEOUT_SECONDS`` passes;
- ready / failed with a callback pending: deliver it (same ``webhook-id`` on every attempt).

How long to wait before trying again is :class:`relay.policy.RetryPolicy`'s to say, always.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from . import answers, callbacks, convert, events, fetch, pipeline, uploads, urlguard, voices
from .db import utcnow
from .errors import (
    RESUBMIT,
    CloneFailed,
    QueueTimeout,
    ReadyTimeout,
    RelayError,
    TokenUnavailable,
    UploadUnconfirmed,
    UpstreamError,
    UpstreamPaymentRequired,
    UpstreamRejected,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    VoiceExists,
)
from .jobs import (
    DELIVERED,
    DOWNLOADED,
    FAILED,
    GIVEN_UP,
    PENDING,
    READY,
    RECEIVED,
    UPLOADED,
    UPLOADING,
    VOICE_IN_DOUBT,
    Job,
    JobStore,
)
from .policy import RetryPolicy
from .runner import LeaseLost, Notifier, Pool
from .settings import Settings
from .tokens import TokenVault
from .useapi import Useapi

log = logging.getLogger("relay.worker")
_CLOCK_SKEW = timedelta(seconds=120)
# A job waiting for another that makes a voice of the same name looks again this often, in case
# that job's end did not wake it (its process stopped); its end wakes it at once otherwise.
FOLLOW_CHECK_SECONDS = 60

__all__ = ["CloneWorker", "LeaseLost", "Notifier", "start_pool"]


def start_pool(store: JobStore, settings: Settings, vault: TokenVault, notifier: Notifier, threads: int) -> Pool:
    """A started pool of ``threads`` clone workers (plus hourly clean-up of old jobs and spools)."""

    def hourly() -> None:
        # Each clean-up on its own: one that fails (logged) does not keep the others from running.
        for name, clean in (
            ("old jobs", lambda: store.purge(utcnow() - timedelta(hours=settings.job_retention_hours))),
            # Spool files of a process killed mid-job (SIGKILL leaves no chance to clean up).
            (
                "spool files",
                lambda: fetch.sweep_stale_spools(
                    settings.download_timeout + settings.upload_timeout + 600, settings.spool_dir
                ),
            ),
            # Stored files no job needs (a crash between storing and the job's write).
            ("stored uploads", lambda: uploads.sweep(store.engine, utcnow() - timedelta(minutes=10))),
        ):
            try:
                clean()
            except Exception:  # noqa: BLE001 - logged; tried again at the next hour
                log.exception("clean-up of %s failed", name)

    threading.Thread(target=convert.warm_up, daemon=True, name="relay-warm-up").start()
    return Pool(
        store,
        settings,
        notifier,
        threads,
        lambda worker_id: CloneWorker(store, settings, vault, notifier, worker_id),
        hourly,
    ).start()


class CloneWorker:
    """Moves claimed clone jobs on; one per worker thread (``worker_id`` owns its leases)."""

    def __init__(self, store: JobStore, settings: Settings, vault: TokenVault, notifier: Notifier, worker_id: str):
        self.store, self.settings, self.vault, self.notifier = store, settings, vault, notifier
        self.id = worker_id
        self.policy = RetryPolicy.of(settings)
        # Timeline events noted since the job's last write, written in the next write's transaction
        # (the early upload's thread notes and writes too, hence the lock).
        self._events: list[dict] = []
        self._events_lock = threading.Lock()

    # --- the state machine ----------------------------------------------------------------

    def process(self, job: Job) -> None:
        try:
            self._process(job)
        finally:  # noted after the last write (or before a crash): written on their own
            events.record_rows(self.store.engine, self._take_events())

    def _process(self, job: Job) -> None:
        if job.terminal:
            self._deliver_callback(job)
            return
        answer = dict(job.answer or {})
        try:
            request = pipeline.CloneRequest(**job.request)
            if (
                job.follows
                and job.exclusive_key is None
                and job.phase == RECEIVED
                and self._follow(job, request, answer)
            ):
                return
            if not job.follows:  # a job that waited for another waited for it, not for a worker
                self._check_queue_time(job)
            token = self._open_token(job)
            if job.phase in (RECEIVED, DOWNLOADED):
                self._clone(job, request, token, answer)
            elif job.phase == UPLOADING and job.body_sent_at is None:
                self._resend(job, answer)
            elif job.phase == UPLOADING:
                self._reconcile(job, request, token, answer)
            elif job.phase == UPLOADED:
                self._poll(job, token, answer)
        except RelayError as err:
            self._fail(job, err, answer)

    def crashed(self, job: Job) -> None:
        """After an unexpected crash in a step: try again later; give up after ``RELAY_MAX_ATTEMPTS``
        × 3 crashes (not claims: every poll and callback attempt is a claim). A finished job keeps
        its outcome: only its callback is tried again, or given up (its crashes counted since it
        ended). A crash is written with the write that reschedules the job: if that write fails,
        the lease runs out and the next claim tries again."""
        self._event(job, "crashed", "a step crashed; it is retried (see the relay's logs)")
        limit = self.settings.max_attempts * 3
        try:
            since = job.completed_at if job.terminal else None
            crashes = events.count(self.store.engine, job.id, "crashed", since=since) + 1  # with this one
            delay = self.policy.delay(crashes)
            when = utcnow() + timedelta(seconds=delay)
            if job.terminal and crashes < limit:
                self._save(job, release=True, callback_next_at=when, next_run_at=when)
            elif job.terminal:
                log.warning("callback given up: its step kept crashing", extra={"fields": {"job_id": job.id}})
                detail = "the delivery step kept crashing (see the relay's logs)"
                self._save(job, release=True, callback_status=GIVEN_UP, callback_last_error=detail, next_run_at=None)
            elif crashes >= limit:
                message, fields = RelayError.default_message, {}
                if (doubt := self._voice_doubt(job)) is not None:
                    message, fields = f"The relay kept crashing on this job (see its logs). {doubt[0]}", doubt[1]
                self._fail(job, RelayError(message, **fields), dict(job.answer or {}))
            else:
                self._save(job, release=True, next_run_at=when)
        except Exception:  # the database itself may be what failed; the lease will expire
            log.exception("could not reschedule job", extra={"fields": {"job_id": job.id}})

    def _open_token(self, job: Job) -> str | None:
        """The job's useapi token; without it, an error whose advice fits what was sent: "submit
        again" only when no voice exists or may exist."""
        try:
            return self.vault.open(job.id, job.token_kind, job.token_sealed, needed=not job.dry_run)
        except TokenUnavailable as err:
            doubt = self._voice_doubt(job)
            if doubt is None:
                raise
            raise TokenUnavailable(f"{err.message.removesuffix(RESUBMIT).rstrip()} {doubt[0]}", **doubt[1]) from None

    @staticmethod
    def _voice_doubt(job: Job) -> tuple[str, dict] | None:
        """For a job that ends before its voice is known: what to tell a caller whose voice exists
        (useapi accepted the upload) or may exist (a whole body went out), and the answer's fields;
        None when nothing was sent, and submitting again is safe."""
        if job.phase == UPLOADED:
            voice = job.cloned_voice_item_id
            return (
                f"useapi.net had already accepted the upload: do not submit it again; check the voice with "
                f"GET /v1/voices/{voice}.",
                {"cloned_voice_item_id": voice, "item_id": job.item_id},
            )
        if job.phase == UPLOADING and job.body_sent_at is not None:
            name = job.request.get("name") or "<name>"
            return (
                f"Its upload may have created a voice: check GET /v1/voices?name={name} before submitting it again.",
                {},
            )
        return None

    def _with_doubt(self, job: Job, err: UpstreamError) -> UpstreamError:
        """``err`` (the token refused, no subscription) met after the upload went out: its advice
        ("fix the token") must not hide that a paid voice exists or may (sending again pays twice)."""
        doubt = self._voice_doubt(job)
        if doubt is None:
            return err
        return type(err)(f"{err.message} {doubt[0]}", upstream_status=err.fields.get("upstream_status"), **doubt[1])

    def _follow(self, job: Job, request: pipeline.CloneRequest, answer: dict) -> bool:
        """A job that waits for another making a voice of the same name for the account
        (if_exists=reuse|fail). True when it still waits, or has ended with that job's voice;
        False when it is to make the voice itself (the job it followed made none)."""
        leader = self.store.get(job.follows) if job.follows else None
        while True:
            if leader is not None and not leader.terminal:
                self._event(job, "follows", f"waits for job {leader.id}, which makes the voice {request.name!r}")
                self._save(
                    job, release=True, follows=leader.id, next_run_at=utcnow() + timedelta(seconds=FOLLOW_CHECK_SECONDS)
                )
                # Its end may have woken its followers between the look above and this write.
                if (again := self.store.get(leader.id)) is None or again.terminal:
                    self.store.wake_followers(leader.id)
                return True
            if leader is not None and leader.phase == READY and leader.cloned_voice_item_id:
                voice, item = leader.cloned_voice_item_id, leader.item_id
                if request.if_exists == "fail":
                    raise VoiceExists(
                        f"A voice named {request.name!r} was made for this account ({voice}, by job {leader.id}) "
                        "while this request waited for it. Use if_exists=reuse to get it instead.",
                        cloned_voice_item_id=voice,
                        item_id=item,
                    )
                self._event(job, "reused", f"the voice {voice}, made by job {leader.id}")
                answer.update(
                    reused=True,
                    cloned_voice_item_id=voice,
                    item_id=item,
                    message=f"Reused the voice {request.name!r} made by job {leader.id}; nothing was uploaded.",
                )
                self._accepted(job, answer, "ready", voice, item)
                return True
            if leader is not None and _voice_may_exist(leader):
                # useapi has (or may have) that job's voice, listed only once it is ready: making
                # another would pay twice. This job ends as that one did, to its own callback.
                self._event(job, "followed", f"job {leader.id} ended {leader.phase} with a voice in doubt")
                self._end(job, FAILED, leader.http_status or 502, _outcome_of(leader, job, answer))
                return True
            if leader is not None and (leader.answer or {}).get("error_code") == "queue_timeout":
                # No worker took the job it waited for in time: neither did one take this one.
                raise QueueTimeout(leader.answer.get("error_message") or QueueTimeout.default_message)
            limit = self.settings.queue_timeout_seconds
            if utcnow() - job.created_at > timedelta(seconds=limit):
                raise QueueTimeout(
                    f"The clone waited longer than {limit:g} s (RELAY_QUEUE_TIMEOUT_SECONDS) for another job making "
                    f"a voice named {request.name!r}, which made none. Nothing was uploaded; send it again."
                )
            # The job it followed made no voice (or is gone): make it, unless another job took the name.
            taken, holder = self.store.take_name(job.id, self.id, job.name_key or "")
            if taken:
                job.exclusive_key = job.name_key
                self._event(job, "leads", "the job it waited for made no voice: this one makes it")
                return False
            if holder is None:
                raise LeaseLost(job.id)
            leader = self.store.get(holder)

    def _check_queue_time(self, job: Job) -> None:
        if job.phase != RECEIVED or job.upload_attempts:
            return
        limit = self.settings.queue_timeout_seconds
        if utcnow() - job.created_at > timedelta(seconds=limit):
            raise QueueTimeout(
                f"The clone waited {limit:g} s (RELAY_QUEUE_TIMEOUT_SECONDS) without a worker taking it: the "
                "relay is overloaded or its workers are not running (check /readyz). Nothing was uploaded; "
                "send it again."
            )

    def _clone(self, job: Job, request: pipeline.CloneRequest, token: str | None, answer: dict) -> None:
        try:
            existing = pipeline.existing_voice(request, token, self.settings, answer)
        except (UpstreamUnauthorized, UpstreamPaymentRequired):
            raise
        except UpstreamError as err:
            refused = isinstance(err, UpstreamRejected) and err.fields.get("upstream_status") != 408
            if refused or getattr(err, "listing_cut_short", False):  # looking again gets the same answer
                raise
            self._later(job, err)  # a failed look at the account's voices: look again, nothing was sent
            return
        if existing is not None:  # if_exists=reuse: adopt the account's voice, no upload
            self._event(job, "reused", f"if_exists=reuse: the account's voice {existing['cloned_voice_item_id']}")
            self._accepted(job, answer, existing["status"], existing["cloned_voice_item_id"], existing["item_id"])
            return
        attempt = job.upload_attempts + 1

        def uploading() -> None:
            # Committed before the first byte leaves: from here on the job knows an upload began.
            self._save(
                job,
                phase=UPLOADING,
                answer=answer,
                upload_started_at=utcnow(),
                upload_attempts=attempt,
                body_sent_at=None,
            )
            self._event(job, "upload_started", f"upload attempt {attempt} to useapi.net")

        def body_complete() -> None:
            # Committed before the last bytes leave: until then useapi holds an incomplete request.
            self._save(job, body_sent_at=utcnow())
            self._event(job, "upload_sent", "the whole recording is on its way: from now on it is never sent again")

        # A large file may start uploading while it downloads (relay/stream.py): then uploading()
        # runs during the download, and the upload's last bytes wait for early.finish().
        early = pipeline.early_upload(request, token or "", self.settings, uploading, body_complete)
        source = "the stored upload" if request.upload_id else events.host(request.audio_url)
        # Written with the job's next write: the upload's start, which for a large file comes
        # within its first 64 KiB (no transaction of its own on the way to the download).
        self._event(job, "download_started", f"from {source}")
        # The job's answer is written inside the block, before the spool file is removed (removing
        # 40 MB takes ~1.5 ms that a waiting request need not wait for).
        with pipeline.prepared(request, self.settings, answer, early=early, engine=self.store.engine) as (
            spool,
            info,
        ):
            self._event(job, "downloaded", f"{info.size} bytes")
            self._event(job, "audio_valid", events.audio(info))
            if answer.get("converted"):
                received = str(answer.get("source_format")).upper()
                self._event(job, "converted", f"from {received} to {info.format.upper()}")
            if request.dry_run:
                answer["message"] = pipeline.dry_run_message(request, info)
                self._finish(job, 200, answer, status="validated")
                return
            try:
                if early is not None and early.started:
                    result = early.finish()
                else:
                    uploading()
                    result = pipeline.upload(
                        spool, info, request, token or "", self.settings, before_tail=body_complete
                    )
            except UpstreamError as err:
                self._after_failed_upload(job, err, answer, attempt)
                return
            self._event(job, "upload_answered", f"HTTP {result.upstream_status}: {result.status}")
            answer.update(
                cloned_voice_item_id=result.cloned_voice_item_id,
                item_id=result.item_id,
                upstream_status=result.upstream_status,
            )
            self._accepted(job, answer, result.status, result.cloned_voice_item_id, result.item_id, attempt=attempt)

    def _after_failed_upload(self, job: Job, err: UpstreamError, answer: dict, attempt: int) -> None:
        status = err.fields.get("upstream_status")
        self._event(job, "upload_failed", f"{err.error_code}{f' (HTTP {status})' if status else ''}: {err.message}")
        if err.maybe_created:
            # The whole body went out and no readable answer came back: a voice may exist. Never
            # send it again; look for it until the window closes.
            log.warning("upload answer lost", extra={"fields": {"job_id": job.id, "error": err.error_code}})
            _warn(
                answer,
                "useapi.net's answer to the upload was lost or unreadable; the relay is looking for the "
                "voice it may have created instead of uploading again.",
            )
            self._save(
                job,
                attempt=attempt,
                answer=answer,
                body_sent_at=job.body_sent_at or utcnow(),
                next_run_at=utcnow() + timedelta(seconds=self.settings.reconcile_grace_seconds),
            )
            grace = self.settings.reconcile_grace_seconds
            self._event(job, "reconcile", f"answer lost: voices are listed in {grace:g} s; never uploaded again")
            return
        retryable = not err.reached or status == 429 or (status or 0) >= 500
        if retryable and attempt < self.settings.max_attempts:
            # useapi never got a whole request, or answered with a refusal of its own: it did not
            # take the voice, so trying again later cannot make a duplicate.
            delay = self.policy.delay(attempt, err.retry_after)
            if status == 429:  # the whole account waits, other accounts go on
                self.store.back_off(job.account_key, delay)
            # Why, in the relay's own words ("…could not be reached for the upload: the name … did
            # not resolve (DNS)"), without the advice to try again: the relay does.
            said = err.message.split(" Try again later")[0].rstrip(". ")
            _warn(answer, f"useapi.net answered HTTP {status}; retrying." if status else f"{said}; retrying.")
            self._save(
                job,
                attempt=attempt,
                phase=RECEIVED,
                answer=answer,
                body_sent_at=None,
                next_run_at=utcnow() + timedelta(seconds=delay),
            )
            return
        raise err

    def _resend(self, job: Job, answer: dict) -> None:
        """An upload whose last bytes never left (its worker died mid-body): nothing was created."""
        if job.upload_attempts >= self.settings.max_attempts:
            raise UpstreamUnavailable(
                f"The upload was interrupted {job.upload_attempts} times before it was complete; nothing was "
                "created on useapi.net. Try again later."
            )
        self._save(job, release=True, phase=RECEIVED, next_run_at=utcnow())

    def _reconcile(self, job: Job, request: pipeline.CloneRequest, token: str | None, answer: dict) -> None:
        started = job.upload_started_at or job.created_at
        window_end = started + timedelta(seconds=self.settings.ready_timeout_seconds)
        now = utcnow()
        last = now > window_end  # past the window: one last look (a claim may come late), then say so
        try:
            with Useapi(self.settings, token or "") as client:
                found, stopped = voices.list_all(client, request.user_id, self.settings.max_list_pages)
        except (UpstreamUnauthorized, UpstreamPaymentRequired) as err:
            raise self._with_doubt(job, err) from None
        except UpstreamError as err:
            if last:
                self._note_failed_look(job, err)
                raise self._unconfirmed(job, request) from None
            self._later(job, err, until=window_end)
            return
        since = (started - _CLOCK_SKEW).isoformat(timespec="seconds") + "Z"
        wanted = request.name.strip().casefold()
        candidates = [
            voice
            for voice in found
            if voice["created_at"]
            and voice["created_at"] >= since
            and (not voice["name"] or voice["name"].strip().casefold() == wanted)
            and not self.store.voice_taken(voice["cloned_voice_item_id"], job.id)
        ]
        voice = self._unambiguous(job, candidates, wanted)
        if voice is not None:
            log.info("adopted voice after lost answer", extra={"fields": {"job_id": job.id}})
            self._event(job, "reconcile", f"found and adopted {voice['cloned_voice_item_id']}")
            answer.update(cloned_voice_item_id=voice["cloned_voice_item_id"], item_id=voice["item_id"])
            _warn(answer, "The upload's answer was lost; the voice it created was found and adopted.")
            try:
                self._accepted(job, answer, voice["status"], voice["cloned_voice_item_id"], voice["item_id"], made=True)
            except IntegrityError:  # another job adopted it a moment ago: it is not this job's voice
                self._event(job, "reconcile", f"{voice['cloned_voice_item_id']} was taken by another job")
                later = min(now + timedelta(seconds=self.policy.poll_delay(job.attempts)), window_end)
                self._save(job, release=True, next_run_at=later)
            return
        if stopped is None:
            self._event(job, "reconcile", f"no new voice among {len(found)} on the account yet")
        else:
            self._event(job, "reconcile", f"no new voice among the {len(found)} read; the listing stopped: {stopped}")
        if last:
            raise self._unconfirmed(job, request, stopped)
        # useapi may list the voice only once it is ready: look again, less and less often.
        later = min(now + timedelta(seconds=self.policy.poll_delay(job.attempts)), window_end)
        self._save(job, release=True, next_run_at=later)

    def _unconfirmed(self, job: Job, request: pipeline.CloneRequest, cut: str | None = None) -> UploadUnconfirmed:
        looked = any(  # a listing was read at least once (the first "reconcile" only says why it looks)
            event.kind == "reconcile" and not (event.detail or "").startswith("answer lost")
            for event in events.for_job(self.store.engine, job.id)
        ) or any(detail.startswith("no new voice") for _kind, detail in self._pending_events("reconcile"))
        return UploadUnconfirmed(_unconfirmed_message(request, self.settings.ready_timeout_seconds, looked, cut))

    def _note_failed_look(self, job: Job, err: UpstreamError) -> None:
        self._event(job, "lookup_failed", f"{err.error_code}: {err.message}"[:300])

    def _failed_looks(self, job: Job, since=None) -> int:
        """The job's looks at useapi that failed: written ones (``since`` a moment) and this step's."""
        written = events.count(self.store.engine, job.id, "lookup_failed", since=since)
        return written + len(self._pending_events("lookup_failed"))

    def _pending_events(self, kind: str) -> list[tuple[str, str]]:
        """This step's events not yet written, of ``kind``: (kind, detail)."""
        with self._events_lock:
            return [(row["kind"], row.get("detail") or "") for row in self._events if row["kind"] == kind]

    def _unambiguous(self, job: Job, candidates: list[dict], wanted: str) -> dict | None:
        """The voice this job's lost upload made, when the list says so beyond doubt: the one new
        voice with the job's name while no other upload of that name is in doubt; or the only
        unnamed one while no other upload of the account is. A voice could be another job's: then
        wait for that job's own answer to claim it, or for the names to show. Two new voices of the
        name that no job claims (two uploads that both lost their answers, or one made elsewhere)
        cannot be told apart: no guess, and the job ends unconfirmed if nothing changes."""
        named = [v for v in candidates if v["name"] and v["name"].strip().casefold() == wanted]
        if named:
            others = job.name_key is not None and self.store.uploads_in_doubt(job.account_key, job.id, job.name_key)
            if len(named) == 1 and not others:
                return named[0]
            why = "another upload of this name is in doubt" if others else "no job claims them"
            self._event(job, "reconcile", f"{len(named)} new voice(s) of this name; {why}: waiting")
            return None
        if len(candidates) == 1 and not self.store.uploads_in_doubt(job.account_key, job.id):
            return candidates[0]
        if candidates:
            self._event(job, "reconcile", f"{len(candidates)} unnamed voice(s) could be another upload's: waiting")
        return None

    def _accepted(
        self,
        job: Job,
        answer: dict,
        status: str,
        voice_id: str | None,
        item_id: str | None,
        attempt: int = 0,
        made: bool = False,
    ) -> None:
        """useapi has the voice: ready now, or poll it. ``attempt``: the upload that brought it;
        ``made``: adopted after a lost answer — a guess, so no other job's guess may take it too
        (an upload's own answer needs no such guard: useapi named the voice itself)."""
        made_voice = {"made_voice_id": voice_id} if made and voice_id else {}
        if status == "ready":
            self._finish(
                job,
                200,
                answer,
                status="ready",
                attempt=attempt,
                made_voice=made_voice,
                cloned_voice_item_id=voice_id,
                item_id=item_id,
            )
            return
        answer["message"] = pipeline.PROCESSING_MESSAGE
        self._save(
            job,
            release=True,
            attempt=attempt,
            phase=UPLOADED,
            answer=answer,
            **self._without_link(job),  # the link is not needed any more
            accepted_at=utcnow(),
            cloned_voice_item_id=voice_id,
            item_id=item_id,
            next_run_at=utcnow() + timedelta(seconds=self.settings.poll_interval_seconds),
            **made_voice,
        )

    def _poll(self, job: Job, token: str | None, answer: dict) -> None:
        voice_id = job.cloned_voice_item_id or ""
        accepted = job.accepted_at or job.created_at
        window_end = accepted + timedelta(seconds=self.settings.ready_timeout_seconds)
        last = utcnow() > window_end  # past the window: one last look (a claim may come late), then say so
        try:
            with Useapi(self.settings, token or "") as client:
                record = client.get_voice(voice_id)
                if record is None:
                    listed = voices.list_all(client, job.request.get("user_id"), self.settings.max_list_pages).voices
                    record = next(
                        (
                            {"status": v["upstream_status_code"]}
                            for v in listed
                            if v["cloned_voice_item_id"] == voice_id
                        ),
                        None,
                    )
        except (UpstreamUnauthorized, UpstreamPaymentRequired) as err:
            raise self._with_doubt(job, err) from None
        except UpstreamError as err:
            if last:
                self._note_failed_look(job, err)
                raise self._not_ready(job, accepted) from None
            self._later(job, err, until=window_end)
            return
        state = voices.status_name(record.get("status")) if record else "processing"
        self._event(job, "poll", f"useapi.net says {state}")
        if state == "ready":
            self._finish(job, 200, answer, status="ready")
        elif state == "failed":
            raise CloneFailed(cloned_voice_item_id=voice_id, item_id=job.item_id)
        elif last:
            raise self._not_ready(job, accepted)
        else:
            later = min(utcnow() + timedelta(seconds=self.policy.poll_delay(job.attempts)), window_end)
            self._save(job, release=True, next_run_at=later)

    def _not_ready(self, job: Job, accepted) -> ReadyTimeout:
        failed = self._failed_looks(job, since=accepted)
        return ReadyTimeout(
            f"The voice was not ready {self.settings.ready_timeout_seconds:g} s after useapi.net accepted it. "
            "It may still finish: check it with GET /v1/voices/<cloned_voice_item_id>."
            + (
                f" {failed} of the relay's looks at it got no readable answer from useapi.net (see the job's timeline)."
                if failed
                else ""
            ),
            cloned_voice_item_id=job.cloned_voice_item_id or "",
            item_id=job.item_id,
        )

    # --- endings --------------------------------------------------------------------------

    def _finish(
        self,
        job: Job,
        http_status: int,
        answer: dict,
        status: str,
        attempt: int = 0,
        made_voice: dict | None = None,
        **ids: Any,
    ) -> None:
        answer = {**answer, **{k: v for k, v in ids.items() if v is not None}}
        answer.update(ok=True, status=status, error_code=None, error_message=None)
        if status == "ready" and not answer.get("reused"):
            answer["message"] = pipeline.READY_MESSAGE
        self._end(job, READY, http_status, answer, attempt, made_voice)

    def _fail(self, job: Job, err: RelayError, answer: dict) -> None:
        http_status, answer = answers.failure(err, answer)
        if err.retry_after:  # useapi's wait, for the answer's Retry-After header (kept out of the body)
            answer[answers.RETRY_AFTER] = max(1, round(err.retry_after))
        log.info("job failed", extra={"fields": {"job_id": job.id, "error_code": err.error_code}})
        self._end(job, FAILED, http_status, answer)

    def _end(
        self, job: Job, phase: str, http_status: int, answer: dict, attempt: int = 0, made_voice: dict | None = None
    ) -> None:
        now = utcnow()
        # The first callback goes no sooner than RELAY_CALLBACK_FIRST_DELAY_SECONDS after the job was
        # created: a caller that has just received its 202 (n8n saving its waiting execution) is ready.
        first_callback = max(now, job.created_at + timedelta(seconds=self.settings.callback_first_delay_seconds))
        # Recorded before the job's end is visible, so whoever sees the end also sees it on the timeline.
        self._event(job, answer.get("status") or phase, answer.get("error_code") or answer.get("message"))
        self._save(
            job,
            release=True,
            attempt=attempt,
            phase=phase,
            answer=answer,
            http_status=http_status,
            completed_at=now,
            token_sealed=None,
            token_holder=None,
            name_key=None,
            exclusive_key=None,
            **self._without_link(job),
            cloned_voice_item_id=answer.get("cloned_voice_item_id"),
            item_id=answer.get("item_id"),
            callback_status=PENDING if job.callback_url else None,
            callback_next_at=first_callback if job.callback_url else None,
            next_run_at=first_callback if job.callback_url else None,  # nothing left to do: off the due index
            **(made_voice or {}),
        )
        self.vault.forget(job.id)
        log.info("job finished", extra={"fields": {"job_id": job.id, "phase": phase, "status": http_status}})
        if not job.dry_run and self.store.wake_followers(job.id):
            self.notifier.work_arrived()  # jobs that waited for this one: their answer is known now

    def _without_link(self, job: Job) -> dict[str, Any]:
        """The stored request's audio link cut to scheme, host and path (no signed query, no
        credentials), and the whole link sealed under RELAY_SECRET_KEY for the console ("" when
        it had more than that and there is no key to seal it with)."""
        url = job.request.get("audio_url")
        if not url or job.audio_url_sealed is not None:
            return {}
        kept = urlguard.redact(url)
        if kept == url.split("#", 1)[0]:  # nothing lost but a fragment, which is never sent
            return {}
        return {"request": {**job.request, "audio_url": kept}, "audio_url_sealed": self.vault.seal_text(url) or ""}

    def _deliver_callback(self, job: Job) -> None:
        body = json.dumps(answers.for_job(job, utcnow()), separators=(",", ":")).encode("utf-8")
        delivery = callbacks.deliver(job.callback_url or "", body, job.webhook_id or job.id, self.settings)
        attempts = job.callback_attempts + 1
        fields = {"job_id": job.id, "attempt": attempts, "result": delivery.detail}
        self._event(job, "callback", f"attempt {attempts}: {delivery.detail}" + (" — delivered" * delivery.delivered))
        delay = (
            None
            if delivery.delivered or delivery.gone
            else callbacks.next_delay(self.settings.callback_schedule, attempts)
        )
        if delay is None:
            settled = DELIVERED if delivery.delivered else GIVEN_UP
            url = job.callback_url or ""
            # Its signed query or secret-looking path is not needed any more, but for a re-send: the
            # whole URL is sealed whenever the kept one lost anything but a fragment, which is never
            # sent (a Make hook's key is its path).
            kept = urlguard.redact(url)
            sealed = (self.vault.seal_text(url) or "") if kept != url.split("#", 1)[0] else None
            log.log(
                logging.INFO if delivery.delivered else logging.WARNING,
                f"callback {settled.replace('_', ' ')}",
                extra={"fields": fields},
            )
            self._save(
                job,
                release=True,
                callback_status=settled,
                callback_attempts=attempts,
                callback_last_error=None if delivery.delivered else delivery.detail,
                callback_url=kept,
                callback_sealed=sealed,
                next_run_at=None,
            )
            return
        log.info("callback failed, will retry", extra={"fields": {**fields, "delay_s": round(delay, 1)}})
        when = utcnow() + timedelta(seconds=delay)
        self._save(
            job,
            release=True,
            callback_attempts=attempts,
            callback_last_error=delivery.detail,
            callback_next_at=when,
            next_run_at=when,
        )

    # --- helpers --------------------------------------------------------------------------

    def _later(self, job: Job, err: UpstreamError, until=None) -> None:
        """A look-up failed (useapi busy, down or answering nonsense): try again later — within
        ``until`` when the step has a window of its own, else at most ``RELAY_MAX_ATTEMPTS`` × 3 times."""
        if until is None:
            # Counted by the looks that failed (claims count every wait and check as well), and
            # never past the queue's own bound: the job ends with the error it met, not queue_timeout.
            failed = self._failed_looks(job) + 1
            if failed >= self.settings.max_attempts * 3:
                raise err
            delay = self.policy.delay(failed, err.retry_after)
            queue_end = job.created_at + timedelta(seconds=self.settings.queue_timeout_seconds)
            # Only a job the queue's bound still applies to (never uploaded, waiting for no other job).
            queued = job.phase == RECEIVED and not job.upload_attempts and not job.follows
            if queued and utcnow() + timedelta(seconds=delay) >= queue_end:
                raise err
        else:
            # A step with a window of its own (reconcile, poll) claims the job at every look, so
            # its claims are not failures to back off from: look again at the step's own pace.
            delay = max(self.policy.poll_delay(job.attempts), self.policy.retry_after(err.retry_after))
        if err.fields.get("upstream_status") == 429:
            # The account waits what useapi asked (else one retry base), not this job's back-off.
            self.store.back_off(job.account_key, self.policy.retry_after(err.retry_after) or self.policy.base)
        self._note_failed_look(job, err)
        when = utcnow() + timedelta(seconds=delay)
        self._save(job, release=True, next_run_at=min(when, until) if until is not None else when)

    def _event(self, job: Job, kind: str, detail: str | None = None) -> None:
        """Note an event for the console's timeline; it is written with the job's next write
        (or when the step ends). Never raises."""
        with self._events_lock:
            self._events.append(events.row(job.id, kind, detail))

    def _take_events(self) -> list[dict]:
        with self._events_lock:
            taken, self._events = self._events, []
        return taken

    def _save(self, job: Job, release: bool = False, attempt: int = 0, **values: Any) -> None:
        """Write ``values`` under this worker's lease (``release``: and give it up). With
        ``attempt``, the write records what upload number ``attempt`` brought back, and holds
        whoever has the lease now (see :meth:`JobStore.record_upload`)."""
        noted = self._take_events()
        try:
            if attempt:
                written = self.store.record_upload(job.id, attempt, events=noted, **values)
                release = True
            else:
                write = self.store.release if release else self.store.update
                written = write(job.id, self.id, events=noted, **values)
        except BaseException:
            with self._events_lock:  # not written: keep them for the next write
                self._events[:0] = noted
            raise
        if not written:
            raise LeaseLost(job.id)
        if values.get("phase") in (UPLOADED, READY, FAILED) and job.request.get("upload_id"):
            uploads.delete_upload(self.store.engine, job.request["upload_id"])  # useapi has it, or it is over
        for key, value in values.items():
            if hasattr(job, key):
                setattr(job, key, value)
        if release:  # the step is over: wake requests waiting on this job (once, not per write)
            self.notifier.job_changed(job.id)


# useapi's answers that say no voice was made: a refused upload (the token, the subscription, the
# request) or a clone that failed. Any other end after the body went out may have left a voice.
_NO_VOICE = ("upstream_rejected", "upstream_unauthorized", "upstream_payment_required", "clone_failed")
_OWN_FIELDS = {"request_id", "metadata", "warnings", "name", "user_id", "dry_run", "source_format", "converted"}


def _voice_may_exist(leader: Job) -> bool:
    """Whether a job that ended without a ready voice may still have one at useapi (listed only
    once ready): then a job that waited for it must not make another."""
    code = (leader.answer or {}).get("error_code")
    if code == "clone_failed":
        return False
    if leader.made_voice_id or leader.cloned_voice_item_id:
        return True
    return leader.body_sent_at is not None and code not in _NO_VOICE


def _outcome_of(leader: Job, job: Job, answer: dict) -> dict:
    """``job``'s answer ending as ``leader`` ended: its outcome (error, voice ids), this job's own
    request fields (metadata, name; it downloaded nothing, so no audio fields), and a warning."""
    ended = {
        key: value
        for key, value in (leader.answer or {}).items()
        if key not in _OWN_FIELDS and not key.startswith("audio_")
    }
    note = (
        f"This request waited for job {leader.id}, whose upload of a voice of the same name went out but did not "
        "end with a ready voice: it ends as that job did, so that no second voice is paid for. Check that voice "
        "(cloned_voice_item_id, or GET /v1/voices?name=) before sending it again."
    )
    return {**answer, **ended, VOICE_IN_DOUBT: leader.id, "warnings": [*answer.get("warnings", []), note]}


def _warn(answer: dict, note: str) -> None:
    if note not in answer.get("warnings", []):
        answer["warnings"] = [*answer.get("warnings", []), note]


def _unconfirmed_message(
    request: pipeline.CloneRequest, window: float, looked: bool = True, cut: str | None = None
) -> str:
    if cut is not None:  # "none appeared" would claim more than was seen
        seen = (
            f"the account's voice listing could not be read to its end ({cut}); no new voice named "
            f"{request.name!r} appeared in what was read within {window:g} s"
        )
    elif looked:
        seen = f"no new voice named {request.name!r} appeared on the account within {window:g} s"
    else:
        seen = f"the account's voice listing could not be read within {window:g} s to look for it"
    return (
        f"useapi.net received the whole recording, but its answer was lost and {seen}. A voice may still "
        f"exist and may have been charged: check GET /v1/voices?name={request.name} before you send this "
        "clone again."
    )
