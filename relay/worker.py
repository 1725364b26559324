"""Worker: claims due jobs and moves each one phase by phase until it is ready or failed.

Every step runs under a lease that a background thread renews; every write is guarded by that
lease, so a worker that lost its job (killed, paused, partitioned) cannot overwrite the one that
took it over. A phase is committed before its side effects, and resuming a phase is safe:

- received (or downloaded, left by earlier versions): download and validate (no side effects yet), then upload;
- uploading: an upload may have reached useapi, its answer lost: wait out useapi's hold, list the
  account's voices and adopt one created since the attempt began, and only then upload again;
- uploaded: poll the voice until it is ready, failed, or ``RELAY_READY_TIMEOUT_SECONDS`` passes;
- ready / failed with a callback pending: deliver it (same ``webhook-id`` on every attempt).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from . import answers, callbacks, fetch, pipeline, uploads, voices
from .db import utcnow
from .errors import (
    CloneFailed,
    ReadyTimeout,
    RelayError,
    UpstreamError,
    UpstreamPaymentRequired,
    UpstreamTimeout,
    UpstreamUnauthorized,
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
    Job,
    JobStore,
)
from .settings import Settings
from .tokens import TokenVault
from .useapi import Useapi

log = logging.getLogger("relay.worker")
_CLOCK_SKEW = timedelta(seconds=120)
_MAX_BACKOFF = 300.0
_MAX_POLL = 60.0


class LeaseLost(Exception):
    """Another worker holds this job now: stop touching it."""


class Notifier:
    """Wakes waiting requests and idle workers in this process when a job changes."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._work = threading.Condition()
        self.generation = 0  # how many changes so far: read it before looking at a job

    def job_changed(self) -> None:
        with self._changed:
            self.generation += 1
            self._changed.notify_all()

    def wait_for_change(self, timeout: float, since: int) -> None:
        """Wait for a change after ``since`` (a :attr:`generation` read earlier): return at once
        if one already happened, so a change between the read and the wait is not missed."""
        with self._changed:
            if self.generation == since:
                self._changed.wait(timeout)

    def work_arrived(self, everyone: bool = False) -> None:
        """Wake one idle worker (all of them when stopping): one new job needs one worker."""
        with self._work:
            if everyone:
                self._work.notify_all()
            else:
                self._work.notify()

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            self._work.wait(timeout)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    """Processes one claimed job at a time; several run side by side in a :class:`Pool`."""

    def __init__(self, store: JobStore, settings: Settings, vault: TokenVault, notifier: Notifier, worker_id: str):
        self.store, self.settings, self.vault, self.notifier = store, settings, vault, notifier
        self.id = worker_id

    def run_once(self) -> bool:
        """Claim and process one due job; False when there was none."""
        job = self.store.claim(self.id, self.settings.lease_seconds, self.settings.account_concurrency)
        if job is None:
            return False
        log.info("job claimed", extra={"fields": {"job_id": job.id, "phase": job.phase, "worker": self.id}})
        with _Renewal(self.store, job.id, self.id, self.settings.lease_seconds):
            try:
                self.process(job)
            except LeaseLost:
                log.warning("lease lost", extra={"fields": {"job_id": job.id, "worker": self.id}})
            except Exception:
                log.exception("job step crashed", extra={"fields": {"job_id": job.id, "phase": job.phase}})
                self._retry_later(job)
        self.notifier.job_changed()
        return True

    # --- the state machine ----------------------------------------------------------------

    def process(self, job: Job) -> None:
        if job.terminal:
            self._deliver_callback(job)
            return
        answer = dict(job.answer or {})
        try:
            token = self.vault.open(job.id, job.token_kind, job.token_sealed)
            request = pipeline.CloneRequest(**job.request)
            if job.phase in (RECEIVED, DOWNLOADED):
                self._clone(job, request, token, answer)
            elif job.phase == UPLOADING:
                self._reconcile(job, request, token, answer)
            elif job.phase == UPLOADED:
                self._poll(job, token, answer)
        except RelayError as err:
            self._fail(job, err, answer)

    def _clone(self, job: Job, request: pipeline.CloneRequest, token: str | None, answer: dict) -> None:
        existing = pipeline.existing_voice(request, token, self.settings, answer)
        if existing is not None:  # if_exists=reuse: adopt the account's voice, no upload
            self._accepted(job, answer, existing["status"], existing["cloned_voice_item_id"], existing["item_id"])
            return
        attempt = job.upload_attempts + 1

        def uploading() -> None:
            # Committed before the first byte leaves: a crash from here on means "maybe uploaded".
            # (One write: a job that stops between download and upload downloads again anyway.)
            self._save(job, phase=UPLOADING, answer=answer, upload_started_at=utcnow(), upload_attempts=attempt)

        # A large file may start uploading while it downloads (relay/stream.py): then uploading()
        # runs during the download, and the upload's last bytes wait for early.finish().
        early = pipeline.early_upload(request, token or "", self.settings, uploading)
        # The job's answer is written inside the block, before the spool file is removed (removing
        # 40 MB takes ~1.5 ms that a waiting request need not wait for).
        with pipeline.prepared(request, self.settings, answer, early=early, engine=self.store.engine) as (spool, info):
            if request.dry_run:
                answer["message"] = pipeline.dry_run_message(request, info)
                self._finish(job, 200, answer, status="validated")
                return
            try:
                if early is not None and early.started:
                    result = early.finish()
                else:
                    uploading()
                    result = pipeline.upload(spool, info, request, token or "", self.settings)
            except UpstreamError as err:
                self._after_failed_upload(job, err, answer, attempt)
                return
            answer.update(
                cloned_voice_item_id=result.cloned_voice_item_id,
                item_id=result.item_id,
                upstream_status=result.upstream_status,
            )
            self._accepted(job, answer, result.status, result.cloned_voice_item_id, result.item_id)

    def _after_failed_upload(self, job: Job, err: UpstreamError, answer: dict, attempts: int) -> None:
        status = err.fields.get("upstream_status")
        if err.reached and status is None:
            # No answer: the body may have arrived. Wait out useapi's hold, then look before re-uploading.
            log.warning("upload answer lost", extra={"fields": {"job_id": job.id, "error": err.error_code}})
            grace = timedelta(seconds=self.settings.reconcile_grace_seconds)
            self._save(job, release=True, answer=answer, next_run_at=utcnow() + grace)
            return
        retryable = not err.reached or status == 429 or (status or 0) >= 500
        if retryable and attempts < self.settings.max_attempts:
            # useapi never got it, or answered with a refusal: it did not take the voice, so trying
            # again later cannot make a duplicate.
            delay = self._backoff(attempts, err.retry_after)
            if status == 429:  # the whole account waits, other accounts go on
                self.store.back_off(job.account_key, delay)
            note = (
                f"useapi.net answered HTTP {status}; retrying." if status else "useapi.net was unreachable; retrying."
            )
            if note not in answer.get("warnings", []):
                answer["warnings"] = [*answer.get("warnings", []), note]
            self._save(
                job, release=True, phase=RECEIVED, answer=answer, next_run_at=utcnow() + timedelta(seconds=delay)
            )
            return
        raise err

    def _reconcile(self, job: Job, request: pipeline.CloneRequest, token: str | None, answer: dict) -> None:
        started = job.upload_started_at or job.created_at
        settle = started + timedelta(seconds=self.settings.reconcile_grace_seconds)
        if utcnow() < settle:
            self._save(job, release=True, next_run_at=settle)
            return
        try:
            with Useapi(self.settings, token or "") as client:
                found, _complete = voices.list_all(client, request.user_id, self.settings.max_list_pages)
        except (UpstreamUnauthorized, UpstreamPaymentRequired):
            raise
        except UpstreamError as err:
            self._later(job, err)
            return
        since = (started - _CLOCK_SKEW).isoformat(timespec="seconds") + "Z"
        wanted = request.name.strip().casefold()
        candidates = [
            voice
            for voice in found
            if voice["created_at"]
            and voice["created_at"] >= since
            and voice["status"] != "failed"
            and (not voice["name"] or voice["name"].strip().casefold() == wanted)
            and not self.store.voice_taken(voice["cloned_voice_item_id"], job.id)
        ]
        if candidates:
            voice = max(candidates, key=lambda v: v["created_at"])
            log.info("adopted voice after lost answer", extra={"fields": {"job_id": job.id}})
            answer.update(cloned_voice_item_id=voice["cloned_voice_item_id"], item_id=voice["item_id"])
            answer["warnings"] = [
                *answer.get("warnings", []),
                "The upload's answer was lost; the voice it created was found and adopted.",
            ]
            self._accepted(job, answer, voice["status"], voice["cloned_voice_item_id"], voice["item_id"])
            return
        if job.upload_attempts < self.settings.max_attempts:
            self._save(job, release=True, phase=RECEIVED, next_run_at=utcnow())
            return
        raise UpstreamTimeout(
            f"useapi.net never answered the upload after {job.upload_attempts} attempts, and no new voice "
            "appeared on the account. Try again later."
        )

    def _accepted(self, job: Job, answer: dict, status: str, voice_id: str | None, item_id: str | None) -> None:
        if status == "ready":
            self._finish(job, 200, answer, status="ready", cloned_voice_item_id=voice_id, item_id=item_id)
            return
        answer["message"] = pipeline.PROCESSING_MESSAGE
        self._save(
            job,
            release=True,
            phase=UPLOADED,
            answer=answer,
            accepted_at=utcnow(),
            cloned_voice_item_id=voice_id,
            item_id=item_id,
            next_run_at=utcnow() + timedelta(seconds=self.settings.poll_interval_seconds),
        )

    def _poll(self, job: Job, token: str | None, answer: dict) -> None:
        voice_id = job.cloned_voice_item_id or ""
        accepted = job.accepted_at or job.created_at
        if utcnow() > accepted + timedelta(seconds=self.settings.ready_timeout_seconds):
            raise ReadyTimeout(
                f"The voice was not ready {self.settings.ready_timeout_seconds:g} s after useapi.net accepted it. "
                "It may still finish: check it with GET /v1/voices/<cloned_voice_item_id>.",
                cloned_voice_item_id=voice_id,
                item_id=job.item_id,
            )
        try:
            with Useapi(self.settings, token or "") as client:
                record = client.get_voice(voice_id)
                if record is None:
                    listed, _ = voices.list_all(client, job.request.get("user_id"), self.settings.max_list_pages)
                    record = next(
                        (
                            {"status": v["upstream_status_code"]}
                            for v in listed
                            if v["cloned_voice_item_id"] == voice_id
                        ),
                        None,
                    )
        except (UpstreamUnauthorized, UpstreamPaymentRequired):
            raise
        except UpstreamError as err:
            self._later(job, err, bounded=False)
            return
        state = voices.status_name(record.get("status")) if record else "processing"
        if state == "ready":
            self._finish(job, 200, answer, status="ready")
        elif state == "failed":
            raise CloneFailed(cloned_voice_item_id=voice_id, item_id=job.item_id)
        else:
            delay = min(self.settings.poll_interval_seconds * (1.5 ** min(job.attempts, 10)), _MAX_POLL)
            self._save(job, release=True, next_run_at=utcnow() + timedelta(seconds=delay))

    # --- endings --------------------------------------------------------------------------

    def _finish(self, job: Job, http_status: int, answer: dict, status: str, **ids: Any) -> None:
        answer = {**answer, **{k: v for k, v in ids.items() if v is not None}}
        answer.update(ok=True, status=status, error_code=None, error_message=None)
        if status == "ready" and not answer.get("reused"):
            answer["message"] = pipeline.READY_MESSAGE
        self._end(job, READY, http_status, answer)

    def _fail(self, job: Job, err: RelayError, answer: dict) -> None:
        http_status, answer = answers.failure(err, answer)
        log.info("job failed", extra={"fields": {"job_id": job.id, "error_code": err.error_code}})
        self._end(job, FAILED, http_status, answer)

    def _end(self, job: Job, phase: str, http_status: int, answer: dict) -> None:
        now = utcnow()
        self._save(
            job,
            release=True,
            phase=phase,
            answer=answer,
            http_status=http_status,
            completed_at=now,
            token_sealed=None,
            cloned_voice_item_id=answer.get("cloned_voice_item_id"),
            item_id=answer.get("item_id"),
            callback_status=PENDING if job.callback_url else None,
            callback_next_at=now if job.callback_url else None,
            next_run_at=now if job.callback_url else None,  # nothing left to do: off the due index
        )
        self.vault.forget(job.id)
        log.info("job finished", extra={"fields": {"job_id": job.id, "phase": phase, "status": http_status}})

    def _deliver_callback(self, job: Job) -> None:
        body = json.dumps(answers.for_job(job, utcnow()), separators=(",", ":")).encode("utf-8")
        delivery = callbacks.deliver(job.callback_url or "", body, job.webhook_id or job.id, self.settings)
        attempts = job.callback_attempts + 1
        fields = {"job_id": job.id, "attempt": attempts, "result": delivery.detail}
        if delivery.delivered:
            log.info("callback delivered", extra={"fields": fields})
            self._save(
                job,
                release=True,
                callback_status=DELIVERED,
                callback_attempts=attempts,
                callback_last_error=None,
                next_run_at=None,
            )
            return
        delay = None if delivery.gone else callbacks.next_delay(self.settings.callback_schedule, attempts)
        if delay is None:
            log.warning("callback given up", extra={"fields": fields})
            self._save(
                job,
                release=True,
                callback_status=GIVEN_UP,
                callback_attempts=attempts,
                callback_last_error=delivery.detail,
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

    def _retry_later(self, job: Job) -> None:
        """After an unexpected crash in a step: try again later, and give up after many tries."""
        try:
            if job.attempts >= self.settings.max_attempts * 3:
                self._fail(job, RelayError(), dict(job.answer or {}))
            else:
                delay = self._backoff(job.attempts)
                self.store.release(job.id, self.id, next_run_at=utcnow() + timedelta(seconds=delay))
        except Exception:  # the database itself may be what failed; the lease will expire
            log.exception("could not reschedule job", extra={"fields": {"job_id": job.id}})

    def _later(self, job: Job, err: UpstreamError, bounded: bool = True) -> None:
        """A look-up failed (useapi busy or down): try again later, but not forever (readiness
        polling is bounded by RELAY_READY_TIMEOUT_SECONDS instead of a count)."""
        if bounded and job.attempts >= self.settings.max_attempts * 3:
            raise err
        delay = self._backoff(job.attempts, err.retry_after)
        if err.fields.get("upstream_status") == 429:
            self.store.back_off(job.account_key, delay)
        self._save(job, release=True, next_run_at=utcnow() + timedelta(seconds=delay))

    def _backoff(self, attempts: int, retry_after: int | None = None) -> float:
        delay = min(self.settings.retry_base_seconds * (2 ** max(attempts - 1, 0)), _MAX_BACKOFF)
        return max(delay, float(retry_after or 0))

    def _save(self, job: Job, release: bool = False, **values: Any) -> None:
        write = self.store.release if release else self.store.update
        if not write(job.id, self.id, **values):
            raise LeaseLost(job.id)
        if values.get("phase") in (UPLOADED, READY, FAILED) and job.request.get("upload_id"):
            uploads.delete_upload(self.store.engine, job.request["upload_id"])  # useapi has it, or it is over
        for key, value in values.items():
            if hasattr(job, key):
                setattr(job, key, value)
        if release:  # the step is over: wake requests waiting on this job (once, not per write)
            self.notifier.job_changed()


class _Renewal:
    """Renews a lease every third of its length while a step runs."""

    def __init__(self, store: JobStore, job_id: str, owner: str, seconds: float):
        self.store, self.job_id, self.owner, self.seconds = store, job_id, owner, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{job_id[:8]}")

    def __enter__(self) -> _Renewal:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.store.renew(self.job_id, self.owner, self.seconds):
                    return
            except Exception:
                log.exception("lease renewal failed", extra={"fields": {"job_id": self.job_id}})


class Pool:
    """N worker threads in this process, plus a heartbeat and periodic clean-up."""

    def __init__(self, store: JobStore, settings: Settings, vault: TokenVault, notifier: Notifier, threads: int):
        self.store, self.settings, self.notifier = store, settings, notifier
        self.id = new_worker_id()
        self.workers = [Worker(store, settings, vault, notifier, f"{self.id}-{n}") for n in range(threads)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Pool:
        for worker in self.workers:
            thread = threading.Thread(target=self._loop, args=(worker,), daemon=True, name=f"relay-{worker.id}")
            thread.start()
            self._threads.append(thread)
        beat = threading.Thread(target=self._housekeeping, daemon=True, name="relay-heartbeat")
        beat.start()
        self._threads.append(beat)
        return self

    def stop(self, timeout: float = 25.0) -> bool:
        """Stop claiming; let running steps end within ``timeout``. True when all threads ended."""
        self._stop.set()
        self.notifier.work_arrived(everyone=True)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(thread.is_alive() for thread in self._threads)

    def _loop(self, worker: Worker) -> None:
        while not self._stop.is_set():
            try:
                busy = worker.run_once()
            except Exception:  # a database hiccup: back off, never die
                log.exception("worker loop error", extra={"fields": {"worker": worker.id}})
                busy = False
            if not busy and not self._stop.is_set():
                self.notifier.wait_for_work(self.settings.idle_poll_seconds)

    def _housekeeping(self) -> None:
        last_purge = 0.0
        while not self._stop.is_set():
            try:
                self.store.heartbeat(self.id)
                if time.monotonic() - last_purge > 3600:
                    self.store.purge(utcnow() - timedelta(hours=self.settings.job_retention_hours))
                    # Spool files of a process killed mid-job (SIGKILL leaves no chance to clean up).
                    fetch.sweep_stale_spools(self.settings.download_timeout + self.settings.upload_timeout + 600)
                    uploads.sweep(self.store.engine, utcnow() - timedelta(minutes=10))
                    last_purge = time.monotonic()
            except Exception:
                log.exception("heartbeat failed")
            self._stop.wait(5)
