"""``Scheduler`` end to end: a real SQLite store in ``tmp_path``, a real ``CurlClient`` and
real loopback servers, on the real reactor. Pure timing arithmetic (backoff, jitter,
``Retry-After``) is tested on its helpers; the per-host interval also on a ``Clock``."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater

from curlfetch.bodies import BodyWriter, DirectoryBodyStore
from curlfetch.engine import CurlClient, Response
from curlfetch.jobs import BodyInfo, Job, JobError, JobSpec, JobState, Limits, new_job_id
from curlfetch.politeness import PolitenessConfig
from curlfetch.scheduler import (
    Scheduler,
    SchedulerConfig,
    backoff_delay,
    parse_retry_after,
    retry_delay,
)
from curlfetch.store.sqlite import SQLiteJobStore
from curlfetch.warc import ResponseMeta
from tests.engine.conftest import curl_registrations
from tests.engine.faults import FaultServer, canned, refused_port, silent
from tests.engine.servers import LoopbackSite, pattern_bytes

from .conftest import db_path, open_store, reactor, within

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
"""Seconds any one job may take to settle before the test fails."""


async def sleep(seconds: float) -> None:
    await deferLater(reactor(), seconds, lambda: None)


async def until(predicate: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
    """Poll ``predicate`` on the reactor until it holds; fail after ``seconds``."""
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await sleep(0.01)


class Attempts:
    """A SchedulerObserver that records each finished attempt as its status or error."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int | str]] = {}

    def attempt_finished(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None:
        outcome: int | str = response.status if response is not None else str(error and error.name)
        self.seen.setdefault(job.id, []).append(outcome)


@attrs.define
class Env:
    """One test's world: store, client, body store, a loopback target, and schedulers."""

    store: SQLiteJobStore
    client: CurlClient
    bodies: DirectoryBodyStore
    site: LoopbackSite
    observer: Attempts = attrs.field(factory=Attempts)
    schedulers: list[Scheduler] = attrs.field(factory=list)
    servers: list[Any] = attrs.field(factory=list)

    def scheduler(self, sched_reactor: Any = None, **config: Any) -> Scheduler:
        config.setdefault("poll_interval", 0.05)
        sched = Scheduler(
            sched_reactor or reactor(),
            store=self.store,
            client=self.client,
            bodies=self.bodies,
            config=SchedulerConfig(**config),
            observer=self.observer,
            rng=random.Random(7),
        )
        self.schedulers.append(sched)
        return sched

    def job(
        self,
        path: str = "/",
        *,
        url: str | None = None,
        created_at: float | None = None,
        **spec: Any,
    ) -> Job:
        created = time.time() if created_at is None else created_at
        return Job(
            id=new_job_id(created),
            client="alice",
            state=JobState.QUEUED,
            spec=JobSpec.from_json({"url": url or self.site.url(path), **spec}, Limits()),
            created_at=created,
        )

    def other_site(self) -> LoopbackSite:
        site = LoopbackSite(reactor())
        self.servers.append(site)
        return site

    def fault(self, server: FaultServer) -> FaultServer:
        self.servers.append(server)
        return server

    async def add(self, *jobs: Job) -> None:
        await within(self.store.add(list(jobs)))

    async def get(self, job: Job) -> Job:
        got = await within(self.store.get(job.client, job.id))
        assert got is not None
        return got

    async def settled(self, job: Job, seconds: float = WAIT) -> Job:
        """The job once it is terminal in the store."""
        end = time.monotonic() + seconds
        while True:
            got = await self.get(job)
            if got.state.terminal:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"job still {got.state} after {seconds}s")
            await sleep(0.02)

    @property
    def log(self) -> Any:
        return self.site.root.concurrency


def temp_files(root: str) -> list[str]:
    return [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")
    ]


@pytest_twisted.async_yield_fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """A fresh world per test; afterwards every scheduler is drained and the client and
    store closed, and nothing may be left: no curl socket registered with the reactor,
    no partial body file."""
    store = await open_store(db_path(tmp_path))
    e = Env(
        store=store,
        client=CurlClient(reactor()),
        bodies=DirectoryBodyStore(reactor(), tmp_path / "bodies"),
        site=LoopbackSite(reactor()),
    )
    try:
        yield e
    finally:
        for sched in e.schedulers:
            await within(sched.drain(0.0))
        e.client.close()
        await within(e.bodies.close())
        await within(store.close())
        for server in [e.site, *e.servers]:
            await within(server.stop())
    assert not curl_registrations(reactor()), "curl sockets left registered"
    assert not e.client.driver.sockets, f"driver still tracks {e.client.driver.sockets}"
    assert not temp_files(e.bodies.root), "partial body files left behind"


