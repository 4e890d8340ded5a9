"""Several ``twistd -n curlfetch`` processes on one PostgreSQL (a throwaway schema of the
local server) and one shared ``--data-dir`` for the bodies, as a scaled-out deployment
runs them: any instance serves any job, a killed instance's jobs come back after its
lease, and the per-host cap holds across instances, as seen by the target itself."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ..engine.servers import LoopbackSite
from ..service.backends import PostgresSchema, require_postgres
from .conftest import TERMINAL, Daemon, Daemons, sleep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_ATTEMPTS = re.compile(r'^curlfetch_attempts_total\{outcome="[^"]+"\}\s+([0-9.e+]+)$', re.M)


@pytest.fixture
def schema() -> Iterator[PostgresSchema]:
    require_postgres()
    pg = PostgresSchema()
    try:
        yield pg
    finally:
        pg.drop()


class Cluster:
    """Instances sharing ``schema`` and one data directory; daemons are stopped (by the
    ``daemons`` fixture) before the schema is dropped."""

    def __init__(self, schema: PostgresSchema, daemons: Daemons, tmp_path: Path) -> None:
        self.schema = schema
        self.daemons = daemons
        self.shared = tmp_path / "shared-data"

    async def start(self, count: int, *args: str) -> list[Daemon]:
        """``count`` instances named scale-1.., started together (migrations race)."""
        made = []
        for i in range(1, count + 1):
            daemon = self.daemons.make(
                f"--database={self.schema.url}", f"--instance-id=scale-{i}", *args, name=f"i{i}"
            )
            daemon.data_dir = self.shared
            made.append(daemon)
        await defer.gatherResults([defer.Deferred.fromCoroutine(d.start(30)) for d in made])
        return made

    def states(self) -> Counter[str]:
        return Counter(
            {
                state: n
                for state, n in self.schema.execute("SELECT state, count(*) FROM jobs GROUP BY 1")
            }
        )

    async def settled(self, total: int, seconds: float) -> Counter[str]:
        """Wait until all ``total`` jobs are terminal (read straight from PostgreSQL)."""
        deadline = time.monotonic() + seconds
        while True:
            states = self.states()
            if sum(states[s] for s in TERMINAL) == total:
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"not all {total} jobs terminal after {seconds}s: {states}")
            await sleep(0.1)


@pytest.fixture
def cluster(schema: PostgresSchema, daemons: Daemons, tmp_path: Path) -> Cluster:
    return Cluster(schema, daemons, tmp_path)


async def submit(daemon: Daemon, urls: list[str], batch: int = 500) -> list[str]:
    """POST every URL (no retries), ``batch`` a request; the job ids in order."""
    ids: list[str] = []
    for start in range(0, len(urls), batch):
        specs = [{"url": u, "retry": {"max_attempts": 1}} for u in urls[start : start + batch]]
        ids += [view["id"] for view in await daemon.submit_batch(specs)]
    return ids


async def attempts(daemon: Daemon) -> int:
    """Fetch attempts this instance finished (its own /metrics)."""
    reply = await daemon.get("/metrics")
    assert reply.status == 200, reply
    return round(sum(float(n) for n in _ATTEMPTS.findall(reply.body.decode())))


@pytest_twisted.ensureDeferred
async def test_jobs_submitted_to_one_instance_are_read_from_another(
    cluster: Cluster, target: LoopbackSite
) -> None:
    """5,000 jobs submitted to instance 1 run on the instances (each may run 12 at once,
    24 per host in all, so one alone cannot take every slot); instance 2 lists every job
    as succeeded and serves every body, whichever instance wrote it, and the target never
    saw more than --max-per-host=24 requests at once. Each instance wrote its own
    segments (named with its instance id) in the shared directory, and a WARC export
    from instance 3 copies all 5,000 records."""
    first, second, third = await cluster.start(
        3, "--max-per-host=24", "--max-concurrency=12", "--max-queued=100000"
    )
    total = 5000
    started = time.monotonic()
    ids = await submit(first, [target.url(f"/concurrent?s=0&id=j{i}") for i in range(total)])
    states = await cluster.settled(total, 60)
    elapsed = time.monotonic() - started
    assert states == Counter(succeeded=total)

    views = await second.all_jobs()
    assert sorted(v["id"] for v in views) == sorted(ids)
    assert {v["state"] for v in views} == {"succeeded"}
    expected = {job_id: f"j{i}".encode() for i, job_id in enumerate(ids)}
    for start in range(0, total, 100):  # every body, 100 requests at a time
        chunk = ids[start : start + 100]
        replies = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(second.get(f"/v1/jobs/{j}/body")) for j in chunk]
        )
        for job_id, reply in zip(chunk, replies, strict=True):
            assert (reply.status, reply.body) == (200, expected[job_id])

    ran = [await attempts(d) for d in (first, second, third)]
    print(
        f"\nscale-out: {total} jobs in {elapsed:.1f}s over 3 instances, attempts per "
        f"instance {ran}, target peak {target.root.concurrency.peak} (cap 24)"
    )
    assert sum(ran) == total
    assert sum(1 for n in ran if n) >= 2
    assert target.root.concurrency.peak <= 24
    segments = {v["result"]["body"]["warc"]["segment"] for v in views}
    writers = {re.search(r"-(scale-\d)-\d{5}\.warc$", name)[1] for name in segments}  # type: ignore[index]
    assert writers == {f"scale-{i}" for i, n in enumerate(ran, 1) if n}
    export = await third.get("/v1/jobs/export.warc", seconds=60)
    assert export.status == 200
    assert export.body.count(b"WARC-Type: response") == total
    assert b"export-responses: 5000\r\nexport-responses-built: 0\r\n" in export.body
    assert b"export-complete: true" in export.body


@pytest_twisted.ensureDeferred
async def test_the_per_host_cap_holds_across_instances(
    cluster: Cluster, target: LoopbackSite
) -> None:
    """Three instances with --max-per-host=4 and --max-concurrency=3 each (9 transfers
    in all) on 60 slow jobs (0.3 s) of one host: the target sees 4 requests at once at
    most, and reaches 4, which no instance could alone: the cap is shared."""
    first, *others = await cluster.start(3, "--max-per-host=4", "--max-concurrency=3")
    total = 60
    await submit(first, [target.url(f"/concurrent?s=0.3&id=c{i}") for i in range(total)])
    await cluster.settled(total, 60)
    peak = target.root.concurrency.peak
    ran = [await attempts(d) for d in (first, *others)]
    print(f"\nper-host cap 4 over 3 instances: target peak {peak}, attempts per instance {ran}")
    assert peak == 4
    assert sum(ran) == total
    assert sum(1 for n in ran if n) >= 2
    assert sorted(target.root.concurrency.starts) == sorted(f"c{i}" for i in range(total))


@pytest_twisted.ensureDeferred
async def test_a_killed_instances_jobs_are_run_by_the_others(
    cluster: Cluster, target: LoopbackSite
) -> None:
    """kill -9 of one instance of three while it runs about 50 transfers: after its 2 s
    lease the others reap and run its jobs. Every job ends succeeded, none is lost, and
    the target saw no more repeated requests than the dead instance had jobs in flight."""
    instances = await cluster.start(3, "--max-per-host=150", "--max-concurrency=50", "--lease=2s")
    victim = instances[2]
    total = 1500
    await submit(instances[0], [target.url(f"/concurrent?s=0.5&id=k{i}") for i in range(total)])
    deadline = time.monotonic() + 20
    held: list[Any] = [(0,)]
    while time.monotonic() < deadline:  # until the victim is busy
        held = cluster.schema.execute(
            "SELECT count(*) FROM jobs WHERE state = 'running' AND owner = 'scale-3'"
        )
        if held[0][0] >= 45:
            break
        await sleep(0.05)
    victim.kill()
    killed_at = time.monotonic()
    in_flight = cluster.schema.execute(
        "SELECT count(*) FROM jobs WHERE state = 'running' AND owner = 'scale-3'"
    )[0][0]
    assert in_flight >= 45, "the victim never got busy"

    states = await cluster.settled(total, 60)
    recovered_in = time.monotonic() - killed_at
    assert states == Counter(succeeded=total)
    starts = Counter(target.root.concurrency.starts)
    assert set(starts) == {f"k{i}" for i in range(total)}  # none lost
    duplicates = sum(n - 1 for n in starts.values())
    reaped = sum(
        int(m)
        for d in instances[:2]
        for m in re.findall(r"requeued (\d+) jobs whose lease", d.log())
    )
    attempts_total = cluster.schema.execute("SELECT sum(attempts) FROM jobs")[0][0]
    print(
        f"\ncrash test: {total} jobs, 3 instances, kill -9 of one holding {in_flight} jobs; "
        f"reaped {reaped}, duplicate requests at the target {duplicates} (<= {in_flight}), "
        f"attempts {attempts_total}, all {total} succeeded {recovered_in:.1f}s after the kill"
    )
    assert reaped == in_flight
    assert duplicates <= in_flight
    assert attempts_total == total + in_flight  # each reaped job: one more attempt
