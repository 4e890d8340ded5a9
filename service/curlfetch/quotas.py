"""Per-client quotas: queued jobs and submission rate (checked by the API, 429 when over),
and transfers in flight (enforced by the scheduler's claim, so over it jobs just wait).

The rate is a token bucket per client, refilled at ``rate`` jobs per second up to
``burst``. A submission of ``n`` jobs needs ``min(n, burst)`` tokens and then takes
``n``: the bucket may go negative, so a batch larger than the burst is accepted from a
full bucket and paid back before the next submission passes. The average rate holds
either way, and no batch size is refused forever.
"""

from __future__ import annotations

import math
from typing import Protocol

import attrs


@attrs.frozen
class ClientQuotas:
    """0 means unlimited everywhere."""

    max_queued: int = 0
    max_in_flight: int = 0
    rate: float = 0.0
    """Jobs per second."""
    burst: int = 0
    """Bucket size; 0: ``max(1, ceil(rate))``, one second's worth."""

    @property
    def bucket_size(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate)))


class Clock(Protocol):
    def seconds(self) -> float: ...


@attrs.define
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """One token bucket per client, on ``clock``."""

    def __init__(self, clock: Clock, rate: float, burst: float) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, client: str) -> _Bucket:
        now = self._clock.seconds()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        elif now > bucket.at:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def delay(self, client: str, count: int) -> float:
        """Seconds until ``count`` jobs may be submitted; 0 if now (nothing is taken)."""
        if self.rate <= 0:
            return 0.0
        missing = min(float(count), self.burst) - self._bucket(client).tokens
        return max(0.0, missing / self.rate)

    def take(self, client: str, count: int) -> None:
        """Spend ``count`` tokens (after ``delay`` said 0)."""
        if self.rate > 0:
            self._bucket(client).tokens -= count


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))
