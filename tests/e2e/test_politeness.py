"""Politeness in real ``twistd curlfetch`` processes: ``--robots obey`` and
``--user-agent`` decide what is fetched and how it is announced, and a host's pause on
429 ``Retry-After`` holds across two instances sharing PostgreSQL, as the target itself
sees it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import pytest_twisted

from ..service.backends import PostgresSchema
from ..service.politeness_target import Target
from .conftest import TERMINAL, Daemons, sleep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def politeness_target() -> Iterator[Target]:
    target = Target()
    yield target
    target.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_robots_obey_and_the_user_agent_in_twistd(
    daemons: Daemons, politeness_target: Target
) -> None:
    """With ``--robots obey`` a job without ``robots`` follows robots.txt: a disallowed
    URL fails ``robots_disallowed`` and is never requested, an allowed one is fetched,
    one with ``robots: ignore`` is fetched anyway; every request (robots.txt included)
    carries ``--user-agent``; the hosts view shows the robots.txt."""
    target = politeness_target
    target.robots_body = b"User-agent: e2ebot\nDisallow: /private\n"
    daemon = await daemons.start("--robots=obey", "--user-agent=e2ebot/2.0 (+https://x.test)")
    denied = await daemon.submit({"url": target.url("/private/a")})
    allowed = await daemon.submit({"url": target.url("/open")})
    ignored = await daemon.submit({"url": target.url("/private/b"), "robots": "ignore"})
    denied = await daemon.wait_state(denied["id"], TERMINAL)
    assert denied["error"] is not None, denied
    assert denied["error"]["code"] == "robots_disallowed", denied
    assert "Disallow: /private" in denied["error"]["message"]
    for job in (allowed, ignored):
        done = await daemon.wait_state(job["id"], TERMINAL)
        assert done["state"] == "succeeded", done
    assert not target.hits("/private/a")
    assert len(target.hits("/robots.txt")) == 1
    assert {s.headers["user-agent"] for s in target.seen} == {"e2ebot/2.0 (+https://x.test)"}
    view = (await daemon.get(f"/v1/hosts/{target.host}")).json()
    assert view["robots"][0]["state"] == "rules"
    metrics = (await daemon.get("/metrics")).body.decode()
    assert "curlfetch_robots_denials_total 1.0" in metrics


@pytest_twisted.ensureDeferred
async def test_a_pause_holds_across_two_instances(
    daemons: Daemons, schema: PostgresSchema, politeness_target: Target
) -> None:
    """Two instances on one PostgreSQL, one request at a time per host between them: the
    target answers the first request 429 with ``Retry-After: 3``; no request reaches it
    in the next 3 s from either instance, then every job is fetched; both instances show
    the pause."""
    target = politeness_target
    target.answers["/p0"] = (429, 3)
    args = (f"--database={schema.url}", "--max-per-host=1")
    one = await daemons.start(*args, "--instance-id=one", name="one")
    two = await daemons.start(*args, "--instance-id=two", name="two")
    specs = [{"url": target.url(f"/p{i}"), "retry": {"backoff": 0.1}} for i in range(6)]
    jobs = await one.submit_batch(specs)
    deadline = time.monotonic() + 10
    while not target.hits("/p0") and time.monotonic() < deadline:
        await sleep(0.02)
    paused_at = target.hits("/p0")[0].at
    for daemon in (one, two):
        view = (await daemon.get(f"/v1/hosts/{target.host}")).json()
        deadline = time.monotonic() + 5
        while view["cooldown"] is None and time.monotonic() < deadline:
            await sleep(0.05)
            view = (await daemon.get(f"/v1/hosts/{target.host}")).json()
        assert "Retry-After" in view["cooldown"]["reason"], view
    done = [await two.wait_state(job["id"], TERMINAL, seconds=20) for job in jobs]
    assert {job["state"] for job in done} == {"succeeded"}
    later = sorted(s.at - paused_at for s in target.seen if s.at > paused_at)
    assert later, target.seen
    assert later[0] >= 2.9, later
