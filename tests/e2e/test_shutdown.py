"""Shutdown and crashes of a real ``twistd -n curlfetch`` process: graceful drain on
SIGTERM (long and short transfers), and at-least-once execution across ``kill -9``."""

from __future__ import annotations

import collections
import signal
import time

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite
from .conftest import Daemons, sleep
from .test_api import until

pytestmark = pytest.mark.timeout(90)


@pytest_twisted.ensureDeferred
async def test_sigterm_requeues_long_transfers_and_exits_0(
    daemons: Daemons, target: LoopbackSite, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM during 20 five-second transfers with --drain-timeout 1: /readyz is 503
    within a moment, a new POST gets 503, the process exits 0 after about a second with
    every unfinished job back to queued (that attempt not counted), and a restart
    completes them."""
    d = await daemons.start("--max-concurrency=50", "--max-per-host=50", "--drain-timeout=1")
    log = target.root.concurrency
    views = await d.submit_batch(
        [{"url": target.url(f"/concurrent?s=5&id={i}")} for i in range(20)]
    )
    await until(lambda: log.active == 20, 5, "20 transfers in flight")

    d.signal(signal.SIGTERM)
    signalled = time.monotonic()
    while (await d.get("/readyz", seconds=1)).status != 503:
        assert time.monotonic() - signalled < 0.5, "/readyz still ready 0.5s after SIGTERM"
        await sleep(0.01)
    readyz_after = time.monotonic() - signalled
    refused = await d.post_json("/v1/jobs", {"url": target.url("/count/late")})
    assert refused.status == 503
    assert refused.json()["error"]["code"] == "draining"
    assert refused.headers.get("retry-after")

    assert await d.wait_exit(10) == 0
    exited_after = time.monotonic() - signalled
    with capsys.disabled():
        print(f"\ndrain: /readyz 503 after {readyz_after:.3f}s, exit 0 after {exited_after:.2f}s")
    assert 0.9 < exited_after < 5
    assert log.active == 0
    ids = [v["id"] for v in views]
    assert {d.states()[i] for i in ids} == {("queued", 0)}
    assert "late" not in "".join(target.root.hits)

    await d.start()
    for job_id in ids:
        done = await d.wait_state(job_id, {"succeeded", "failed"}, seconds=20)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_short_transfers_finish(daemons: Daemons, target: LoopbackSite) -> None:
    """SIGTERM during ten half-second transfers with --drain-timeout 5: they finish, the
    process exits 0 as soon as they have (well before the timeout), and all succeeded."""
    d = await daemons.start("--max-concurrency=50", "--max-per-host=50", "--drain-timeout=5")
    log = target.root.concurrency
    views = await d.submit_batch(
        [{"url": target.url(f"/concurrent?s=0.5&id={i}")} for i in range(10)]
    )
    await until(lambda: log.active == 10, 5, "10 transfers in flight")
    d.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await d.wait_exit(10) == 0
    assert time.monotonic() - signalled < 3
    states = d.states()
    assert {states[v["id"]][0] for v in views} == {"succeeded"}
    assert sorted(log.starts) == sorted(str(i) for i in range(10))


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_kill_9_loses_no_job_and_duplicates_at_most_those_in_flight(
    daemons: Daemons, target: LoopbackSite, capsys: pytest.CaptureFixture[str]
) -> None:
    """At-least-once across a crash: 300 jobs against a target that answers after 1.5 s;
    kill -9 with about 50 transfers in flight; restart on the same data directory. Every
    accepted job ends succeeded, the target saw each at least once, and the jobs it saw
    twice are no more than those left running in the database at the kill."""
    jobs = 300
    d = await daemons.start("--max-concurrency=50", "--max-per-host=50", "--drain-timeout=1")
    log = target.root.concurrency
    views = []
    for start in range(0, jobs, 100):
        views += await d.submit_batch(
            [{"url": target.url(f"/concurrent?s=1.5&id={i}")} for i in range(start, start + 100)]
        )
    by_index = {str(i): v["id"] for i, v in enumerate(views)}
    await until(lambda: len(log.starts) >= 110 and log.active >= 45, 20, "the third wave")

    d.kill()
    seen_in_flight = log.active
    states = d.states()
    running_at_kill = sum(1 for state, _ in states.values() if state == "running")
    finished_at_kill = sum(1 for state, _ in states.values() if state == "succeeded")
    await until(lambda: log.active == 0, 5, "the target to see the connections go")

    await d.start()
    deadline = time.monotonic() + 60
    while True:
        listed = await d.all_jobs()
        if not [j for j in listed if j["state"] in ("queued", "running")]:
            break
        assert time.monotonic() < deadline, "jobs still queued or running after 60s"
        await sleep(0.25)

    assert len(listed) == jobs
    assert {j["state"] for j in listed} == {"succeeded"}
    assert {j["id"] for j in listed} == set(by_index.values())
    hits = collections.Counter(log.starts)
    assert set(hits) == set(by_index), "the target missed some jobs"
    duplicates = sum(1 for n in hits.values() if n > 1)
    with capsys.disabled():  # the figures are the point: show them without -s
        print(
            f"\ncrash: {jobs} jobs; at kill -9: {running_at_kill} running in the store, "
            f"{seen_in_flight} in flight at the target, {finished_at_kill} already succeeded; "
            f"duplicates after restart: {duplicates} (max hits per job {max(hits.values())})"
        )
    assert 40 <= running_at_kill <= 50
    assert duplicates <= running_at_kill
    assert max(hits.values()) <= 2