def read_body(bodies: DirectoryBodyStore, job: Job) -> bytes:
    with open(bodies.path(job.id), "rb") as f:
        return f.read()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# -- limits and order ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_global_concurrency_is_capped(env: Env) -> None:
    """No more than ``max_concurrency`` transfers run at once (the target's peak), even
    when the per-host cap would allow more; every job still succeeds."""
    sched = env.scheduler(max_concurrency=3, max_per_host=10)
    jobs = [env.job(f"/concurrent?s=0.3&id={i}") for i in range(8)]
    await env.add(*jobs)
    sched.startService()
    for job in jobs:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert env.log.peak == 3
    assert sorted(env.log.starts) == sorted(str(i) for i in range(8))


@pytest_twisted.ensureDeferred
async def test_per_host_concurrency_is_capped_without_blocking_other_hosts(env: Env) -> None:
    """Each host sees at most ``max_per_host`` requests at once, and a busy host does
    not hold back another: both hosts reach the cap at the same time."""
    sched = env.scheduler(max_concurrency=10, max_per_host=2)
    other = env.other_site()
    jobs = [env.job(f"/concurrent?s=0.3&id=a{i}") for i in range(5)]
    jobs += [env.job(url=other.url(f"/concurrent?s=0.3&id=b{i}")) for i in range(5)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.active == 2 and other.root.concurrency.active == 2, "both")
    for job in jobs:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert env.log.peak == 2
    assert other.root.concurrency.peak == 2


@pytest_twisted.ensureDeferred
async def test_per_host_interval_spaces_request_starts(env: Env) -> None:
    """Requests to one host start at least ``per_host_interval`` apart (as the target
    sees them), also when each job is claimed only after the previous one finished."""
    sched = env.scheduler(max_concurrency=1, per_host_interval=0.25)
    jobs = [env.job(f"/concurrent?s=0&id={i}") for i in range(4)]
    await env.add(*jobs)
    sched.startService()
    for job in jobs:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert env.log.starts == ["0", "1", "2", "3"]
    assert all(gap >= 0.22 for gap in gaps(env.log.times)), gaps(env.log.times)


@pytest_twisted.ensureDeferred
async def test_per_host_interval_arithmetic_on_a_clock(env: Env) -> None:
    """On a ``Clock``: of three jobs claimed together for one host with a 10 s interval,
    the first starts at once, the second not before the clock has moved 10 s, the third
    10 s after that, whatever the real time."""
    clock = Clock()
    clock.advance(time.time())
    sched = env.scheduler(clock, max_concurrency=5, max_per_host=5, per_host_interval=10.0)
    jobs = [env.job(f"/concurrent?s=0&id={i}") for i in range(3)]
    await env.add(*jobs)
    sched.wake()
    clock.advance(0)  # the claim goes to the real store
    await until(lambda: env.log.starts == ["0"], "the first start")
    await env.settled(jobs[0])
    clock.advance(9.9)
    await sleep(0.2)
    assert env.log.starts == ["0"]
    clock.advance(0.1)
    await until(lambda: env.log.starts == ["0", "1"], "the second start")
    await env.settled(jobs[1])
    clock.advance(5)
    await sleep(0.2)
    assert env.log.starts == ["0", "1"]
    clock.advance(5)
    await until(lambda: env.log.starts == ["0", "1", "2"], "the third start")
    assert (await env.settled(jobs[2])).state is JobState.SUCCEEDED
    await within(sched.drain(0))


@pytest_twisted.ensureDeferred
async def test_higher_priority_first_fifo_within_a_priority(env: Env) -> None:
    """With one transfer at a time, jobs reach the target by priority, highest first,
    and in submission order within a priority."""
    sched = env.scheduler(max_concurrency=1)
    order = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1), ("f", -3)]
    jobs = [env.job(f"/concurrent?s=0&id={name}", priority=p) for name, p in order]
    await env.add(*jobs)
    sched.startService()
    for job in jobs:
        await env.settled(job)
    assert env.log.starts == ["b", "d", "e", "a", "c", "f"]


@pytest_twisted.ensureDeferred
async def test_a_later_higher_priority_job_overtakes_jobs_waiting_for_the_host(env: Env) -> None:
    """Jobs already claimed and waiting out their host's interval do not hold back a
    higher-priority job claimed after them: it starts next."""
    sched = env.scheduler(max_per_host=5, per_host_interval=0.3)
    first = env.job("/concurrent?s=0&id=first")
    low = env.job("/concurrent?s=0&id=low")
    await env.add(first, low)
    sched.startService()
    await until(lambda: env.log.starts == ["first"], "the first start")
    urgent = env.job("/concurrent?s=0&id=urgent", priority=9)
    await env.add(urgent)
    sched.wake()
    for job in (first, low, urgent):
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert env.log.starts == ["first", "urgent", "low"]


