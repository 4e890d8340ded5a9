"""Prometheus metrics for the job service, in a registry of its own (not the global one),
so two services in one process, or two tests, never share counters.

Counters and histograms are fed by the scheduler (``Metrics`` is its ``SchedulerObserver``);
gauges are read when Prometheus scrapes: transfers in flight and queue depth through
callbacks, jobs by state from ``store.counts()`` refreshed by ``render()`` just before the
text is generated. Reactor lag is sampled by a ``LoopingCall`` between ``start()`` and
``stop()``: a timer that fires late means something is blocking the reactor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .engine import Response
from .jobs import Job, JobError, JobState
from .scheduler import SchedulerObserver

if TYPE_CHECKING:
    from .politeness import HostBook
    from .robots import RobotsCache

log = Logger()

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Content-Type of ``render()``'s text."""

METRIC_NAMES = (
    "curlfetch_jobs",
    "curlfetch_jobs_submitted_total",
    "curlfetch_transfers_in_flight",
    "curlfetch_queue_depth",
    "curlfetch_fetch_duration_seconds",
    "curlfetch_downloaded_bytes_total",
    "curlfetch_attempts_total",
    "curlfetch_responses_total",
    "curlfetch_curl_errors_total",
    "curlfetch_service_errors_total",
    "curlfetch_reactor_lag_seconds",
    "curlfetch_orphans_requeued_total",
    "curlfetch_store_retries_total",
    "curlfetch_body_groups_total",
    "curlfetch_body_records_total",
    "curlfetch_body_bytes_total",
    "curlfetch_webhook_deliveries_total",
    "curlfetch_webhook_delivery_latency_seconds",
    "curlfetch_webhook_outbox_depth",
    "curlfetch_webhook_outbox_oldest_seconds",
    "curlfetch_event_streams",
    "curlfetch_event_streams_cut_total",
    "curlfetch_hosts_in_cooldown",
    "curlfetch_host_cooldowns_total",
    "curlfetch_robots_denials_total",
    "curlfetch_robots_fetches_total",
)
"""Every family ``render()`` exposes (documented in the README and the OpenAPI text)."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Store(Protocol):
    def counts(self) -> Deferred[dict[JobState, int]]: ...
    def queued(self) -> int: ...
    @property
    def retried_ops(self) -> int: ...


class _Bodies(Protocol):
    @property
    def groups(self) -> int: ...
    @property
    def records(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...


class _Scheduler(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def orphans_requeued(self) -> int: ...
    @property
    def host_book(self) -> HostBook: ...
    @property
    def robots(self) -> RobotsCache | None: ...


class _Recovery(Collector):
    """The counters of faults survived, read from the scheduler and the store: jobs the
    self-check handed back, and store operations run again after the database failed."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        scheduler, store = self._metrics._scheduler, self._metrics._store
        yield CounterMetricFamily(
            "curlfetch_orphans_requeued",
            "Jobs the store held as running for this instance without a transfer, "
            "put back to the queue by the self-check.",
            value=0 if scheduler is None else scheduler.orphans_requeued,
        )
        yield CounterMetricFamily(
            "curlfetch_store_retries",
            "Store operations (saves) run again after the database failed under them.",
            value=0 if store is None else store.retried_ops,
        )
        bodies = self._metrics._bodies
        for name, text, value in (
            ("groups", "Groups of body records synced together (one fdatasync each).", "groups"),
            ("records", "Body records (WARC response records) appended to segments.", "records"),
            (
                "bytes",
                "Bytes appended to body segments (records, compressed if gzip).",
                "bytes_written",
            ),
        ):
            yield CounterMetricFamily(
                f"curlfetch_body_{name}",
                text,
                value=0 if bodies is None else getattr(bodies, value),
            )


