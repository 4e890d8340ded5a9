"""Politeness state in the store, on SQLite and PostgreSQL: a host's cooldown keeps
every claim (plain and capped, on any instance) off its queued jobs until it ends, a
later pause extends it and an earlier one does not shorten it; the robots.txt cache
round-trips and keeps the newest fetch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest_twisted

from curlfetch.jobs import Job
from curlfetch.store import RobotsRow

from .backends import AnyStore, Backend
from .conftest import make_job, open_backend, within

NOW = 1_700_000_000.0


def hosts_of(jobs: Sequence[Job]) -> set[str]:
    return {job.spec.host for job in jobs}


@pytest_twisted.ensureDeferred
async def test_a_cooling_host_is_not_claimed_until_its_pause_ends(store: AnyStore) -> None:
    """Queued jobs of a paused host are left by the plain and the capped claim while the
    pause lasts (others' jobs are claimed), and claimed once it has ended."""
    paused = [make_job(url=f"http://paused.test/{i}", created_at=NOW) for i in range(3)]
    free = [make_job(url=f"http://free.test/{i}", created_at=NOW) for i in range(3)]
    await within(store.add(paused + free))
    await within(store.set_cooldown("paused.test:80", NOW + 10, "HTTP 429", NOW))
    got = await within(store.claim(2, NOW + 1, ()))
    assert hosts_of(got) == {"free.test:80"}
    capped = await within(store.claim(10, NOW + 1, (), per_host=8, host_room={}))
    assert hosts_of(capped) == {"free.test:80"}
    assert len(got) + len(capped) == 3
    cooldowns = await within(store.cooldowns(NOW + 5))
    assert cooldowns["paused.test:80"].reason == "HTTP 429"
    assert await within(store.cooldowns(NOW + 10)) == {}
    later = await within(store.claim(10, NOW + 10.5, ()))
    assert hosts_of(later) == {"paused.test:80"}
    assert len(later) == 3


@pytest_twisted.ensureDeferred
async def test_a_later_pause_extends_and_an_earlier_one_does_not_shorten(
    store: AnyStore,
) -> None:
    """Setting a pause keeps the later end (two instances may each set one)."""
    await within(store.set_cooldown("h:80", NOW + 10, "first", NOW))
    await within(store.set_cooldown("h:80", NOW + 5, "shorter", NOW + 1))
    assert (await within(store.cooldowns(NOW)))["h:80"].reason == "first"
    await within(store.set_cooldown("h:80", NOW + 20, "longer", NOW + 2))
    (cooldown,) = (await within(store.cooldowns(NOW, ["h:80", "other:80"]))).values()
    assert (cooldown.until, cooldown.reason, cooldown.set_at) == (NOW + 20, "longer", NOW + 2)


@pytest_twisted.ensureDeferred
async def test_the_robots_cache_round_trips_and_keeps_the_newest(store: AnyStore) -> None:
    """A stored robots.txt comes back byte for byte; an older fetch does not replace a
    newer one."""
    body = b"User-agent: *\nDisallow: /\n\x00\xff"
    row = RobotsRow("https://a.test:443", "rules", 200, NOW, NOW + 60, True, "HTTP 200", body)
    await within(store.robots_put(row))
    older = RobotsRow("https://a.test:443", "unreachable", 503, NOW - 1, NOW + 1, False, "x", b"")
    await within(store.robots_put(older))
    got = await within(store.robots_get(["https://a.test:443", "http://a.test:80"]))
    assert got == {"https://a.test:443": row}


@pytest_twisted.ensureDeferred
async def test_a_pause_set_by_one_instance_holds_on_another(pg: Backend) -> None:
    """PostgreSQL: a pause written by one instance keeps another instance's claims off
    the host (the claim reads the shared table), until it ends."""
    one = await open_backend(pg, instance_id="one")
    two = await open_backend(pg, instance_id="two")
    try:
        jobs = [make_job(url=f"http://paused.test/{i}", created_at=NOW) for i in range(2)]
        await within(one.add(jobs))
        await within(one.set_cooldown("paused.test:80", NOW + 30, "HTTP 503", NOW))
        assert await within(two.claim(10, NOW + 1, ())) == []
        assert await within(two.claim(10, NOW + 1, (), per_host=4, host_room={})) == []
        claimed = await within(two.claim(10, NOW + 31, ()))
        assert len(claimed) == 2
    finally:
        await within(one.close())
        await within(two.close())
