"""The scheduler: claims queued jobs from the store and runs them on the engine, politely.

Politeness and limits: a global cap on transfers, a per-host cap, a per-client cap (the
client's in-flight quota), and a minimum interval between request starts to one host.
Priorities and FIFO order come from the store's claim. Failed attempts are retried with
exponential backoff and jitter (honouring ``Retry-After`` up to a cap), within the job's
deadline. Every state change goes back to the store, which batches the writes.

A response's body is committed by the body store (off the reactor thread) before its job
is saved as succeeded, and the job keeps its slot until then: the store never has more
than ``max_concurrency`` jobs running. Claims that must rank the queue per host or per
client are grouped (``claim_min_free``, ``claim_delay``); when no cap can bind, the
plain claim is used.

One module, past 600 lines, on purpose: it is one state machine (claim, admit, wait for
the host, run, settle, commit the body, save, self-check), and every step reads and
changes the same per-host and per-job state; split up, a job's life would be spread over
files that each need the others' invariants.
"""

from __future__ import annotations

import email.utils
import random
import re
from collections import deque
from collections.abc import Callable
from datetime import UTC
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .bodies import BodyConsumer, BodyStore, BodyWriter, is_disk_full
from .egress import EgressPolicy
from .engine import (
    BodyTooLargeError,
    ClientClosedError,
    ConnectError,
    CurlClient,
    CurlError,
    CurlTimeoutError,
    EgressDeniedError,
    Response,
)
from .jobs import BodyInfo, Job, JobError, JobResult, JobState
from .politeness import COOLDOWN_STATUSES, HostBook, PolitenessConfig
from .robots import ALLOW, DISALLOW, Robots, RobotsCache
from .store import Cooldown, JobStore, StoreClosedError
from .warc import ResponseMeta, http_head

log = Logger()

RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_CURL_CODES = ConnectError.codes | CurlTimeoutError.codes

_DEADLINE_SLACK = 0.05
"""A curl timeout this close to the job's deadline is the deadline cutting it short."""
_DELAY_SECONDS = re.compile(r"[0-9]+")