# -- retries ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fails_twice_then_succeeds_on_the_third_attempt(env: Env) -> None:
    """A target that answers 503 twice and then 200: the job succeeds with attempts == 3
    and the 200's body; the retries wait at least half the growing backoff (jitter)."""
    sched = env.scheduler()
    job = env.job("/flaky/twice?fail=2&code=503", retry={"max_attempts": 3, "backoff": 0.2})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert done.state is JobState.SUCCEEDED
    assert done.attempts == 3
    assert done.result is not None
    assert done.result.status == 200
    assert env.observer.seen[job.id] == [503, 503, 200]
    arrivals = env.site.root.flaky["/flaky/twice"]
    assert len(arrivals) == 3
    first, second = gaps(arrivals)
    assert first >= 0.2 * 0.5 - 0.01
    assert second >= 0.4 * 0.5 - 0.01
    assert read_body(env.bodies, job) == b"ok"


@pytest_twisted.ensureDeferred
async def test_retryable_statuses_are_retried_and_others_are_not(env: Env) -> None:
    """429, 502, 503 and 504 are retried (the job then succeeds on attempt 2); 500 and
    404 are final after one request: the job succeeded, with that status."""
    sched = env.scheduler()
    retry = {"max_attempts": 3, "backoff": 0.05}
    codes = [429, 502, 503, 504, 500, 404]
    jobs = {code: env.job(f"/flaky/c{code}?fail=1&code={code}", retry=retry) for code in codes}
    await env.add(*jobs.values())
    sched.startService()
    for code, job in jobs.items():
        done = await env.settled(job)
        assert done.state is JobState.SUCCEEDED, code
        assert done.result is not None
        requests = len(env.site.root.flaky[f"/flaky/c{code}"])
        if code in (500, 404):
            assert (done.attempts, done.result.status, requests) == (1, code, 1)
        else:
            assert (done.attempts, done.result.status, requests) == (2, 200, 2)


@pytest_twisted.ensureDeferred
async def test_retry_after_is_honoured(env: Env) -> None:
    """A 503 with ``Retry-After: 1`` delays the retry by at least a second, though the
    backoff alone would have retried after a few milliseconds."""
    sched = env.scheduler(max_retry_after=30.0)
    job = env.job("/flaky/ra?fail=1&code=503&retry_after=1", retry={"backoff": 0.01})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert (done.state, done.attempts) == (JobState.SUCCEEDED, 2)
    (gap,) = gaps(env.site.root.flaky["/flaky/ra"])
    assert 0.99 <= gap < 5.0


@pytest_twisted.ensureDeferred
async def test_retry_after_is_capped(env: Env) -> None:
    """A 429 asking for an hour (``Retry-After: 3600``) is retried after the scheduler's
    ``max_retry_after`` (0.3 s) instead, the host's pause being capped as well."""
    sched = env.scheduler(max_retry_after=0.3, politeness=PolitenessConfig(max_cooldown=0.3))
    job = env.job("/flaky/cap?fail=1&code=429&retry_after=3600", retry={"backoff": 0.01})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert (done.state, done.attempts) == (JobState.SUCCEEDED, 2)
    (gap,) = gaps(env.site.root.flaky["/flaky/cap"])
    assert 0.29 <= gap < 5.0


@pytest_twisted.ensureDeferred
async def test_connect_errors_are_retried_then_fail_with_curls_code(env: Env) -> None:
    """A refused connection is retried up to ``max_attempts``; then the job fails with
    curl's code and name, and no body is stored."""
    sched = env.scheduler()
    job = env.job(
        url=f"http://127.0.0.1:{refused_port()}/", retry={"max_attempts": 3, "backoff": 0.02}
    )
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert (done.state, done.attempts) == (JobState.FAILED, 3)
    assert done.error is not None
    assert (done.error.curl_code, done.error.name) == (7, "COULDNT_CONNECT")
    assert env.observer.seen[job.id] == ["COULDNT_CONNECT"] * 3
    assert done.result is None
    assert not env.bodies.exists(job.id)


