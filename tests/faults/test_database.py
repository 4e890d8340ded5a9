"""Fault family 1: the job store loses its database (issue 13).

PostgreSQL: the service's backends are terminated 3 times during a 5,000-job run (on the
shared test server, only this test's connections), and a cluster of our own is restarted
once. SQLite: another process holds the database locked longer than the busy timeout.

Expected each time: every accepted job ends terminal (none lost, none left ``running``);
while the store is down, clients get 503 with ``Retry-After``, never a 500; the service
recovers by itself once the fault ends. Duplicated requests at the target are counted.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from curlfetch.engine import FetchError

from ..engine.servers import LoopbackSite
from ..service.backends import PostgresSchema
from .conftest import TERMINAL, Daemon, Daemons, PgCluster, sleep, until

pytestmark = [pytest.mark.slow]


class Submitter:
    """POSTs batches with an Idempotency-Key each, retrying 503s (honouring Retry-After)
    and transport errors with the same key; tallies every status seen."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.statuses: Counter[int | str] = Counter()
        self.bad: list[str] = []  # answers that are neither 201 nor a proper 503
        self.ids: list[str] = []

    async def batch(self, specs: list[dict[str, Any]], seconds: float = 60) -> list[str]:
        key = uuid.uuid4().hex
        body = json.dumps({"jobs": specs}).encode()
        headers = [("Content-Type", "application/json"), ("Idempotency-Key", key)]
        deadline = time.monotonic() + seconds
        while True:
            assert time.monotonic() < deadline, f"batch not accepted after {seconds}s"
            try:
                reply = await self.daemon.request("POST", "/v1/jobs", body, headers, seconds=15)
            except FetchError as e:
                self.statuses[type(e).__name__] += 1
                await sleep(0.2)
                continue
            self.statuses[reply.status] += 1
            if reply.status == 201:
                ids = [v["id"] for v in reply.json()["jobs"]]
                assert len(ids) == len(specs)
                self.ids += ids
                return ids
            if reply.status == 503 and reply.headers.get("retry-after"):
                wait = min(float(reply.headers.get("retry-after")), 2.0)
                await sleep(wait)
                continue
            if reply.status == 409 and reply.headers.get("retry-after"):
                await sleep(0.5)  # the same key still being accepted
                continue
            self.bad.append(f"{reply.status} {reply.body[:200]!r}")
            await sleep(0.2)


def _terminate(schema: PostgresSchema, instance: str) -> int:
    """pg_terminate_backend for this instance's connections only (its application_name
    is ``curlfetch <instance-id>``); how many were terminated."""
    rows = schema.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name = %s",
        (f"curlfetch {instance}"[:63],),
    )
    return sum(1 for (ok,) in rows if ok)


def _pg_states(execute: Any) -> Counter[str]:
    return Counter({s: n for s, n in execute("SELECT state, count(*) FROM jobs GROUP BY 1")})


async def _settled(execute: Any, total: int, seconds: float) -> Counter[str]:
    deadline = time.monotonic() + seconds
    while True:
        states = _pg_states(execute)
        if sum(states[s] for s in TERMINAL) >= total:
            return states
        if time.monotonic() > deadline:
            stuck = execute(
                "SELECT id, state, owner, attempts FROM jobs"
                " WHERE state NOT IN ('succeeded', 'failed', 'cancelled') LIMIT 10"
            )
            raise AssertionError(
                f"not all {total} jobs terminal after {seconds}s: {dict(states)}; e.g. {stuck}"
            )
        await sleep(0.2)


def _log_count(daemon: Daemon, pattern: str) -> int:
    return len(re.findall(pattern, daemon.log()))


