"""Policy: how long to wait before trying again — one rule, with caps, for every retry the relay makes.

Uploads that certainly did not reach useapi, look-ups that failed, steps that crashed and a
429's account-wide pause all wait :meth:`RetryPolicy.delay`; readiness checks wait
:meth:`RetryPolicy.poll_delay`. A ``Retry-After`` from useapi is honoured up to
``RELAY_MAX_RETRY_AFTER_SECONDS``, so no answer can park a job or an account for longer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import Settings

MAX_BACKOFF = 300.0  # the longest a retry waits by itself (Retry-After may ask for more, up to its cap)
MAX_POLL = 60.0  # the longest between two looks at a voice that is still cloning


@dataclass(frozen=True)
class RetryPolicy:
    base: float
    poll_base: float
    max_retry_after: float

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_base_seconds, settings.poll_interval_seconds, settings.max_retry_after_seconds)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds before try number ``attempts + 1``: doubling from the base, at most
        :data:`MAX_BACKOFF`, or ``Retry-After`` when longer, up to its cap."""
        backoff = min(self.base * (2 ** max(attempts - 1, 0)), MAX_BACKOFF)
        return max(backoff, self.retry_after(retry_after))

    def retry_after(self, asked: float | None) -> float:
        """``Retry-After`` as the relay honours it: never negative, never over the cap."""
        return min(max(float(asked or 0), 0.0), self.max_retry_after)

    def poll_delay(self, looks: int) -> float:
        """Seconds before the next look at something that is still under way (×1.5 each time)."""
        return min(self.poll_base * (1.5 ** min(looks, 10)), MAX_POLL)