class SchedulerReactor(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def seconds(self) -> float: ...


@attrs.frozen
class SchedulerConfig:
    max_concurrency: int = 256
    max_per_host: int = 8
    max_per_client: int = 0
    """Jobs of one client claimed and not yet settled (running, or waiting for their
    host); 0: no limit."""
    per_host_interval: float = 0.0
    claim_batch: int = 500
    poll_interval: float = 0.5
    claim_delay: float = 0.015
    """With a per-host or per-client cap that can bind, a claim ranks every queued job
    (window functions: tens of ms with a deep queue), so it is not issued for each freed
    slot: it waits until ``claim_min_free`` slots are free or this many seconds have
    passed since a claim was first held back, whichever comes first."""
    claim_min_free: int | None = None
    """None: ``max(8, max_concurrency // 8)`` (at most ``max_concurrency`` and
    ``claim_batch``)."""
    max_retry_after: float = 300.0
    max_backoff: float = 300.0
    egress: EgressPolicy | None = None
    """Checked on every connection and redirect of every job (a refusal fails the job
    with ``egress_denied``, never retried); None: no checks, as for a library user."""
    max_response_header_bytes: int | None = None
    """Response headers of one attempt, redirects included; None: libcurl's own cap."""
    ca_bundle: str | None = None
    """CA certificates that jobs' HTTPS targets are verified against; None: the
    system's (libcurl's default)."""
    user_agent: str | None = None
    """The User-Agent a job sends unless its headers give one; None: none."""
    max_crawl_delay: float = 30.0
    """A robots.txt ``Crawl-delay`` longer than the per-host interval becomes the
    host's interval for jobs that obey it, up to this."""
    politeness: PolitenessConfig = attrs.field(factory=PolitenessConfig)
    cooldown_watch_interval: float = 1.0
    """Seconds between looks at the store's host pauses (set by other instances) while
    jobs wait here for a host."""
    orphan_check_interval: float = 5.0
    """Seconds between self-checks (``requeue_orphans``): jobs the store holds as running
    for this scheduler that it is not running go back to the queue."""


class SchedulerObserver(Protocol):
    """Told about every finished attempt (metrics)."""

    def attempt_finished(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None: ...


@attrs.define
class _Host:
    active: int = 0
    waiting: deque[Job] = attrs.field(factory=deque)
    next_start: float = 0.0
    timer: IDelayedCall | None = None
    starting: bool = False  # _run_host is on the stack (a fetch may fail synchronously)
    robots_wait: bool = False  # the head job waits for its origin's robots.txt
    crawl_delay: float = 0.0  # robots.txt's, for jobs that obey it

    def idle(self, now: float) -> bool:
        """Nothing to remember: no transfer, no waiting job, no interval still running."""
        return (
            not self.active
            and not self.waiting
            and not self.starting
            and not self.robots_wait
            and (self.timer is None or not self.timer.active())
            and self.next_start <= now
        )


@attrs.define
class _Running:
    job: Job
    host: _Host
    deferred: Deferred[Response]
    writer: BodyWriter
    started: float
    outcome: str | None = None  # "cancelled" or "drained" when we cut it short


class Scheduler(Service):
    """Runs jobs from ``store`` on ``client``; a Twisted service for start/drain."""

    def __init__(
        self,
        reactor: SchedulerReactor,
        *,
        store: JobStore,
        client: CurlClient,
        bodies: BodyStore,
        config: SchedulerConfig,
        observer: SchedulerObserver | None = None,
        rng: random.Random | None = None,
        robots: RobotsCache | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._client = client
        self._bodies = bodies
        self.config = config
        self._observer = observer
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.robots = robots
        """None: every job's ``robots`` is taken as ``ignore`` (a library user)."""
        self.host_book = HostBook(config.politeness)
        self._hosts: dict[str, _Host] = {}
        self._clients: dict[str, int] = {}  # claimed, unsettled jobs per client
        self._running: dict[str, _Running] = {}
        self._waiting = 0
        self._claiming = False
        self._rewake = False  # wake() came while a claim was in flight
        self._wakeup: IDelayedCall | None = None
        self._held_since: float | None = None  # a ranked claim held back for more slots
        self._committing = 0  # bodies being made durable; their jobs are saved after
        self._saves: list[Job] = []  # saved together next turn (one store operation)
        self._observed: list[tuple[Job, float, Response | None, JobError | None]] = []
        self._save_call: IDelayedCall | None = None
        self._retry_timer: IDelayedCall | None = None  # the earliest retry coming due
        self._draining = False
        self._idle_waiters: list[Deferred[None]] = []
        self._owned: set[str] = set()
        """Claimed jobs whose last state change the store has not yet committed: the
        ones the store may rightly hold as ``running`` for us (see ``_check_orphans``)."""
        self._orphan_call: IDelayedCall | None = None
        self._cooldown_call: IDelayedCall | None = None
        self.orphans_requeued = 0

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.wake()
        self._orphan_call = self._reactor.callLater(
            self.config.orphan_check_interval, self._check_orphans
        )
        self._next_cooldown_watch()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.drain(0.0)

    # -- public ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def draining(self) -> bool:
        return self._draining

    def in_flight_for(self, client: str) -> int:
        """The client's claimed jobs not yet settled (what its in-flight quota counts)."""
        return self._clients.get(client, 0)

    def _hold(self, job: Job) -> None:
        self._clients[job.client] = self._clients.get(job.client, 0) + 1

    def _release(self, job: Job) -> None:
        left = self._clients.get(job.client, 0) - 1
        if left > 0:
            self._clients[job.client] = left
        else:
            self._clients.pop(job.client, None)

    def wake(self) -> None:
        """Look for runnable jobs soon (new submissions call this)."""
        if self._claiming:
            # The claim in flight may have missed the new jobs: claim again when it returns.
            self._rewake = True
            return
        self._wake_in(0)

    def _wake_in(self, delay: float) -> None:
        """Claim in ``delay`` seconds, unless a claim is already due by then."""
        if self._draining:
            return
        wakeup = self._wakeup
        if wakeup is not None and wakeup.active():
            if wakeup.getTime() <= self._reactor.seconds() + delay:
                return
            wakeup.cancel()
        self._wakeup = self._reactor.callLater(delay, self._pump)

    def _retry_at(self, when: float) -> None:
        """Claim when a retry comes due (sooner than the next poll, usually)."""
        if self._draining:
            return
        timer = self._retry_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._retry_timer = self._reactor.callLater(
            max(0.0, when - self._reactor.seconds()), self.wake
        )

    def abort(self, job_id: str) -> bool:
        """Stop a job the store has just marked cancelled; True if it was ours."""
        running = self._running.get(job_id)
        if running is not None:
            running.outcome = "cancelled"
            running.deferred.cancel()
            return True
        for name, host in list(self._hosts.items()):
            for job in host.waiting:
                if job.id == job_id:
                    host.waiting.remove(job)
                    self._waiting -= 1
                    self._release(job)
                    self._owned.discard(job_id)
                    self._forget_if_idle(name, host)
                    self.wake()  # its slot is free
                    return True
        return False

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop claiming; give running transfers ``timeout`` seconds, then put the rest
        back to ``queued``. Fires when every state change has been handed to the store."""
        self._draining = True
        for call in (self._wakeup, self._retry_timer, self._orphan_call, self._cooldown_call):
            if call is not None and call.active():
                call.cancel()
        for name, host in list(self._hosts.items()):
            if host.timer is not None and host.timer.active():
                host.timer.cancel()
            host.timer = None
            for job in host.waiting:
                self._save(self._requeued(job, None))
                self._release(job)
            host.waiting.clear()
            if not host.active:
                del self._hosts[name]
        self._waiting = 0
        if not self._running and not self._claiming and not self._committing:
            self._flush_saves()
            self._last_orphan_check()
            return succeed(None)
        # A claim in flight is waited for: _admit puts its jobs back (they count as
        # handed over only then). So are body commits: their jobs are saved after.
        done: Deferred[None] = Deferred()
        self._idle_waiters.append(done)
        timer = self._reactor.callLater(timeout, self.cut_short)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done

    # -- claiming --------------------------------------------------------------------------

    def cut_short(self) -> None:
        """Draining: stop every running transfer now and put its job back to ``queued``
        (the drain's timeout; also a second SIGTERM)."""
        for running in list(self._running.values()):
            running.outcome = "drained"
            running.deferred.cancel()

    def _pump(self) -> None:
        self._wakeup = None
        if self._draining or self._client.closed:
            return
        if self._claiming:
            self._rewake = True
            return
        now = self._reactor.seconds()
        for name, host in list(self._hosts.items()):
            self._forget_if_idle(name, host, now)
        # A job holds its slot until its outcome is handed to the store (its body commit
        # included): the store never has more than max_concurrency jobs running, which
        # bounds what a crash makes run twice.
        free = self.config.max_concurrency - len(self._running) - self._waiting - self._committing
        if free <= 0:
            return  # every settled job wakes us
        limit = min(free, self.config.claim_batch)
        cap = self.config.max_per_host
        room = {
            name: max(0, cap - host.active - len(host.waiting))
            for name, host in self._hosts.items()
            if host.active or host.waiting
        }
        per_client: int | None = None
        client_room: dict[str, int] | None = None
        if self.config.max_per_client > 0:
            per_client = self.config.max_per_client
            client_room = {c: max(0, per_client - n) for c, n in self._clients.items()}
        # A cap binds only if some host or client could get fewer than ``limit`` jobs;
        # otherwise the plain claim (an index walk) returns exactly the same jobs.
        binds = cap < limit or any(r < limit for r in room.values())
        if per_client is not None and client_room is not None:
            binds = binds or per_client < limit or any(r < limit for r in client_room.values())
        if binds and free < self._claim_min_free():
            since = self._held_since
            if since is None:
                since = self._held_since = now
            if now < since + self.config.claim_delay:
                self._wake_in(since + self.config.claim_delay - now)
                return
        self._held_since = None
        self._flush_saves()  # the saves that freed these slots go first
        self._claiming = True
        self._rewake = False
        if binds:
            d = self._store.claim(
                limit,
                now,
                (),
                per_host=cap,
                host_room=room,
                per_client=per_client,
                client_room=client_room,
            )
        else:
            d = self._store.claim(limit, now, ())
        d.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(limit,))
        d.addErrback(lambda f: log.failure("admitting claimed jobs failed", f))

    def _claim_min_free(self) -> int:
        config = self.config
        if config.claim_min_free is not None:
            return config.claim_min_free
        ceiling = min(config.max_concurrency, config.claim_batch)
        return max(1, min(ceiling, max(8, config.max_concurrency // 8)))

    def _claimed(self, jobs: list[Job], limit: int) -> None:
        self._claiming = False
        self._owned.update(job.id for job in jobs)
        for job in jobs:
            try:
                self._admit(job)
            except Exception:
                log.failure("admitting job {job_id} failed", job_id=job.id)
        if self._draining:
            self._check_idle()
            return
        if self._rewake or len(jobs) >= limit:
            self._rewake = False
            self.wake()
        else:
            # Retries come due and other instances add work: look again soon.
            self._wake_in(self.config.poll_interval)

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        log.failure("claiming jobs failed", failure)
        if self._draining:
            self._check_idle()
        else:
            self._wake_in(self.config.poll_interval)

    def _admit(self, job: Job) -> None:
        if self._draining:
            self._save(self._requeued(job, None))
            return
        name = job.spec.host
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = _Host()
        # Claims come in priority order, but a later claim may bring a higher priority
        # than jobs already waiting for this host: it goes before them (FIFO otherwise).
        waiting = host.waiting
        priority = job.spec.priority
        if not waiting or waiting[-1].spec.priority >= priority:
            waiting.append(job)
        else:
            index = next(i for i, w in enumerate(waiting) if w.spec.priority < priority)
            waiting.insert(index, job)
        self._waiting += 1
        self._hold(job)
        self._run_host(name, host)

    def _run_host(self, name: str, host: _Host) -> None:
        if host.starting:
            # A fetch failed synchronously inside _start below: the loop goes on by itself.
            return
        if host.timer is not None and host.timer.active():
            host.timer.cancel()
        host.timer = None
        settled = False
        host.starting = True
        try:
            while host.waiting and host.active < self.config.max_per_host and not self._draining:
                now = self._reactor.seconds()
                if now < host.next_start:
                    host.timer = self._reactor.callLater(
                        host.next_start - now, self._run_host, name, host
                    )
                    break
                job = host.waiting[0]
                obeys = self.robots is not None and job.spec.robots == "obey"
                if obeys:
                    robots = self._robots_for(name, host, job.spec.origin, now)
                    if robots is None:
                        break  # _run_host again once it is loaded
                    if not self._robots_allow(job, robots, host, now):
                        host.waiting.popleft()
                        self._waiting -= 1
                        self._release(job)
                        settled = True
                        continue
                host.waiting.popleft()
                self._waiting -= 1
                # Counted before the fetch: its Deferred may fire inside _start.
                host.active += 1
                interval = self.config.per_host_interval
                if obeys:
                    interval = max(interval, host.crawl_delay)
                previous, host.next_start = host.next_start, now + interval
                if not self._start(job, host, now):
                    # Settled without a request: no slot taken, no interval spent.
                    self._release(job)
                    host.active -= 1
                    host.next_start = previous
                    settled = True
        finally:
            host.starting = False
        self._forget_if_idle(name, host)
        if settled:
            self.wake()  # a slot came free without a transfer ending

    # -- politeness ------------------------------------------------------------------------

    def _robots_for(self, name: str, host: _Host, origin: str, now: float) -> Robots | None:
        """The origin's robots.txt if known now; else it is loaded (one fetch for every
        job waiting on it) and the host's loop resumes then."""
        assert self.robots is not None
        robots = self.robots.cached(origin, now)
        if robots is not None:
            return robots
        if host.robots_wait:
            return None
        loaded: list[Robots] = []
        d = self.robots.load(origin)
        d.addCallback(loaded.append)
        if loaded:
            return loaded[0]
        host.robots_wait = True

        def resume(_: object) -> None:
            host.robots_wait = False
            if self._hosts.get(name) is host:
                self._run_host(name, host)
            else:
                self._forget_if_idle(name, host)

        d.addCallback(resume)
        d.addErrback(lambda f: log.failure("resuming host {host} failed", f, host=name))
        return None

    def _robots_allow(self, job: Job, robots: Robots, host: _Host, now: float) -> bool:
        """Whether ``job`` may be fetched; if not, it is settled here: failed
        ``robots_disallowed``, or (robots.txt unreachable) retried per its policy once
        the file may be read again, else failed ``robots_unavailable``."""
        assert self.robots is not None
        token = self.robots.token
        verdict, detail = robots.verdict(job.spec.url, token)
        if verdict == ALLOW:
            delay = robots.crawl_delay(token)
            host.crawl_delay = 0.0 if delay is None else min(delay, self.config.max_crawl_delay)
            return True
        origin = job.spec.origin
        if verdict == DISALLOW:
            error = JobError(
                "robots_disallowed", f"the robots.txt of {origin} disallows this URL: {detail}"
            )
            self._finish_attempt(job, started=now, now=now, response=None, error=error)
            return False
        error = JobError(
            "robots_unavailable",
            f"the robots.txt of {origin} cannot be read ({detail}): nothing there is "
            "fetched until it can",
        )
        if job.attempts < job.spec.retry.max_attempts:
            at_least = robots.row.expires_at - now  # not before it may be read again
            delay = retry_delay(job, None, now, self.config, self._rng, at_least=at_least)
            if delay is not None:
                self._retry_later(job, now, delay, seconds=0.0, response=None, error=error)
                return False
        self._finish_attempt(job, started=now, now=now, response=None, error=error)
        return False

    def _note_attempt(
        self, job: Job, response: Response | None, error: JobError | None, now: float
    ) -> None:
        """Tell the host book how the host answered; a pause it starts holds the host."""
        name = job.spec.host
        if response is not None:
            hinted = None
            if response.status in COOLDOWN_STATUSES:
                hinted = parse_retry_after(response.headers.get("retry-after"), now)
            cooldown = self.host_book.response(name, response.status, hinted, now)
        elif error is not None and error.name != "deadline_exceeded":
            counts = error.curl_code in RETRY_CURL_CODES
            cooldown = self.host_book.failure(name, error, now, counts)
        else:
            return
        if cooldown is not None:
            self._cool(name, cooldown)

    def _cool(self, name: str, cooldown: Cooldown) -> None:
        """Pause ``name``: its waiting jobs go back to the queue (freeing their slots),
        and the store's claims, on every instance, skip it until the pause ends."""
        log.info(
            "pausing host {host} until {until:.3f}: {reason}",
            host=name,
            until=cooldown.until,
            reason=cooldown.reason,
        )
        self._store.set_cooldown(name, cooldown.until, cooldown.reason, cooldown.set_at).addErrback(
            lambda f: log.failure("storing the pause of host {host} failed", f, host=name)
        )
        self._hold_host(name, cooldown.until)

    def _hold_host(self, name: str, until: float) -> None:
        """Start nothing for ``name`` here before ``until``; its waiting jobs go back to
        the queue untouched (their slots are free for other hosts meanwhile)."""
        host = self._hosts.get(name)
        if host is None:
            return
        host.next_start = max(host.next_start, until)
        if not host.waiting:
            return
        for job in host.waiting:
            self._save(self._requeued(job, None))
            self._release(job)
        self._waiting -= len(host.waiting)
        host.waiting.clear()
        self.wake()

    def _watch_cooldowns(self) -> None:
        """Learn the pauses other instances set for hosts that have jobs waiting here:
        the store's claims already skip those hosts, and this holds the jobs claimed
        before the pause began. Asks only while some host has waiting jobs."""
        self._cooldown_call = None
        if self._draining:
            return
        waiting = [name for name, host in self._hosts.items() if host.waiting]
        if not waiting:
            self._next_cooldown_watch()
            return
        d = self._store.cooldowns(self._reactor.seconds(), waiting)
        d.addCallbacks(self._cooldowns_seen, self._cooldown_watch_failed)

    def _cooldowns_seen(self, cooldowns: dict[str, Cooldown]) -> None:
        for name, cooldown in cooldowns.items():
            if self.host_book.learn(name, cooldown):
                log.info(
                    "host {host} is paused until {until:.3f} (by another instance): {reason}",
                    host=name,
                    until=cooldown.until,
                    reason=cooldown.reason,
                )
            self._hold_host(name, cooldown.until)
        self._next_cooldown_watch()

    def _cooldown_watch_failed(self, failure: Failure) -> None:
        if not failure.check(StoreClosedError):
            log.failure("reading the hosts' pauses failed", failure)
        self._next_cooldown_watch()

    def _next_cooldown_watch(self) -> None:
        if not self._draining and self.running:
            self._cooldown_call = self._reactor.callLater(
                self.config.cooldown_watch_interval, self._watch_cooldowns
            )

    def _forget_if_idle(self, name: str, host: _Host, now: float | None = None) -> None:
        """Drop an idle host's entry (kept while its politeness interval still runs)."""
        if now is None:
            now = self._reactor.seconds()
        if host.idle(now) and self._hosts.get(name) is host:
            del self._hosts[name]

    def _check_idle(self) -> None:
        """Fire drain()'s Deferreds once no transfer runs, no claim is in flight and no
        body is being committed, after handing the last saves to the store."""
        if self._running or self._claiming or self._committing or not self._idle_waiters:
            return
        self._flush_saves()
        self._last_orphan_check()
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- running ---------------------------------------------------------------------------

    def _start(self, job: Job, host: _Host, now: float) -> bool:
        """Start the transfer; False if the job was settled without one."""
        spec = job.spec
        timeout = spec.timeout
        deadline_at = job.deadline_at
        if deadline_at is not None:
            remaining = deadline_at - now
            if remaining <= 0:
                # The claim counted an attempt that never made a request.
                unstarted = attrs.evolve(job, attempts=max(0, job.attempts - 1))
                self._finish_attempt(
                    unstarted, started=now, now=now, response=None, error=_deadline_error(job)
                )
                return False
            timeout = min(timeout, remaining)
        try:
            writer = self._bodies.open_writer(job.id)
        except Exception as e:
            log.failure("opening the body of job {job_id} failed", job_id=job.id)
            error = _body_error(e)
            self._finish_attempt(job, started=now, now=now, response=None, error=error)
            return False
        egress = self.config.egress
        try:
            d = self._client.fetch(
                spec.url,
                method=spec.method,
                headers=spec.headers + spec.conditional_headers(),
                body=spec.body,
                timeout=timeout,
                connect_timeout=min(spec.connect_timeout, timeout),
                follow_redirects=spec.follow_redirects,
                max_redirects=spec.max_redirects,
                max_body_bytes=spec.max_body_bytes,
                http_version=spec.http_version,
                sink=BodyConsumer(writer),
                max_header_bytes=self.config.max_response_header_bytes,
                ca_bundle=self.config.ca_bundle,
                user_agent=self.config.user_agent,
                connect_check=None if egress is None else egress.connect_check,
                host_check=egress.host_check if egress and egress.checks_hosts else None,
            )
        except Exception as e:
            writer.abort()
            if isinstance(e, ValueError):
                error = JobError("invalid_request", str(e))
            else:
                log.failure("starting job {job_id} failed", job_id=job.id)
                error = JobError("internal_error", f"{type(e).__name__}: {e}")
            self._finish_attempt(job, started=now, now=now, response=None, error=error)
            return False
        running = _Running(job, host, d, writer, now)
        self._running[job.id] = running
        d.addBoth(self._fetched, running)
        return True

    def _fetched(self, result: Response | Failure, running: _Running) -> None:
        job = running.job
        del self._running[job.id]
        self._release(job)
        now = self._reactor.seconds()
        try:
            self._settle(result, running, now)
        except Exception as e:
            # Never leave the job "running" in the store until the next restart.
            log.failure("settling job {job_id} failed", job_id=job.id)
            running.writer.abort()
            error = JobError("internal_error", f"{type(e).__name__}: {e}")
            self._finish_attempt(job, started=running.started, now=now, response=None, error=error)
        host = running.host
        host.active -= 1
        self._run_host(job.spec.host, host)
        self._check_idle()
        self.wake()

    def _settle(self, result: Response | Failure, running: _Running, now: float) -> None:
        job, writer = running.job, running.writer
        if isinstance(result, Failure) and result.check(CancelledError, ClientClosedError):
            writer.abort()
            if running.outcome != "cancelled":
                # Drained, or the client was closed under us (shutdown): put it back
                # untouched rather than fail it for something the target did not do.
                self._save(self._requeued(job, None))
            else:  # the store already says so: nothing to save
                self._owned.discard(job.id)
            return
        response: Response | None
        error: JobError | None
        if isinstance(result, Response):
            response, error = result, None
        else:
            response, error = self._classify_failure(result, running, now)
        self._note_attempt(job, response, error, now)
        if self._should_retry(job, response, error):
            retry_after = None if response is None else response.headers.get("retry-after")
            delay = retry_delay(job, retry_after, now, self.config, self._rng)
            if delay is not None:
                writer.abort()
                self._retry_later(
                    job, now, delay, seconds=now - running.started, response=response, error=error
                )
                return
        if response is None:
            writer.abort()
            self._finish_attempt(job, started=running.started, now=now, response=None, error=error)
            return
        if response.status == 304 and job.spec.conditional_headers():
            # Not modified: nothing is stored; the body is the earlier job's.
            writer.abort()
            earlier: Deferred[Job | None] = succeed(None)
            if job.spec.revalidate is not None:
                earlier = self._store.get(job.client, job.spec.revalidate)
            self._committing += 1
            earlier.addBoth(self._not_modified, running, response)
            earlier.addErrback(
                lambda f: log.failure("settling job {job_id} failed", f, job_id=job.id)
            )
            return
        # The job says succeeded only once its body is durable: saved when this fires.
        committed = writer.commit(
            ResponseMeta(
                target_uri=response.effective_url or job.spec.url,
                ip_address=response.primary_ip,
                date=running.started,
                head=http_head(response.header_lines),
            )
        )
        self._committing += 1
        committed.addBoth(self._committed, running, response)
        committed.addErrback(
            lambda f: log.failure("settling job {job_id} failed", f, job_id=job.id)
        )

    def _committed(self, info: BodyInfo | Failure, running: _Running, response: Response) -> None:
        self._committing -= 1
        job = running.job
        now = self._reactor.seconds()
        try:
            if isinstance(info, Failure):
                if is_disk_full(info.value):  # an operator's matter, said once per job
                    log.warn(
                        "storing the body of job {job_id} failed: {error}",
                        job_id=job.id,
                        error=info.getErrorMessage(),
                    )
                else:
                    log.failure("storing the body of job {job_id} failed", info, job_id=job.id)
                error = _body_error(info.value or RuntimeError("no reason"))
                self._finish_attempt(
                    job, started=running.started, now=now, response=None, error=error
                )
            else:
                body = attrs.evolve(info, content_type=response.headers.get("content-type"))
                self._finish_attempt(
                    job, started=running.started, now=now, response=response, body=body
                )
        finally:
            self._check_idle()
            self.wake()  # its slot is free

    def _not_modified(
        self, earlier: Job | Failure | None, running: _Running, response: Response
    ) -> None:
        self._committing -= 1
        job = running.job
        now = self._reactor.seconds()
        try:
            if isinstance(earlier, Failure):
                log.failure(
                    "reading the job revalidated by {job_id} failed", earlier, job_id=job.id
                )
                earlier = None
            self._observe(job, now - running.started, response, None)
            result = not_modified_result(response, job, earlier)
            self._save(
                attrs.evolve(
                    job, state=JobState.SUCCEEDED, finished_at=now, result=result, error=None
                )
            )
        finally:
            self._check_idle()
            self.wake()  # its slot is free

    def _classify_failure(
        self, failure: Failure, running: _Running, now: float
    ) -> tuple[Response | None, JobError | None]:
        exc = failure.value
        deadline_at = running.job.deadline_at
        if (
            isinstance(exc, CurlTimeoutError)
            and deadline_at is not None
            and now >= deadline_at - _DEADLINE_SLACK
        ):
            return None, _deadline_error(running.job)
        if isinstance(exc, EgressDeniedError):
            return None, JobError("egress_denied", exc.message)
        if isinstance(exc, BodyTooLargeError):
            return None, JobError(exc.name, exc.message, exc.code)
        if isinstance(exc, CurlError):
            return None, JobError(exc.name, exc.message, exc.code)
        if exc is not None and is_disk_full(exc):  # the body spilled to a full disk
            note = getattr(self._bodies, "note_disk_full", None)
            if note is not None:
                note(exc)
            return None, _body_error(exc)
        log.failure("job {job_id} failed unexpectedly", failure, job_id=running.job.id)
        return None, JobError("internal_error", f"{type(exc).__name__}: {exc}")

    def _should_retry(self, job: Job, response: Response | None, error: JobError | None) -> bool:
        if job.attempts >= job.spec.retry.max_attempts:
            return False
        if response is not None:
            return response.status in RETRY_STATUSES
        return error is not None and error.curl_code in RETRY_CURL_CODES

    def _retry_later(
        self,
        job: Job,
        now: float,
        delay: float,
        *,
        seconds: float,
        response: Response | None,
        error: JobError | None,
    ) -> None:
        """Count the failed attempt (``seconds`` long) and queue the job again for
        ``now + delay``, claiming when it comes due."""
        self._observe(job, seconds, response, error)
        self._save(self._requeued(job, now + delay))
        self._retry_at(now + delay)

    def _requeued(self, job: Job, not_before: float | None) -> Job:
        if not_before is None:
            # Put back untouched (drain): this attempt does not count.
            return attrs.evolve(
                job, state=JobState.QUEUED, attempts=max(0, job.attempts - 1), started_at=None
            )
        return attrs.evolve(job, state=JobState.QUEUED, not_before=not_before)

    def _finish_attempt(
        self,
        job: Job,
        *,
        started: float,
        now: float,
        response: Response | None,
        error: JobError | None = None,
        body: BodyInfo | None = None,
    ) -> None:
        self._observe(job, now - started, response, error)
        if response is not None:
            finished = attrs.evolve(
                job,
                state=JobState.SUCCEEDED,
                finished_at=now,
                result=_result(response, body),
                error=None,
            )
        else:
            finished = attrs.evolve(job, state=JobState.FAILED, finished_at=now, error=error)
        self._save(finished)

    def _save(self, job: Job) -> None:
        """Hand a state change to the store, together with others (one operation, not
        one per job): while body commits are in flight more saves are about to come, so
        they wait for the next turn; otherwise it goes at once (as a lone save did)."""
        self._saves.append(job)
        if not self._committing:
            self._flush_saves()
        elif self._save_call is None:
            self._save_call = self._reactor.callLater(0, self._flush_saves)

    def _flush_saves(self) -> None:
        call, self._save_call = self._save_call, None
        if call is not None and call.active():
            call.cancel()
        jobs, self._saves = self._saves, []
        if jobs:
            # The store runs a save again until it commits; a failure here means it gave
            # up (closing): the jobs stay running in the store, requeued by its next start
            # or by the self-check. Either way they are no longer ours to track.
            self._store.save(jobs).addBoth(self._saved, [job.id for job in jobs])
        self._tell_observer()

    def _saved(self, result: object, ids: list[str]) -> None:
        self._owned.difference_update(ids)
        if isinstance(result, Failure):
            log.failure("saving {count} jobs failed", result, count=len(ids))

    def _check_orphans(self) -> None:
        """The self-check behind the store's retries: the store hands back the jobs it
        holds as running for us that we hold nowhere (a claim whose answer was lost with
        its connection, a save given up). Only while no claim is outstanding, so that
        every job the store marked for us is either known here or an orphan."""
        self._orphan_call = None
        if self._draining:
            return
        if self._claiming:
            self._orphan_call = self._reactor.callLater(0.1, self._check_orphans)
            return
        d = self._store.requeue_orphans(set(self._owned))
        d.addCallbacks(self._orphans, self._orphan_check_failed)

    def _last_orphan_check(self) -> None:
        """Drained: whatever the store still holds as running for us, beyond the saves
        just handed to it, goes back to the queue now rather than after a restart (it
        runs before the store closes: the store flushes what it was given)."""
        self._store.requeue_orphans(set(self._owned)).addCallbacks(
            self._count_orphans, self._orphan_check_failed
        )

    def _orphans(self, ids: list[str]) -> None:
        self._count_orphans(ids)
        if ids:
            self.wake()
        self._next_orphan_check()

    def _count_orphans(self, ids: list[str]) -> None:
        if ids:
            self.orphans_requeued += len(ids)
            log.warn(
                "requeued {count} jobs the store held as running without a transfer",
                count=len(ids),
            )

    def _orphan_check_failed(self, failure: Failure) -> None:
        if not failure.check(StoreClosedError):
            log.failure("the self-check of running jobs failed", failure)
        self._next_orphan_check()

    def _next_orphan_check(self) -> None:
        if not self._draining and self.running:
            self._orphan_call = self._reactor.callLater(
                self.config.orphan_check_interval, self._check_orphans
            )

    def _observe(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None:
        """Told once the attempt's save is handed to the store (``_flush_saves``): the
        API's long-polls re-read the job then, and the store orders that read after it."""
        if self._observer is not None:
            self._observed.append((job, seconds, response, error))

    def _tell_observer(self) -> None:
        observed, self._observed = self._observed, []
        if self._observer is None:
            return
        for job, seconds, response, error in observed:
            try:
                self._observer.attempt_finished(job, seconds, response, error)
            except Exception:
                log.failure("observer failed")


def _body_error(exc: BaseException) -> JobError:
    """Why a body could not be stored: ``storage_full`` when the disk (or quota) is full
    (the job fails: a full disk does not clear by itself soon, and retrying is the
    client's call), ``internal_error`` otherwise."""
    if is_disk_full(exc):
        return JobError("storage_full", f"no space left to store the body: {exc}")
    return JobError("internal_error", f"cannot store the body: {exc}")


def _deadline_error(job: Job) -> JobError:
    return JobError(
        "deadline_exceeded", f"the job's deadline of {job.spec.deadline:g}s after submission passed"
    )


def backoff_delay(attempts: int, backoff: float, max_backoff: float, rng: random.Random) -> float:
    """The pause after failed attempt number ``attempts`` (1-based): ``backoff * 2 **
    (attempts - 1)`` times a random factor in [0.5, 1.5] (jitter), at most ``max_backoff``."""
    base = backoff * 2.0 ** min(max(0, attempts - 1), 64)
    return min(base * rng.uniform(0.5, 1.5), max_backoff)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait (delay-seconds, or an HTTP-date
    compared with ``now`` in Unix seconds); None if absent or not understood."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):  # ASCII digits only: int("²") would raise
        return float(value)  # a huge value becomes inf, which the cap takes care of
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC, source unknown (RFC 5322)
            when = when.replace(tzinfo=UTC)
        stamp = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, stamp - now)


def retry_delay(
    job: Job,
    retry_after: str | None,
    now: float,
    config: SchedulerConfig,
    rng: random.Random,
    *,
    at_least: float = 0.0,
) -> float | None:
    """When to retry ``job`` after its failed attempt: the backoff, or ``Retry-After`` if
    that asks for longer (up to ``config.max_retry_after``), and no sooner than
    ``at_least``. None when the retry could not start before the job's deadline."""
    delay = max(
        backoff_delay(job.attempts, job.spec.retry.backoff, config.max_backoff, rng), at_least
    )
    hinted = parse_retry_after(retry_after, now)
    if hinted is not None:
        delay = max(delay, min(hinted, config.max_retry_after))
    deadline_at = job.deadline_at
    if deadline_at is not None and now + delay >= deadline_at:
        return None
    return delay


def not_modified_result(response: Response, job: Job, earlier: Job | None) -> JobResult:
    """A 304's result: the body (and any validator the 304 left out) of the job it
    revalidated (``earlier``, None if there was none or it is gone), or, given
    validators only, the ones sent."""
    result = _result(response, None)
    before = None if earlier is None else earlier.result
    body = None if before is None else before.body
    body_of = None
    if before is not None and body is not None and earlier is not None:
        body_of = before.body_of or earlier.id
    return attrs.evolve(
        result,
        body=body,
        body_of=body_of,
        not_modified=True,
        etag=result.etag or (before.etag if before else job.spec.if_none_match),
        last_modified=result.last_modified
        or (before.last_modified if before else job.spec.if_modified_since),
    )


def _result(response: Response, body: BodyInfo | None) -> JobResult:
    t = response.timings
    headers = response.headers
    return JobResult(
        status=response.status,
        http_version=response.http_version,
        headers=tuple(headers),
        effective_url=response.effective_url,
        primary_ip=response.primary_ip,
        redirects=tuple((r.status, r.location) for r in response.redirects),
        body=body,
        timings={
            "queue": t.queue,
            "namelookup": t.namelookup,
            "connect": t.connect,
            "tls": t.appconnect,
            "first_byte": t.starttransfer,
            "total": t.total,
        },
        etag=headers.get("etag"),
        last_modified=headers.get("last-modified"),
    )