@pytest.mark.timeout(180)
@pytest_twisted.ensureDeferred
async def test_pg_backends_terminated_3_times_during_5000_jobs(
    daemons: Daemons, schema: PostgresSchema, target: LoopbackSite
) -> None:
    """One instance on PostgreSQL, 50 batches of 100 jobs (5,000) to a loopback target;
    its database backends are terminated 3 times while batches are accepted and jobs run.
    Every POST ends 201 (a 503 with Retry-After is allowed, retried with the same
    Idempotency-Key; never a 500); every accepted job ends terminal, succeeded, and none is
    left ``running``; the database holds exactly the accepted jobs; SIGTERM afterwards
    exits 0 promptly. Duplicate requests at the target are reported."""
    instance = f"faults-{uuid.uuid4().hex[:8]}"
    d = await daemons.start(
        f"--database={schema.url}",
        f"--instance-id={instance}",
        "--max-concurrency=100",
        "--max-per-host=100",
        "--max-queued=100000",
        "--lease=5s",
        "--drain-timeout=2",
    )
    submitter = Submitter(d)
    total, per_batch = 5000, 100
    kill_after = {12, 25, 38}  # batches after which the backends are terminated
    terminated: list[int] = []
    started = time.monotonic()
    for b in range(total // per_batch):
        specs = [
            {"url": target.url(f"/concurrent?s=0.02&id=b{b}-{i}"), "retry": {"max_attempts": 1}}
            for i in range(per_batch)
        ]
        posted = defer.Deferred.fromCoroutine(submitter.batch(specs))
        if b in kill_after:
            # While this POST, the claims and the saves of running jobs are in flight.
            await sleep(0.005)
            terminated.append(await threads.deferToThread(_terminate, schema, instance))
        await posted
    submitted_in = time.monotonic() - started
    try:
        states = await _settled(schema.execute, total, 30)
    finally:
        hits = Counter(target.root.concurrency.starts)
        duplicates = sum(n - 1 for n in hits.values() if n > 1)
        print(
            f"\npg terminate x3: {total} jobs submitted in {submitted_in:.1f}s, settled after "
            f"{time.monotonic() - started:.1f}s; backends terminated {terminated}; POST "
            f"answers {dict(submitter.statuses)}; bad answers {len(submitter.bad)} "
            f"{submitter.bad[:3]}; states {dict(_pg_states(schema.execute))}; target saw "
            f"{len(hits)} jobs, duplicates {duplicates}; log: "
            f"{_log_count(d, 'OperationalError')} OperationalError, "
            f"{_log_count(d, 'Pipeline .BAD.')} lost pipelines, "
            f"{_log_count(d, 'saving .* jobs failed')} failed saves"
        )
    assert not submitter.bad, submitter.bad
    assert len(set(submitter.ids)) == total
    assert sum(terminated) >= 3, "the faults did not hit the service's connections"
    assert states == Counter(succeeded=total), states
    in_db = {row[0] for row in schema.execute("SELECT id FROM jobs")}
    assert in_db == set(submitter.ids)
    assert set(hits) == {f"b{b}-{i}" for b in range(total // per_batch) for i in range(per_batch)}
    d.signal(signal.SIGTERM)
    assert await d.wait_exit(15) == 0


@pytest.mark.timeout(150)
@pytest_twisted.ensureDeferred
async def test_pg_restart_gives_503_then_recovers_by_itself(
    daemons: Daemons, pg_cluster: PgCluster, target: LoopbackSite
) -> None:
    """A full PostgreSQL restart (a cluster of our own, ``pg_ctl stop -m fast``, 4 s down,
    ``start``) in the middle of 1,000 jobs: while it is down /healthz stays 200, /readyz
    says 503, a POST and a GET get 503 with Retry-After (never 500); once it is back
    /readyz is 200 within 15 s with no help, every accepted job ends succeeded and none
    stays ``running``."""
    d = await daemons.start(
        f"--database={pg_cluster.url}",
        "--instance-id=faults-restart",
        "--max-concurrency=50",
        "--max-per-host=50",
        "--lease=5s",
        "--drain-timeout=2",
    )
    submitter = Submitter(d)
    total, per_batch = 1000, 100
    down: dict[str, Any] = {}
    started = time.monotonic()
    for b in range(total // per_batch):
        specs = [
            {"url": target.url(f"/concurrent?s=0.2&id=r{b}-{i}"), "retry": {"max_attempts": 1}}
            for i in range(per_batch)
        ]
        await submitter.batch(specs)
        if b == 3:
            await threads.deferToThread(pg_cluster.stop)
            stopped = time.monotonic()
            down["healthz"] = (await d.get("/healthz", seconds=3)).status
            # /readyz pings with a 5 s timeout; a refused connection answers at once.
            readyz = await d.get("/readyz", seconds=10)
            down["readyz"] = readyz.status
            post = await d.post_json("/v1/jobs", {"url": target.url("/bytes?n=1")})
            down["post"] = (post.status, post.headers.get("retry-after"), post.body[:200])
            get = await d.get(f"/v1/jobs/{submitter.ids[0]}", seconds=10)
            down["get"] = (get.status, get.headers.get("retry-after"), get.body[:200])
            await sleep(max(0.0, 4 - (time.monotonic() - stopped)))
            await threads.deferToThread(pg_cluster.start)
            back = time.monotonic()
            ready_in = None
            while time.monotonic() - back < 15:
                try:
                    if (await d.get("/readyz", seconds=6)).status == 200:
                        ready_in = time.monotonic() - back
                        break
                except FetchError:
                    pass
                await sleep(0.2)
            down["ready_in"] = ready_in
    try:
        states = await _settled(pg_cluster.execute, total, 20)
    finally:
        hits = Counter(target.root.concurrency.starts)
        print(
            f"\npg restart: {total} jobs; while down: {down}; POST answers "
            f"{dict(submitter.statuses)}; bad {submitter.bad[:3]}; states "
            f"{dict(_pg_states(pg_cluster.execute))}; duplicates "
            f"{sum(n - 1 for n in hits.values() if n > 1)}; all done after "
            f"{time.monotonic() - started:.1f}s"
        )
    assert down["healthz"] == 200
    assert down["readyz"] == 503
    for what in ("post", "get"):
        status, retry_after, _body = down[what]
        assert (status, bool(retry_after)) == (503, True), (what, down[what])
    assert down["ready_in"] is not None, "/readyz not 200 within 15s of PostgreSQL's return"
    assert not submitter.bad, submitter.bad
    assert states == Counter(succeeded=total), states


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_sqlite_locked_longer_than_busy_timeout(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Another process holds the SQLite database EXCLUSIVE for 8 s (the busy timeout is
    5 s) while 600 jobs run and more are submitted: submissions during the lock get 503
    with Retry-After (never 500); after it, every accepted job ends terminal (succeeded)
    with none left ``running``, and /readyz is 200 again without a restart."""
    d = await daemons.start("--max-concurrency=50", "--max-per-host=50", "--drain-timeout=2")
    submitter = Submitter(d)
    for b in range(3):
        await submitter.batch(
            [
                {"url": target.url(f"/concurrent?s=0.3&id=s{b}-{i}"), "retry": {"max_attempts": 1}}
                for i in range(200)
            ]
        )
    release = threading.Event()
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(d.data_dir / "jobs.sqlite3", timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(20)
            conn.execute("COMMIT")
        finally:
            conn.close()

    holder = threads.deferToThread(hold)
    await until(locked.is_set, 10, "the exclusive lock")
    during: Counter[int | str] = Counter()
    bad: list[str] = []
    lock_started = time.monotonic()
    while time.monotonic() - lock_started < 8:
        began = time.monotonic()
        reply = await d.post_json("/v1/jobs", {"url": target.url("/bytes?n=1")})
        during[reply.status] += 1
        if reply.status == 201:
            submitter.ids.append(reply.json()["id"])
        elif reply.status != 503 or not reply.headers.get("retry-after"):
            bad.append(f"{reply.status} after {time.monotonic() - began:.1f}s {reply.body[:160]!r}")
        await sleep(0.5)
    release.set()
    await holder
    released = time.monotonic()
    ready_in = None
    while time.monotonic() - released < 15:
        if (await d.get("/readyz", seconds=6)).status == 200:
            ready_in = time.monotonic() - released
            break
        await sleep(0.2)
    deadline = time.monotonic() + 20
    while True:
        listed = await d.all_jobs()
        left = Counter(j["state"] for j in listed)
        if not (left["queued"] or left["running"]) or time.monotonic() > deadline:
            break
        await sleep(0.5)
    print(
        f"\nsqlite locked 8s: POSTs during the lock {dict(during)}, bad {bad[:3]}; /readyz "
        f"200 {ready_in}s after release; states {dict(left)} of {len(submitter.ids)} accepted; "
        f"log: {_log_count(d, 'database is locked')} 'database is locked'"
    )
    assert not bad, bad
    assert ready_in is not None
    assert {j["id"] for j in listed} == set(submitter.ids)
    assert left == Counter(succeeded=len(submitter.ids)), left


_ORPHAN_METRIC = re.compile(r"^(curlfetch_\w*orphan\w*)(?:\{[^}]*\})?\s+([0-9.e+]+)$", re.M)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_job_owned_as_running_but_not_running_goes_back_to_the_queue(
    daemons: Daemons, schema: PostgresSchema, target: LoopbackSite
) -> None:
    """The self-check: a job the database says this instance is running, which it is
    not (what a claim or save lost with its connection leaves: made here by setting a
    finished job back to ``running`` under this instance, its lease fresh) goes back to
    the queue within 15 s even though the heartbeat keeps renewing its lease, runs again
    and ends succeeded; /metrics counts it in a ``curlfetch_*orphan*`` family."""
    instance = f"faults-{uuid.uuid4().hex[:8]}"
    d = await daemons.start(
        f"--database={schema.url}", f"--instance-id={instance}", "--lease=5s", "--drain-timeout=1"
    )
    view = await d.submit({"url": target.url("/count/orphan")})
    await d.wait_state(view["id"], {"succeeded"})
    schema.execute(
        "UPDATE jobs SET state = 'running', finished_at = NULL, result = NULL, owner = %s,"
        " lease_until = extract(epoch FROM clock_timestamp()) + 5 WHERE id = %s",
        (instance, view["id"]),
    )
    made = time.monotonic()
    while True:
        state = schema.execute("SELECT state, attempts FROM jobs WHERE id = %s", (view["id"],))
        if state[0][0] != "running" or time.monotonic() - made > 15:
            break
        await sleep(0.2)
    handed_back_in = time.monotonic() - made
    print(f"\nself-check: the orphan is {state[0]} after {handed_back_in:.1f}s")
    assert state[0][0] != "running", "still running after 15s: no self-check"
    done = await d.wait_state(view["id"], {"succeeded", "failed"}, 10)
    metrics = (await d.get("/metrics")).body.decode()
    counted = {name: float(n) for name, n in _ORPHAN_METRIC.findall(metrics)}
    print(
        f"self-check: then {done['state']}, attempts {done['attempts']}; target hits "
        f"{target.root.hits}; metric {counted}"
    )
    assert done["state"] == "succeeded"
    assert target.root.hits.get("/count/orphan") == 2
    assert sum(counted.values()) >= 1, "no curlfetch_*orphan* metric counted it"
