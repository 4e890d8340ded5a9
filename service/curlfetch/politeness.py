"""Host-level politeness: when a host says "slow down" (429 or 503 with ``Retry-After``)
or stops answering (a run of connect failures and timeouts), pause the whole host, not
only the job that heard it.

``HostBook`` decides, from each finished attempt, whether a host must cool down and for
how long; the scheduler holds the host's jobs and writes the cooldown to the store, whose
claims (on every instance) then skip the host until it ends. The failing job's own retry
still follows its backoff. No Twisted and no I/O here: timing is the caller's clock.
"""

from __future__ import annotations

from collections import deque

import attrs

from .jobs import JobError
from .store import Cooldown

COOLDOWN_STATUSES = frozenset({429, 503})


@attrs.frozen
class PolitenessConfig:
    max_cooldown: float = 300.0
    """The longest pause any answer or failure run can cause."""
    failure_threshold: int = 5
    """Consecutive connect failures or timeouts from one host that pause it; 0: never."""
    failure_cooldown: float = 30.0
    """The pause after ``failure_threshold`` failures, doubled for each further failure
    in the same run (up to ``max_cooldown``)."""


@attrs.define
class _HostRecord:
    failures: int = 0
    """Connect failures and timeouts in a row (a response of any status ends the run)."""
    errors: deque[tuple[float, str, str]] = attrs.field(factory=lambda: deque(maxlen=5))


class HostBook:
    """Per-host failure runs, recent attempt errors and the cooldowns this instance set."""

    def __init__(self, config: PolitenessConfig) -> None:
        self.config = config
        self._records: dict[str, _HostRecord] = {}
        self.cooldowns: dict[str, Cooldown] = {}
        self.started = 0  # cooldowns started here (a counter for metrics)

    def cooldown(self, host: str, now: float) -> Cooldown | None:
        """The host's pause in force at ``now``, if any (forgetting ended ones)."""
        cooldown = self.cooldowns.get(host)
        if cooldown is not None and cooldown.until <= now:
            del self.cooldowns[host]
            return None
        return cooldown

    def cooling(self, now: float) -> int:
        """Hosts this instance holds paused at ``now``."""
        return sum(1 for host in list(self.cooldowns) if self.cooldown(host, now) is not None)

    def response(
        self, host: str, status: int, retry_after: float | None, now: float
    ) -> Cooldown | None:
        """A response arrived: the run of failures ends; a 429/503 with ``Retry-After``
        pauses the host (returned when it starts or extends a pause)."""
        record = self._records.get(host)
        if record is not None:
            record.failures = 0
        if status >= 400:
            self._note(host, now, f"http_{status}", f"HTTP {status}")
        if status not in COOLDOWN_STATUSES or retry_after is None or retry_after <= 0:
            return None
        seconds = min(retry_after, self.config.max_cooldown)
        reason = f"HTTP {status} with Retry-After: {retry_after:g}s"
        return self._pause(host, now, seconds, reason)

    def failure(self, host: str, error: JobError, now: float, counts: bool) -> Cooldown | None:
        """An attempt failed without a response; ``counts``: a connect failure or a
        timeout, which lengthens the host's run (and may pause it)."""
        self._note(host, now, error.name, error.message)
        if not counts:
            return None
        record = self._records.setdefault(host, _HostRecord())
        record.failures += 1
        threshold = self.config.failure_threshold
        if threshold <= 0 or record.failures < threshold:
            return None
        doublings = min(record.failures - threshold, 30)
        seconds = min(self.config.failure_cooldown * 2.0**doublings, self.config.max_cooldown)
        reason = f"{record.failures} connect failures or timeouts in a row (last: {error.name})"
        return self._pause(host, now, seconds, reason)

    def learn(self, host: str, cooldown: Cooldown) -> bool:
        """Note a pause another instance set; True if it is news (later than known)."""
        current = self.cooldowns.get(host)
        if current is not None and current.until >= cooldown.until:
            return False
        self.cooldowns[host] = cooldown
        return True

    def recent_errors(self, host: str) -> list[tuple[float, str, str]]:
        """The host's last attempt errors here: (when, code, message), newest last."""
        record = self._records.get(host)
        return [] if record is None else list(record.errors)

    def _note(self, host: str, now: float, code: str, message: str) -> None:
        record = self._records.setdefault(host, _HostRecord())
        record.errors.append((now, code, message[:300]))
        if len(self._records) > 10_000:  # bounded: drop the oldest-inserted host
            del self._records[next(iter(self._records))]

    def _pause(self, host: str, now: float, seconds: float, reason: str) -> Cooldown | None:
        until = now + seconds
        current = self.cooldown(host, now)
        if current is not None and current.until >= until:
            return None
        cooldown = self.cooldowns[host] = Cooldown(until, reason, now)
        self.started += 1
        return cooldown
