"""Per-client bookkeeping below the API: the store's queued count per client, its claim
with a per-client cap (both backends), and the scheduler's in-flight cap per client, observed at a
loopback target."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted

from curlfetch.jobs import JobState
from curlfetch.store import JobFilter

from .backends import AnyStore, Backend
from .conftest import make_job, open_backend, within
from .test_scheduler import Env, env, until

__all__ = ["env"]  # fixtures

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0


# -- the store -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queued_for_follows_every_write_per_client(backend: Backend) -> None:
    """queued_for(client) equals the stored count of that client's queued jobs after adds,
    claims, a requeue, a finish, a cancel and a reopen; other clients are unaffected
    (both backends)."""
    store = await open_backend(backend)

    async def check() -> None:
        for client in ("alice", "bob", "carol"):
            stored = await within(
                store.list_jobs(client, JobFilter(state=JobState.QUEUED), 1000, None)
            )
            assert store.queued_for(client) == len(stored), client
        assert store.queued() == sum(store.queued_for(c) for c in ("alice", "bob", "carol"))

    await within(store.add([make_job("alice") for _ in range(4)]))
    await within(store.add([make_job("bob") for _ in range(3)]))
    await check()
    assert (store.queued_for("alice"), store.queued_for("bob")) == (4, 3)
    claimed = await within(store.claim(10, T0, ()))
    await check()
    assert store.queued() == 0
    alice = [j for j in claimed if j.client == "alice"]
    bob = [j for j in claimed if j.client == "bob"]
    await within(
        store.save(
            [
                attrs.evolve(alice[0], state=JobState.QUEUED),
                attrs.evolve(alice[1], state=JobState.QUEUED),
                attrs.evolve(bob[0], state=JobState.QUEUED),
                attrs.evolve(bob[1], state=JobState.FAILED, finished_at=T0),
            ]
        )
    )
    await check()
    assert (store.queued_for("alice"), store.queued_for("bob")) == (2, 1)
    await within(store.cancel("alice", alice[0].id, T0))
    await within(store.cancel("bob", alice[1].id, T0))  # not bob's: nothing happens
    await check()
    assert (store.queued_for("alice"), store.queued_for("bob")) == (1, 1)
    await within(store.close())

    store = await open_backend(backend)  # left running: alice 2, bob 1 come back queued
    await check()
    assert (store.queued_for("alice"), store.queued_for("bob")) == (3, 2)
    await within(store.close())


@pytest_twisted.ensureDeferred
async def test_claim_caps_each_client(store: AnyStore) -> None:
    """With ``per_client``, a claim gives each client at most its room (``client_room``
    for clients already busy, else the cap), in priority-then-FIFO order, and honours
    ``limit``, host rooms and skipped hosts as before."""
    a = [make_job("alice", url="http://h.test/") for _ in range(4)]
    b = [make_job("bob", url="http://h.test/") for _ in range(3)]
    c = [make_job("carol", url="http://g.test/") for _ in range(2)]
    urgent_b = make_job("bob", url="http://g.test/", priority=5)
    await within(store.add([*a, *b, *c, urgent_b]))

    claimed = await within(
        store.claim(10, T0, (), per_host=8, per_client=2, client_room={"carol": 1})
    )
    assert [j.id for j in claimed] == [urgent_b.id, a[0].id, a[1].id, b[0].id, c[0].id]

    claimed = await within(
        store.claim(
            2, T0, (), per_host=8, per_client=3, client_room={"alice": 1, "bob": 0, "carol": 0}
        )
    )
    assert [j.id for j in claimed] == [a[2].id]  # the limit is 2, but only alice has room

    claimed = await within(
        store.claim(10, T0, ["g.test:80"], per_host=1, host_room={}, per_client=5)
    )
    assert [j.id for j in claimed] == [a[3].id]  # h.test takes one; g.test is skipped


@pytest_twisted.ensureDeferred
async def test_a_client_without_room_does_not_hold_back_others_on_the_same_host(
    store: AnyStore,
) -> None:
    """Alice's long backlog for a host, queued first, cannot fill that host's ranks while
    she is at her cap: Bob's later jobs for the same host are claimed up to the host's
    room. (Ranked together, her 20 jobs would have pushed his past the host's room.)"""
    alice = [make_job("alice", url="http://h.test/") for _ in range(20)]
    bob = [make_job("bob", url="http://h.test/") for _ in range(3)]
    await within(store.add([*alice, *bob]))
    claimed = await within(
        store.claim(
            10,
            T0,
            (),
            per_host=4,
            host_room={"h.test:80": 3},
            per_client=3,
            client_room={"alice": 0},
        )
    )
    assert [j.id for j in claimed] == [j.id for j in bob]


@pytest_twisted.ensureDeferred
async def test_claim_never_exceeds_a_room_when_both_caps_bind(store: AnyStore) -> None:
    """Over many small claims with random-ish rooms, no claim gives a client more than its
    room or a host more than its room."""
    jobs = [
        make_job(client, url=f"http://{host}.test/", priority=i % 3)
        for i, (client, host) in enumerate(
            (c, h) for c in ("alice", "bob", "carol") for h in ("h", "g", "k") for _ in range(4)
        )
    ]
    await within(store.add(jobs))
    rooms = [({"alice": 1}, {"h.test:80": 1}), ({"bob": 0}, {"g.test:80": 2}), ({}, {})]
    while store.queued():
        for client_room, host_room in rooms:
            claimed = await within(
                store.claim(
                    50,
                    T0,
                    (),
                    per_host=2,
                    host_room=host_room,
                    per_client=3,
                    client_room=client_room,
                )
            )
            for client in ("alice", "bob", "carol"):
                got = sum(1 for j in claimed if j.client == client)
                assert got <= client_room.get(client, 3)
            for host in ("h.test:80", "g.test:80", "k.test:80"):
                got = sum(1 for j in claimed if j.spec.host == host)
                assert got <= host_room.get(host, 2)


# -- the scheduler -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_scheduler_caps_each_clients_transfers(env: Env) -> None:
    """With ``max_per_client=2`` (and room for 10 per host and overall), each client's
    target sees at most 2 of its requests at once, both clients run side by side, and
    every job succeeds; the per-client count goes back to zero."""
    sched = env.scheduler(max_concurrency=10, max_per_host=10, max_per_client=2)
    other = env.other_site()
    alice = [env.job(f"/concurrent?s=0.3&id=a{i}") for i in range(6)]
    bob = [
        attrs.evolve(env.job(url=other.url(f"/concurrent?s=0.3&id=b{i}")), client="bob")
        for i in range(6)
    ]
    await env.add(*alice, *bob)
    sched.startService()
    await until(lambda: env.log.active == 2 and other.root.concurrency.active == 2, "both")
    assert sched.in_flight_for("alice") == 2
    assert sched.in_flight_for("bob") == 2
    for job in [*alice, *bob]:
        assert (await env.settled(job)).state is JobState.SUCCEEDED
    assert env.log.peak == 2
    assert other.root.concurrency.peak == 2
    await until(lambda: sched.in_flight_for("alice") == 0, "alice's count back to 0")
    assert sched.in_flight_for("bob") == 0


@pytest_twisted.ensureDeferred
async def test_jobs_waiting_for_their_host_count_against_the_client(env: Env) -> None:
    """A job claimed but still waiting for its host's interval counts as in flight for
    its client: with a cap of 2 and a 30 s per-host interval, the first job runs, the
    second waits in the scheduler, and the third stays queued; aborting the waiting one
    frees its slot and the third is claimed."""
    sched = env.scheduler(
        max_concurrency=10, max_per_host=10, max_per_client=2, per_host_interval=30.0
    )
    jobs = [env.job(f"/concurrent?s=30&id={i}") for i in range(3)]
    await env.add(*jobs)
    sched.startService()
    await until(lambda: env.log.starts == ["0"], "the first start")
    assert sched.in_flight_for("alice") == 2
    assert (await env.get(jobs[1])).state is JobState.RUNNING  # claimed, waiting
    assert (await env.get(jobs[2])).state is JobState.QUEUED

    await within(env.store.cancel("alice", jobs[1].id, T0))
    assert sched.abort(jobs[1].id)
    assert sched.in_flight_for("alice") == 1
    await until(lambda: sched.in_flight_for("alice") == 2, "the third job claimed")
    assert (await env.get(jobs[2])).state is JobState.RUNNING
    assert env.log.starts == ["0"]