@pytest_twisted.ensureDeferred
async def test_timeouts_are_retried(env: Env) -> None:
    """A target that never answers: each attempt times out (curl 28) and is retried,
    so the server sees one request per attempt; the job fails with OPERATION_TIMEDOUT."""
    sched = env.scheduler()
    server = env.fault(silent(reactor()))
    job = env.job(url=server.url, timeout=0.3, retry={"max_attempts": 2, "backoff": 0.02})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert (done.state, done.attempts) == (JobState.FAILED, 2)
    assert done.error is not None
    assert (done.error.curl_code, done.error.name) == (28, "OPERATION_TIMEDOUT")
    assert server.requests == 2


@pytest_twisted.ensureDeferred
async def test_other_curl_errors_are_not_retried(env: Env) -> None:
    """A body cut short (PARTIAL_FILE) and a body over ``max_body_bytes``
    (FILESIZE_EXCEEDED) fail at once despite attempts left, without a body stored."""
    sched = env.scheduler()
    server = env.fault(canned(reactor(), b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"))
    retry = {"max_attempts": 3, "backoff": 0.02}
    short = env.job(url=server.url, retry=retry)
    big = env.job("/bytes?n=5000", max_body_bytes=1000, retry=retry)
    await env.add(short, big)
    sched.startService()
    for job, name, code in [(short, "PARTIAL_FILE", 18), (big, "FILESIZE_EXCEEDED", 63)]:
        done = await env.settled(job)
        assert (done.state, done.attempts) == (JobState.FAILED, 1)
        assert done.error is not None
        assert (done.error.name, done.error.curl_code) == (name, code)
        assert not env.bodies.exists(job.id)
    assert server.requests == 1


@pytest_twisted.ensureDeferred
async def test_post_gets_one_attempt_by_default(env: Env) -> None:
    """POST is not idempotent: one attempt by default, so a 503 is its final answer."""
    sched = env.scheduler()
    job = env.job("/flaky/post?fail=1&code=503", method="POST", body="x")
    assert job.spec.retry.max_attempts == 1
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert (done.state, done.attempts) == (JobState.SUCCEEDED, 1)
    assert done.result is not None
    assert done.result.status == 503
    assert len(env.site.root.flaky["/flaky/post"]) == 1


# -- helpers: pure timing arithmetic ---------------------------------------------------


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    """The pause after attempt n is backoff * 2**(n-1) times a factor in [0.5, 1.5]:
    it doubles per attempt, the jitter really spreads it, and it never passes the cap
    (nor overflows for absurd attempt counts)."""
    rng = random.Random(1)
    for attempt in range(1, 7):
        base = 0.5 * 2 ** (attempt - 1)
        samples = [backoff_delay(attempt, 0.5, 1000.0, rng) for _ in range(500)]
        assert all(base * 0.5 <= s <= base * 1.5 for s in samples)
        assert max(samples) - min(samples) > base * 0.8  # spread, not a constant
    capped = [backoff_delay(12, 1.0, 300.0, rng) for _ in range(200)]
    assert max(capped) == 300.0
    assert backoff_delay(10_000, 1.0, 300.0, rng) == 300.0
    assert backoff_delay(1, 0.0, 300.0, rng) == 0.0


def test_parse_retry_after() -> None:
    """Retry-After as delay-seconds or an HTTP-date (relative to now, never negative);
    anything else, including non-ASCII digits, negatives and fractions, is ignored."""
    now = 1_445_412_470.0  # Wed, 21 Oct 2015 07:27:50 GMT
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 7 ", now) == 7.0
    assert parse_retry_after("0", now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", now) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0
    assert parse_retry_after("9" * 400, now) == float("inf")
    for junk in [None, "", "soon", "-1", "1.5", "\u00b2", "\u0663", "Wed, 21 Oct 99999 07:28:00"]:
        assert parse_retry_after(junk, now) is None, junk


def test_retry_delay_honours_retry_after_up_to_the_cap_and_the_deadline() -> None:
    """The retry waits for the longer of backoff and Retry-After, Retry-After counting
    up to ``max_retry_after``; no retry (None) if it could not start before the
    deadline."""
    config = SchedulerConfig(max_retry_after=60.0, max_backoff=300.0)
    spec = JobSpec.from_json(
        {"url": "http://h.test/", "retry": {"backoff": 2.0}, "deadline": 100}, Limits()
    )
    job = Job(new_job_id(), "alice", JobState.RUNNING, spec, created_at=1000.0, attempts=1)
    rng = random.Random(3)
    now = 1010.0
    assert 1.0 <= (retry_delay(job, None, now, config, rng) or -1) <= 3.0
    assert 1.0 <= (retry_delay(job, "1", now, config, rng) or -1) <= 3.0
    assert retry_delay(job, "30", now, config, rng) == 30.0
    assert retry_delay(job, "3600", now, config, rng) == 60.0
    assert retry_delay(job, "garbage", now, config, rng) is not None
    # 1085 + 30 is past the deadline at 1100: give up rather than retry too late.
    assert retry_delay(job, "30", 1085.0, config, rng) is None
    later = attrs.evolve(job, attempts=4)  # backoff 16 s, jittered to 8..24
    assert 8.0 <= (retry_delay(later, None, now, config, rng) or -1) <= 24.0


# -- deadlines ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deadline_covers_queue_time(env: Env) -> None:
    """A job whose deadline passes while it waits behind another fails with
    ``deadline_exceeded`` without a request, counting no attempt."""
    sched = env.scheduler(max_concurrency=1)
    blocker = env.job("/concurrent?s=0.8&id=blocker")
    late = env.job("/concurrent?s=0&id=late", deadline=0.3)
    await env.add(blocker, late)
    sched.startService()
    done = await env.settled(late)
    assert done.state is JobState.FAILED
    assert done.error is not None
    assert done.error.to_json()["code"] == "deadline_exceeded"
    assert done.attempts == 0
    assert (await env.settled(blocker)).state is JobState.SUCCEEDED
    assert env.log.starts == ["blocker"]


@pytest_twisted.ensureDeferred
async def test_deadline_cuts_a_running_transfer_short(env: Env) -> None:
    """A transfer still running at the deadline is stopped there (long before its own
    timeout) and the job fails with ``deadline_exceeded``, not retried as a timeout."""
    sched = env.scheduler()
    job = env.job("/concurrent?s=20&id=slow", deadline=0.6, timeout=30)
    await env.add(job)
    sched.startService()
    await until(lambda: env.log.active == 1, "the request")
    done = await env.settled(job)
    assert done.state is JobState.FAILED
    assert done.error is not None
    assert done.error.to_json()["code"] == "deadline_exceeded"
    assert done.attempts == 1
    assert done.finished_at is not None
    assert done.finished_at - job.created_at < 3.0
    await until(lambda: env.log.active == 0, "the server to see the connection close")


# -- results ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_response_is_success_with_body_stored(env: Env) -> None:
    """Any response is success: the body goes to the body store with its size, sha256
    and content type in the result; a 404 succeeds too, with its empty body."""
    sched = env.scheduler()
    ok = env.job("/bytes?n=100000")
    missing = env.job("/status?code=404")
    await env.add(ok, missing)
    sched.startService()
    done = await env.settled(ok)
    assert (done.state, done.attempts) == (JobState.SUCCEEDED, 1)
    assert done.result is not None
    assert done.result.body is not None
    expected = pattern_bytes(100000)
    body = done.result.body
    assert (body.size, body.sha256) == (100000, hashlib.sha256(expected).hexdigest())
    assert body.content_type == "text/html"
    assert not body.truncated
    assert done.result.status == 200
    assert read_body(env.bodies, ok) == expected
    gone = await env.settled(missing)
    assert gone.state is JobState.SUCCEEDED
    assert gone.result is not None
    assert gone.result.status == 404
    assert gone.result.body is not None
    assert gone.result.body.size == 0


class HeldWriter:
    """A body writer whose commit waits until the test lets it go (``release``)."""

    def __init__(self, writer: BodyWriter, held: list[Callable[[], None]]) -> None:
        self.writer = writer
        self.held = held

    @property
    def size(self) -> int:
        return self.writer.size

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def abort(self) -> None:
        self.writer.abort()

    def commit(self, meta: ResponseMeta | None = None) -> Deferred[BodyInfo]:
        d: Deferred[BodyInfo] = Deferred()

        def release() -> None:
            self.writer.commit(meta).chainDeferred(d)

        self.held.append(release)
        return d


@pytest_twisted.ensureDeferred
async def test_a_job_succeeds_only_once_its_body_is_committed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job stays ``running`` in the store while its body commit is in flight, and a
    drain waits for that commit and the save after it."""
    held: list[Callable[[], None]] = []
    real = env.bodies.open_writer
    monkeypatch.setattr(env.bodies, "open_writer", lambda job_id: HeldWriter(real(job_id), held))
    sched = env.scheduler()
    job = env.job("/bytes?n=10")
    await env.add(job)
    sched.startService()
    await until(lambda: bool(held), "the commit")
    await sleep(0.2)
    assert (await env.get(job)).state is JobState.RUNNING
    assert not env.bodies.exists(job.id)
    drained = sched.drain(5.0)
    await sleep(0.1)
    assert not drained.called
    held.pop()()
    await within(drained)
    done = await env.get(job)
    assert done.state is JobState.SUCCEEDED
    assert done.result is not None
    assert done.result.body is not None
    assert done.result.body.size == 10
    assert env.bodies.exists(job.id)


@pytest.mark.parametrize(
    ("error", "code"),
    [(errno.EIO, "internal_error"), (errno.ENOSPC, "storage_full"), (errno.EDQUOT, "storage_full")],
)
@pytest_twisted.ensureDeferred
async def test_a_failed_body_commit_fails_the_job(
    env: Env, monkeypatch: pytest.MonkeyPatch, error: int, code: str
) -> None:
    """A body that cannot be stored fails its job (not retried, no body): with
    ``storage_full`` when the disk or quota is full, else ``internal_error``; the
    scheduler goes on with the next job."""
    real = env.bodies.open_writer
    failing = env.job("/bytes?n=10")

    def open_writer(job_id: str) -> BodyWriter:
        writer = real(job_id)
        if job_id == failing.id:
            monkeypatch.setattr(
                writer, "commit", lambda meta=None: fail(OSError(error, os.strerror(error)))
            )
        return writer

    monkeypatch.setattr(env.bodies, "open_writer", open_writer)
    sched = env.scheduler(max_concurrency=1)
    fine = env.job("/bytes?n=20")
    await env.add(failing, fine)
    sched.startService()
    gone = await env.settled(failing)
    assert gone.state is JobState.FAILED
    assert gone.error is not None
    assert gone.error.to_json()["code"] == code
    assert os.strerror(error) in gone.error.message
    assert not env.bodies.exists(failing.id)
    assert (await env.settled(fine)).state is JobState.SUCCEEDED


# -- cancel ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_abort_stops_a_running_transfer_at_once(env: Env) -> None:
    """store.cancel then abort(), as the API does: the transfer is aborted (the server
    sees its connection close) and the job stays ``cancelled``, with no body."""
    sched = env.scheduler()
    job = env.job("/concurrent?s=20&id=x")
    await env.add(job)
    sched.startService()
    await until(lambda: env.log.active == 1, "the request")
    cancelled = await within(env.store.cancel("alice", job.id, time.time()))
    assert cancelled is not None
    assert cancelled.state is JobState.CANCELLED
    assert sched.abort(job.id)
    assert sched.in_flight == 0
    await until(lambda: env.log.active == 0, "the server to see the connection close", 2.0)
    await sleep(0.2)
    assert (await env.get(job)).state is JobState.CANCELLED
    assert env.store.skipped_saves == 0
    assert not env.bodies.exists(job.id)
    assert not sched.abort(job.id)


@pytest_twisted.ensureDeferred
async def test_abort_of_a_job_waiting_for_its_host(env: Env) -> None:
    """A claimed job waiting out its host's start interval is dropped by abort(): it
    never reaches the server and stays cancelled."""
    sched = env.scheduler(max_per_host=2, per_host_interval=1.0)
    first = env.job("/concurrent?s=0.4&id=first")
    second = env.job("/concurrent?s=0&id=second")
    await env.add(first, second)
    sched.startService()
    await until(lambda: env.log.active == 1, "the first request")
    await within(env.store.cancel("alice", second.id, time.time()))
    assert sched.abort(second.id)
    assert (await env.settled(first)).state is JobState.SUCCEEDED
    await sleep(0.2)
    assert env.log.starts == ["first"]
    assert (await env.get(second)).state is JobState.CANCELLED


@pytest_twisted.ensureDeferred
async def test_busy_host_backlog_does_not_hold_other_hosts(env: Env) -> None:
    """A deep backlog for one host is claimed only up to its per-host room, so a job for
    another host submitted after it starts at once instead of waiting behind it."""
    other = env.other_site()
    sched = env.scheduler(max_concurrency=4, max_per_host=1)
    backlog = [env.job(f"/concurrent?s=0.3&id=busy{i}") for i in range(6)]
    await env.add(*backlog)
    late = env.job(url=other.url("/bytes?n=10"))
    await env.add(late)
    sched.startService()
    done = await env.settled(late)
    assert done.state is JobState.SUCCEEDED
    assert env.log.peak == 1
    assert len(env.log.starts) <= 2  # the backlog still drains one at a time


# -- claims ----------------------------------------------------------------------------


def record_claims(monkeypatch: pytest.MonkeyPatch, env: Env) -> list[dict[str, Any]]:
    """The keyword arguments of every store.claim() from now on (``limit`` included)."""
    calls: list[dict[str, Any]] = []
    real = env.store.claim

    def claim(limit: int, now: float, skip: Any, **kw: Any) -> Deferred[list[Job]]:
        calls.append({"limit": limit, **kw})
        return real(limit, now, skip, **kw)

    monkeypatch.setattr(env.store, "claim", claim)
    return calls


@pytest_twisted.ensureDeferred
async def test_the_plain_claim_is_used_when_no_cap_can_bind(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for ``limit`` jobs on every host (and no per-client cap), the ranked
    claim could only return what the plain claim does: the plain one is issued."""
    calls = record_claims(monkeypatch, env)
    sched = env.scheduler(max_concurrency=4, max_per_host=8)
    jobs = [env.job(f"/concurrent?s=0&id={i}") for i in range(6)]
    await env.add(*jobs)
    sched.startService()
    for job in jobs:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert calls
    assert all("per_host" not in call for call in calls), calls


@pytest_twisted.ensureDeferred
async def test_ranked_claims_wait_for_enough_free_slots(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a per-host cap can bind, a slot freed by one transfer does not bring a claim
    of its own: the claim waits until ``claim_min_free`` slots are free (here all four),
    so the jobs start in waves of four."""
    calls = record_claims(monkeypatch, env)
    sites = [env.site, *(env.other_site() for _ in range(3))]
    sched = env.scheduler(max_concurrency=4, max_per_host=1, claim_min_free=4, claim_delay=30.0)
    jobs = [
        env.job(url=site.url(f"/concurrent?s={0.05 * (1 + n)}&id={wave}"))
        for wave in range(3)
        for n, site in enumerate(sites)
    ]
    await env.add(*jobs)
    sched.startService()
    for job in jobs:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    ranked = [call for call in calls if "per_host" in call]
    assert [call["limit"] for call in ranked][:3] == [4, 4, 4], calls
    for site in sites:
        assert site.root.concurrency.starts == ["0", "1", "2"]


@pytest_twisted.ensureDeferred
async def test_a_held_back_claim_goes_out_after_claim_delay(env: Env) -> None:
    """A ranked claim held back for lack of free slots is issued after ``claim_delay``
    anyway: a job for an idle host starts soon although a long transfer still runs."""
    other = env.other_site()
    sched = env.scheduler(max_concurrency=4, max_per_host=1, claim_min_free=4, claim_delay=0.2)
    long = env.job("/concurrent?s=5&id=long")
    await env.add(long)
    sched.startService()
    await until(lambda: env.log.active == 1, "the long transfer")
    quick = env.job(url=other.url("/concurrent?s=0&id=quick"))
    await env.add(quick)
    sched.wake()
    started = time.monotonic()
    assert (await env.settled(quick, 3.0)).state is JobState.SUCCEEDED
    assert time.monotonic() - started < 2.0
    assert env.log.active == 1  # the long one still runs


# -- drain -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_drain_lets_short_transfers_finish_and_stops_claiming(env: Env) -> None:
    """drain(timeout): running transfers that end within the timeout finish normally;
    claimed jobs still waiting for their host go back to ``queued`` with no attempt
    counted; nothing new is claimed afterwards."""
    sched = env.scheduler(max_concurrency=4, max_per_host=2)
    jobs = [env.job(f"/concurrent?s=0.3&id={i}") for i in range(4)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.active == 2, "two requests")
    started = time.monotonic()
    drained = sched.drain(5.0)
    assert not drained.called
    await within(drained)
    assert time.monotonic() - started < 3.0
    assert sched.in_flight == 0
    states = [await env.get(job) for job in jobs]
    running = [j for j in states if j.state is JobState.SUCCEEDED]
    requeued = [j for j in states if j.state is JobState.QUEUED]
    assert len(running) == 2
    assert len(requeued) == 2
    assert all(j.attempts == 0 and j.started_at is None for j in requeued)
    late = env.job("/concurrent?s=0&id=late")
    await env.add(late)
    sched.wake()
    await sleep(0.3)
    assert (await env.get(late)).state is JobState.QUEUED
    assert len(env.log.starts) == 2


@pytest_twisted.ensureDeferred
async def test_drain_requeues_long_transfers_at_the_timeout(env: Env) -> None:
    """Transfers still running when drain's timeout expires are aborted (the server
    sees the close) and put back to ``queued``, their attempt not counted."""
    sched = env.scheduler()
    jobs = [env.job(f"/concurrent?s=20&id={i}") for i in range(2)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.active == 2, "two requests")
    started = time.monotonic()
    await within(sched.drain(0.3))
    assert 0.25 <= time.monotonic() - started < 3.0
    for job in jobs:
        back = await env.get(job)
        assert (back.state, back.attempts, back.started_at) == (JobState.QUEUED, 0, None)
        assert not env.bodies.exists(job.id)
    await until(lambda: env.log.active == 0, "the server to see the connections close")


@pytest_twisted.ensureDeferred
async def test_cut_short_ends_a_drain_at_once_and_requeues(env: Env) -> None:
    """``cut_short()`` during a long drain (a second SIGTERM) aborts the running transfers
    at once and puts them back to ``queued``, their attempt not counted; the drain's
    Deferred fires promptly, not at its 30 s timeout."""
    sched = env.scheduler()
    jobs = [env.job(f"/concurrent?s=20&id={i}") for i in range(2)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.active == 2, "two requests")
    drained = sched.drain(30)
    started = time.monotonic()
    sched.cut_short()
    await within(drained)
    assert time.monotonic() - started < 2.0
    for job in jobs:
        back = await env.get(job)
        assert (back.state, back.attempts) == (JobState.QUEUED, 0)


@pytest_twisted.ensureDeferred
async def test_drain_waits_for_a_claim_in_flight(env: Env) -> None:
    """drain() called while a claim is in the store's hands fires only once the jobs
    it brings back are requeued: none of them starts, and a read right after drain
    sees them ``queued`` with no attempt counted."""
    sched = env.scheduler()
    jobs = [env.job(f"/concurrent?s=0&id={i}") for i in range(3)]
    await env.add(*jobs)
    sched.startService()
    for _ in range(100):
        if sched._claiming:
            break
        await sleep(0)
    assert sched._claiming, "the claim should still be in flight"
    drained: Deferred[None] = sched.drain(5.0)
    assert not drained.called
    await within(drained)
    for job in jobs:
        back = await env.get(job)
        assert (back.state, back.attempts) == (JobState.QUEUED, 0)
    await sleep(0.1)
    assert env.log.starts == []


# -- robustness ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_job_expiring_while_it_waits_for_the_interval_does_not_stall(env: Env) -> None:
    """A claimed job whose deadline passes while it waits out its host's interval fails
    with ``deadline_exceeded``, and the scheduler goes on to the next job."""
    sched = env.scheduler(max_concurrency=1, per_host_interval=0.5)
    first = env.job("/concurrent?s=0&id=first")
    expiring = env.job("/concurrent?s=0&id=expiring", deadline=0.3)
    last = env.job("/concurrent?s=0&id=last")
    await env.add(first, expiring, last)
    sched.startService()
    assert (await env.settled(last, 5.0)).state is JobState.SUCCEEDED
    gone = await env.settled(expiring)
    assert gone.error is not None
    assert gone.error.to_json()["code"] == "deadline_exceeded"
    assert env.log.starts == ["first", "last"]
    assert gaps(env.log.times)[0] >= 0.45


@pytest_twisted.ensureDeferred
async def test_closing_the_client_requeues_instead_of_failing(env: Env) -> None:
    """If the client is closed under the scheduler (reactor shutdown), the running job
    and the claimed jobs that then fail to start synchronously go back to ``queued``
    with no attempt counted, none is failed, and no more jobs are claimed."""
    sched = env.scheduler(max_per_host=1)
    jobs = [env.job(f"/concurrent?s=20&id={i}") for i in range(3)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.active == 1, "the first request")
    env.client.close()
    assert sched.in_flight == 0
    await sleep(0.2)
    for job in jobs:
        back = await env.get(job)
        assert (back.state, back.attempts) == (JobState.QUEUED, 0)
    assert env.log.starts == ["0"]
    await until(lambda: env.log.active == 0, "the server to see the connection close")


# -- the self-check ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_job_running_in_the_store_without_a_transfer_is_requeued_and_run(
    env: Env,
) -> None:
    """A job the store holds as running for this scheduler, which the scheduler never got
    (a claim whose answer was lost with its connection), is found by the self-check,
    put back to the queue (counted in ``orphans_requeued``) and then run to success; a
    job the scheduler is running is left alone."""
    slow = env.job("/delay?s=1")
    await env.add(slow)
    sched = env.scheduler(orphan_check_interval=0.1)
    sched.startService()
    await until(lambda: sched.in_flight == 1, "the slow job to start")
    lost = env.job("/bytes?n=10")
    await env.add(lost)
    claimed = await within(env.store.claim(10, time.time(), ()))
    assert [j.id for j in claimed] == [lost.id]  # marked running; nobody runs it
    await until(lambda: sched.orphans_requeued == 1, "the self-check")
    got = await env.settled(lost)
    assert got.state is JobState.SUCCEEDED
    assert got.attempts == 2  # the lost claim counted: at-least-once
    assert (await env.settled(slow)).state is JobState.SUCCEEDED
    assert sched.orphans_requeued == 1
