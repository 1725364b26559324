"""Child processes in tests: wait until one answers (patiently: the machine may be busy), and always reap it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

# A loaded machine (CI shared with other jobs, two test runs at once) can take a good while to start
# gunicorn; nothing here is a timing assertion, only how long to wait before giving up.
READY_TIMEOUT = 120.0


def wait_until_answering(
    url: str,
    process: subprocess.Popen,
    log: Path | None = None,
    ready: Callable[[requests.Response], bool] = lambda response: True,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Poll ``url`` until ``ready(response)``; fail (after reaping ``process``) if it exits or never gets there.

    Any request error (refused, reset, read timeout while the process starts) counts as not ready yet."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"the process exited with {process.returncode} before answering:\n{_tail(log)}")
        try:
            if ready(requests.get(url, timeout=5)):
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"no answer from {url} in {timeout:g} s:\n{_tail(log)}")
        time.sleep(0.1)


def stop(process: subprocess.Popen, timeout: float = 30.0, group: bool = False) -> int:
    """SIGTERM ``process`` (its whole process group with ``group``), wait, SIGKILL if it lingers; reap it."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, None)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig) if group else process.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def _tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