class _Politeness(Collector):
    """Host pauses and robots.txt fetches, read from the scheduler's host book and
    robots.txt cache."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        scheduler = self._metrics._scheduler
        book = None if scheduler is None else scheduler.host_book
        robots = None if scheduler is None else scheduler.robots
        now = self._metrics._reactor.seconds()
        yield GaugeMetricFamily(
            "curlfetch_hosts_in_cooldown",
            "Hosts this instance holds paused (429/503 with Retry-After, or failing).",
            value=0 if book is None else book.cooling(now),
        )
        yield CounterMetricFamily(
            "curlfetch_host_cooldowns",
            "Host pauses this instance started.",
            value=0 if book is None else book.started,
        )
        yield CounterMetricFamily(
            "curlfetch_robots_fetches",
            "robots.txt files fetched (not counting cache and store hits).",
            value=0 if robots is None else robots.fetches,
        )


class _JobsByState(Collector):
    """``curlfetch_jobs{state=...}`` from the counts the last ``refresh`` fetched."""

    def __init__(self) -> None:
        self.counts: dict[JobState, int] = dict.fromkeys(JobState, 0)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "curlfetch_jobs", "Jobs in the store, by state.", labels=["state"]
        )
        for state in JobState:
            family.add_metric([state.value], self.counts.get(state, 0))
        yield family


class Metrics:
    """The service's metrics; also the scheduler's observer, fanning each finished attempt
    out to ``subscribe``d observers (the API's long-poll waiters)."""

    def __init__(self, reactor: IReactorTime, *, lag_interval: float = 0.5) -> None:
        self._reactor = reactor
        self._lag_interval = lag_interval
        self._store: _Store | None = None
        self._scheduler: _Scheduler | None = None
        self._bodies: _Bodies | None = None
        self._observers: list[SchedulerObserver] = []
        self._lag_call: LoopingCall | None = None
        self._last_tick = 0.0

        self.registry = CollectorRegistry()
        r = self.registry
        self._jobs = _JobsByState()
        r.register(self._jobs)
        r.register(_Recovery(self))
        r.register(_Politeness(self))
        self.submitted = Counter(
            "curlfetch_jobs_submitted", "Jobs accepted by POST /v1/jobs.", registry=r
        )
        self.in_flight = Gauge(
            "curlfetch_transfers_in_flight", "Transfers running now.", registry=r
        )
        self.in_flight.set_function(self._in_flight)
        self.queue_depth = Gauge(
            "curlfetch_queue_depth", "Jobs waiting to run (queued).", registry=r
        )
        self.queue_depth.set_function(self._queue_depth)
        self.duration = Histogram(
            "curlfetch_fetch_duration_seconds",
            "Duration of each fetch attempt, by outcome (response or error).",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.downloaded = Counter(
            "curlfetch_downloaded_bytes", "Response body bytes downloaded.", registry=r
        )
        self.attempts = Counter(
            "curlfetch_attempts", "Finished fetch attempts, by outcome.", ["outcome"], registry=r
        )
        self.responses = Counter(
            "curlfetch_responses",
            "Responses received, by status class (2xx, 4xx, ...).",
            ["status_class"],
            registry=r,
        )
        self.curl_errors = Counter(
            "curlfetch_curl_errors",
            "Failed attempts by curl error name (OPERATION_TIMEDOUT, ...).",
            ["name"],
            registry=r,
        )
        self.service_errors = Counter(
            "curlfetch_service_errors",
            "Failed attempts by service error code (deadline_exceeded, ...).",
            ["code"],
            registry=r,
        )
        self.reactor_lag = Gauge(
            "curlfetch_reactor_lag_seconds",
            "How late the last reactor lag probe fired (blocking work on the reactor).",
            registry=r,
        )

        self.deliveries = Counter(
            "curlfetch_webhook_deliveries",
            "Webhook delivery attempts by outcome (succeeded, retried, failed: out of "
            "retries or denied).",
            ["outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "curlfetch_webhook_delivery_latency_seconds",
            "From the event to its delivery's 2xx.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.outbox_depth = Gauge(
            "curlfetch_webhook_outbox_depth",
            "Webhook deliveries pending or being sent (all instances).",
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "curlfetch_webhook_outbox_oldest_seconds",
            "Age of the oldest delivery pending or being sent (0 when none).",
            registry=r,
        )
        self.event_streams = Gauge(
            "curlfetch_event_streams", "Event streams (GET /v1/events) open now.", registry=r
        )
        self.robots_denials = Counter(
            "curlfetch_robots_denials",
            "Jobs failed robots_disallowed (their robots.txt disallows the URL).",
            registry=r,
        )
        self.event_streams_cut = Counter(
            "curlfetch_event_streams_cut",
            "Event streams cut off because the client did not read.",
            registry=r,
        )

    # -- wiring ----------------------------------------------------------------------------

    def track(self, *, store: _Store, scheduler: _Scheduler, bodies: _Bodies | None = None) -> None:
        """Read gauges from these (the API calls this; the store and scheduler are built
        after the metrics, which the scheduler observes)."""
        self._store = store
        self._scheduler = scheduler
        self._bodies = bodies

    def subscribe(self, observer: SchedulerObserver) -> None:
        """Also tell ``observer`` about every finished attempt."""
        self._observers.append(observer)

    def start(self) -> None:
        """Start sampling reactor lag."""
        if self._lag_call is not None:
            return
        call = LoopingCall(self._probe)
        call.clock = self._reactor
        self._lag_call = call
        call.start(self._lag_interval, now=False).addErrback(self._probe_failed)
        self._last_tick = call.starttime if call.starttime is not None else 0.0

    def stop(self) -> None:
        call, self._lag_call = self._lag_call, None
        if call is not None and call.running:
            call.stop()

    # -- feeding ---------------------------------------------------------------------------

    def attempt_finished(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None:
        outcome = "response" if response is not None else "error"
        self.duration.labels(outcome).observe(max(0.0, seconds))
        self.attempts.labels(outcome).inc()
        if response is not None:
            self.downloaded.inc(max(0, response.size_download))
            self.responses.labels(f"{response.status // 100}xx").inc()
        if error is not None:
            if error.curl_code is not None:
                self.curl_errors.labels(error.name).inc()
            else:
                self.service_errors.labels(error.name).inc()
                if error.name == "robots_disallowed":
                    self.robots_denials.inc()
        for observer in list(self._observers):
            try:
                observer.attempt_finished(job, seconds, response, error)
            except Exception:
                log.failure("attempt observer failed")

    def jobs_submitted(self, count: int) -> None:
        self.submitted.inc(count)

    def delivery_finished(self, outcome: str, seconds: float | None) -> None:
        self.deliveries.labels(outcome).inc()
        if seconds is not None:
            self.delivery_latency.observe(max(0.0, seconds))

    def outbox(self, depth: int, oldest_age: float) -> None:
        self.outbox_depth.set(depth)
        self.outbox_oldest.set(oldest_age)

    # -- scraping --------------------------------------------------------------------------

    def refresh(self) -> Deferred[None]:
        """Fetch the jobs-by-state counts; on failure keep the last ones (and log)."""
        if self._store is None:
            return succeed(None)

        def got(counts: dict[JobState, int]) -> None:
            self._jobs.counts = counts

        def failed(failure: Failure) -> None:
            log.failure("counting jobs for metrics failed", failure)

        return self._store.counts().addCallbacks(got, failed)

    def render(self) -> Deferred[bytes]:
        """The Prometheus text, with fresh job counts."""
        return self.refresh().addCallback(lambda _: generate_latest(self.registry))

    # -- internals -------------------------------------------------------------------------

    def _in_flight(self) -> float:
        return float(self._scheduler.in_flight) if self._scheduler is not None else 0.0

    def _queue_depth(self) -> float:
        return float(self._store.queued()) if self._store is not None else 0.0

    def _probe(self) -> None:
        call = self._lag_call
        now = self._reactor.seconds()
        if call is not None and call.starttime is not None:
            # LoopingCall runs on the interval grid from its start, skipping missed
            # points: this tick was due at the first grid point after the previous one.
            interval = self._lag_interval
            last = self._last_tick
            due = last + interval - ((last - call.starttime) % interval)
            self.reactor_lag.set(max(0.0, now - due))
        self._last_tick = now

    def _probe_failed(self, failure: Failure) -> None:
        log.failure("reactor lag probe failed", failure)
