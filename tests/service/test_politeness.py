"""Crawler politeness against real loopback targets: robots.txt (RFC 9309), host
cooldowns on 429/503 ``Retry-After`` and on failure runs, conditional fetches, and the
hosts view. A real SQLite store, engine and scheduler (``apiserver.Service``)."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from warcio.archiveiterator import ArchiveIterator

from curlfetch.egress import EgressPolicy
from curlfetch.engine import CurlClient
from curlfetch.jobs import JobError, JobSpec, Limits
from curlfetch.politeness import HostBook, PolitenessConfig
from curlfetch.robots import MAX_ROBOTS_BYTES, RobotsCache, RobotsConfig
from tests.engine.faults import refused_port

from .apiserver import Service, ServiceFactory, services
from .conftest import reactor, within
from .politeness_target import ETAG, LAST_MODIFIED, Target

__all__ = ["services"]  # a fixture

ROBOTS = RobotsConfig(user_agent="testbot/1.0", error_ttl=30.0, timeout=0.5)

TargetFactory = Callable[[], Target]


@pytest_twisted.async_yield_fixture
async def targets() -> AsyncIterator[TargetFactory]:
    made: list[Target] = []

    def make() -> Target:
        made.append(Target())
        return made[-1]

    yield make
    for target in made:
        await target.stop()


async def run(svc: Service, spec: dict[str, Any], seconds: float = 5) -> dict[str, Any]:
    reply = await svc.submit(spec)
    assert reply.status == 201, reply
    return await svc.wait_job(reply.json()["id"], seconds)


async def run_all(svc: Service, specs: list[dict[str, Any]], seconds: float = 10) -> list[Any]:
    reply = await svc.call("POST", "/v1/jobs", json_body={"jobs": specs})
    assert reply.status == 201, reply
    return [await svc.wait_job(job["id"], seconds) for job in reply.json()["jobs"]]


Make = Callable[..., Awaitable[Service]]


# -- robots.txt ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_robots_rules_decide_and_name_the_rule(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """With ``robots: obey``, a URL the origin's robots.txt disallows for the user agent's
    product token fails ``robots_disallowed`` naming the rule (never retried, never
    requested); an allowed URL and a more specific Allow are fetched; ``ignore`` fetches
    regardless. Jobs send the configured User-Agent; robots.txt is fetched once."""
    target = targets()
    target.robots_body = (
        b"User-agent: otherbot\nDisallow: /\n\n"
        b"User-agent: testbot\nDisallow: /private\nAllow: /private/ok\n"
    )
    svc = await services(robots=ROBOTS, scheduler_config={"user_agent": "testbot/1.0"})
    denied = await run(svc, {"url": target.url("/private/x"), "robots": "obey"})
    assert denied["state"] == "failed"
    assert denied["attempts"] == 1
    assert denied["error"]["code"] == "robots_disallowed"
    assert "Disallow: /private (user-agent: testbot)" in denied["error"]["message"]
    assert not target.hits("/private/x")
    allowed = await run(svc, {"url": target.url("/private/ok"), "robots": "obey"})
    public = await run(svc, {"url": target.url("/public"), "robots": "obey"})
    ignored = await run(svc, {"url": target.url("/private/y"), "robots": "ignore"})
    assert [j["state"] for j in (allowed, public, ignored)] == ["succeeded"] * 3
    assert public["request"]["robots"] == "obey"
    assert len(target.hits("/robots.txt")) == 1
    assert {s.headers["user-agent"] for s in target.seen} == {"testbot/1.0"}


@pytest_twisted.ensureDeferred
async def test_one_robots_fetch_for_100_concurrent_jobs(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """100 jobs to one origin submitted at once wait on one robots.txt fetch (no
    thundering herd), and it is kept in the store."""
    target = targets()
    target.robots_body = b"User-agent: *\nDisallow: /no\n"
    svc = await services(robots=ROBOTS, max_concurrency=50, scheduler_config={"max_per_host": 50})
    specs = [{"url": target.url(f"/p{i}"), "robots": "obey"} for i in range(100)]
    jobs = await run_all(svc, specs)
    assert {j["state"] for j in jobs} == {"succeeded"}
    assert len(target.hits("/robots.txt")) == 1
    stored = await within(svc.store.robots_get([f"http://{target.host}"]))
    row = stored[f"http://{target.host}"]
    assert (row.state, row.status, row.body) == ("rules", 200, target.robots_body)


@pytest_twisted.ensureDeferred
async def test_a_4xx_robots_allows_everything(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """A robots.txt answered 404 (unavailable, RFC 9309 2.3.1.3) allows every URL."""
    target = targets()
    target.robots_status = 404
    svc = await services(robots=ROBOTS)
    job = await run(svc, {"url": target.url("/anything"), "robots": "obey"})
    assert job["state"] == "succeeded"
    view = (await svc.call("GET", f"/v1/hosts/{target.host}")).json()
    (robots,) = view["robots"]
    assert (robots["state"], robots["status"]) == ("allow_all", 404)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("failure", ["5xx", "slow"])
async def test_an_unreachable_robots_disallows_for_a_while(
    services: ServiceFactory, targets: TargetFactory, failure: str
) -> None:
    """A robots.txt answered 503, or one that does not arrive within the robots timeout
    (a slow file), disallows the whole origin: the job is not fetched and, its attempts
    spent, fails ``robots_unavailable``; the result is kept (no second fetch)."""
    target = targets()
    if failure == "5xx":
        target.robots_status = 503
    else:
        target.robots_stall = True
    svc = await services(robots=ROBOTS)
    spec = {"url": target.url("/x"), "robots": "obey", "retry": {"max_attempts": 1}}
    job = await run(svc, spec)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "robots_unavailable"
    expected = "HTTP 503" if failure == "5xx" else "OPERATION_TIMEDOUT"
    assert expected in job["error"]["message"]
    again = await run(svc, spec)
    assert again["error"]["code"] == "robots_unavailable"
    assert not target.hits("/x")
    assert len(target.hits("/robots.txt")) == 1


@pytest_twisted.ensureDeferred
async def test_robots_unreachable_job_is_retried_once_readable(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """A job whose robots.txt is unreachable is retried (per its policy, not before the
    file may be read again) and fetched once the file answers."""
    target = targets()
    target.robots_status = 500
    config = RobotsConfig(user_agent="testbot", error_ttl=0.3, timeout=1.0)
    svc = await services(robots=config)
    reply = await svc.submit(
        {"url": target.url("/later"), "robots": "obey", "retry": {"backoff": 0.05}}
    )
    await svc.until(lambda: len(target.hits("/robots.txt")) == 1)
    target.robots_status = 200
    target.robots_body = b"User-agent: *\nAllow: /\n"
    job = await svc.wait_job(reply.json()["id"])
    assert (job["state"], job["attempts"]) == ("succeeded", 2)
    assert len(target.hits("/robots.txt")) == 2


@pytest_twisted.ensureDeferred
async def test_robots_redirect_to_another_origin_is_followed(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """A robots.txt redirected to another origin's file: that file's rules apply to the
    first origin (RFC 9309 2.3.1.2)."""
    first, second = targets(), targets()
    first.robots_redirect = second.url("/rules.txt")
    second.robots_body = b"User-agent: *\nDisallow: /x\n"
    svc = await services(robots=ROBOTS)
    job = await run(svc, {"url": first.url("/x/y"), "robots": "obey"})
    assert second.hits("/rules.txt")
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "robots_disallowed"
    assert not first.hits("/x/y")


@pytest_twisted.ensureDeferred
async def test_a_huge_robots_is_read_up_to_500_kib(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """Only the first 500 KiB of a larger robots.txt are downloaded and parsed: a rule
    in them applies, one after them does not; the hosts view says truncated."""
    target = targets()
    filler = b"# padding padding padding padding padding padding padding padding\n"
    body = b"User-agent: *\nDisallow: /early\n"
    body += filler * (MAX_ROBOTS_BYTES // len(filler) + 10)
    body += b"Disallow: /late\n"
    target.robots_body = body
    svc = await services(robots=ROBOTS)
    early = await run(svc, {"url": target.url("/early"), "robots": "obey"})
    late = await run(svc, {"url": target.url("/late"), "robots": "obey"})
    assert early["error"]["code"] == "robots_disallowed"
    assert late["state"] == "succeeded"
    view = (await svc.call("GET", f"/v1/hosts/{target.host}")).json()
    (robots,) = view["robots"]
    assert (robots["bytes"], robots["truncated"]) == (MAX_ROBOTS_BYTES, True)


@pytest_twisted.ensureDeferred
async def test_crawl_delay_becomes_the_host_interval(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """``Crawl-delay: 0.4`` spaces the starts of jobs that obey by at least 0.4 s (the
    configured interval being 0); the hosts view shows it."""
    target = targets()
    target.robots_body = b"User-agent: *\nCrawl-delay: 0.4\n"
    svc = await services(robots=ROBOTS, scheduler_config={"max_per_host": 4})
    jobs = await run_all(svc, [{"url": target.url(f"/c{i}"), "robots": "obey"} for i in range(3)])
    assert {j["state"] for j in jobs} == {"succeeded"}
    starts = sorted(s.at for s in target.seen if s.path.startswith("/c"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.35, gaps
    view = (await svc.call("GET", f"/v1/hosts/{target.host}")).json()
    assert (view["crawl_delay"], view["interval"]) == (0.4, 0.4)


@pytest_twisted.ensureDeferred
async def test_robots_is_fetched_under_the_egress_policy(targets: TargetFactory) -> None:
    """The robots.txt fetch goes through the egress policy: a target it refuses is never
    contacted (the result is "allow all", so the job itself meets the same refusal)."""
    target = targets()
    client = CurlClient(reactor())
    try:
        cache = RobotsCache(
            reactor(), client, None, RobotsConfig(egress=EgressPolicy(), timeout=2.0)
        )
        robots = await within(cache.load(f"http://{target.host}"))
        assert robots.state == "allow_all"
        assert "egress policy" in robots.row.message
        assert not target.seen
        again = await within(cache.load(f"http://{target.host}"))
        assert again is robots
        assert cache.fetches == 1
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_robots_cache_is_bounded_by_bytes(targets: TargetFactory) -> None:
    """The in-memory cache drops its least recently used origins once their bodies pass
    ``max_bytes`` (a robots.txt may be 500 KiB, and a crawl meets many origins)."""
    sites = [targets() for _ in range(3)]
    for site in sites:
        site.robots_body = b"User-agent: *\nDisallow: /x\n" + b"#" * 100
    client = CurlClient(reactor())
    try:
        cache = RobotsCache(reactor(), client, None, RobotsConfig(max_bytes=300, timeout=2.0))
        for site in sites:
            await within(cache.load(f"http://{site.host}"))
        assert cache.known(f"http://{sites[0].host}") is None
        assert all(cache.known(f"http://{site.host}") is not None for site in sites[1:])
    finally:
        client.close()


# -- host cooldowns --------------------------------------------------------------------------


def test_host_book_pauses_on_retry_after_and_failure_runs() -> None:
    """On a task.Clock: 429/503 with Retry-After pause the host for that long (capped),
    a 429 without it or a 500 does not; N connect failures in a row pause it, doubling
    per further failure (capped), and any response ends the run; a pause ends on time."""
    clock = Clock()
    book = HostBook(PolitenessConfig(max_cooldown=60, failure_threshold=3, failure_cooldown=5))
    assert book.response("h:80", 429, None, clock.seconds()) is None
    assert book.response("h:80", 500, 10, clock.seconds()) is None
    paused = book.response("h:80", 503, 3, clock.seconds())
    assert paused is not None
    assert paused.until == 3
    assert "503" in paused.reason
    clock.advance(2.9)
    assert book.cooldown("h:80", clock.seconds()) is paused
    clock.advance(0.2)
    assert book.cooldown("h:80", clock.seconds()) is None
    capped = book.response("h:80", 429, 3600, clock.seconds())
    assert capped is not None
    assert capped.until == clock.seconds() + 60
    refused = JobError("COULDNT_CONNECT", "refused", 7)
    assert book.failure("g:80", refused, clock.seconds(), counts=True) is None
    assert book.failure("g:80", refused, clock.seconds(), counts=True) is None
    book.response("g:80", 200, None, clock.seconds())  # the run ends
    for _ in range(2):
        assert book.failure("g:80", refused, clock.seconds(), counts=True) is None
    third = book.failure("g:80", refused, clock.seconds(), counts=True)
    assert third is not None
    assert third.until == clock.seconds() + 5
    fourth = book.failure("g:80", refused, clock.seconds(), counts=True)
    assert fourth is not None
    assert fourth.until == clock.seconds() + 10
    for _ in range(10):
        book.failure("g:80", refused, clock.seconds(), counts=True)
    assert book.cooldown("g:80", clock.seconds()).until == clock.seconds() + 60  # type: ignore[union-attr]
    assert book.cooling(clock.seconds()) == 2
    clock.advance(61)
    assert book.cooling(clock.seconds()) == 0


@pytest_twisted.ensureDeferred
async def test_a_429_with_retry_after_pauses_the_whole_host(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """A 429 with ``Retry-After: 3`` pauses the host: no request reaches it for 3 s, the
    other queued jobs (and the failing job's retry) start after; another host is not
    held up; the hosts view and the metrics show the pause."""
    target, other = targets(), targets()
    target.answers["/a0"] = (429, 3)
    svc = await services(max_concurrency=8, scheduler_config={"max_per_host": 1})
    specs = [{"url": target.url(f"/a{i}"), "retry": {"backoff": 0.05}} for i in range(4)]
    reply = await svc.call("POST", "/v1/jobs", json_body={"jobs": specs})
    ids = [j["id"] for j in reply.json()["jobs"]]
    await svc.until(lambda: bool(target.hits("/a0")))
    paused_at = target.hits("/a0")[0].at
    views: list[Any] = []

    async def paused() -> bool:
        views.append((await svc.call("GET", f"/v1/hosts/{target.host}")).json())
        return views[-1]["cooldown"] is not None

    await svc.until(paused)
    assert "429" in views[-1]["cooldown"]["reason"]
    quick = await run(svc, {"url": other.url("/free")})
    assert quick["state"] == "succeeded"
    assert time.monotonic() - paused_at < 2.5  # not held behind the paused host
    jobs = [await svc.wait_job(i, 10) for i in ids]
    assert {j["state"] for j in jobs} == {"succeeded"}
    after = [s.at - paused_at for s in target.seen if s.path != "/a0" or s.at > paused_at]
    assert min(after) >= 2.9, after
    metrics = (await svc.call("GET", "/metrics")).body.decode()
    assert "curlfetch_host_cooldowns_total 1.0" in metrics


@pytest_twisted.ensureDeferred
async def test_a_pause_set_elsewhere_holds_jobs_already_waiting_here(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """Jobs claimed here and waiting for their host (its interval) are held when another
    instance pauses the host (written to the shared store): they go back to the queue
    and none is requested until the pause ends."""
    target = targets()
    svc = await services(
        max_concurrency=8,
        scheduler_config={
            "max_per_host": 1,
            "per_host_interval": 0.5,
            "cooldown_watch_interval": 0.05,
        },
    )
    reply = await svc.call(
        "POST", "/v1/jobs", json_body={"jobs": [{"url": target.url(f"/w{i}")} for i in range(4)]}
    )
    await svc.until(lambda: bool(target.seen))
    now = svc.reactor.seconds()
    paused_at = time.monotonic()
    await within(svc.store.set_cooldown(target.host, now + 2, "HTTP 429 elsewhere", now))
    jobs = [await svc.wait_job(job["id"], 10) for job in reply.json()["jobs"]]
    assert {j["state"] for j in jobs} == {"succeeded"}
    assert [j["attempts"] for j in jobs] == [1] * 4  # held, not retried
    during = [s.at - paused_at for s in target.seen if 0.2 < s.at - paused_at < 1.95]
    assert not during, during
    assert len(target.seen) == 4


@pytest_twisted.ensureDeferred
async def test_a_run_of_connect_failures_pauses_the_host(services: ServiceFactory) -> None:
    """Connect failures in a row (the threshold) pause the host; the hosts view says
    why, lists the failed jobs and the failed attempts."""
    port = refused_port()
    svc = await services(
        scheduler_config={
            "max_per_host": 1,
            "politeness": PolitenessConfig(failure_threshold=3, failure_cooldown=30),
        }
    )
    url = f"http://127.0.0.1:{port}/"
    jobs = await run_all(svc, [{"url": url, "retry": {"max_attempts": 1}}] * 3)
    assert {j["error"]["curl_name"] for j in jobs} == {"COULDNT_CONNECT"}
    host = f"127.0.0.1:{port}"
    view = (await svc.call("GET", f"/v1/hosts/{host}")).json()
    assert "3 connect failures" in view["cooldown"]["reason"]
    assert len(view["last_errors"]) == 3
    assert view["attempt_errors"][0]["code"] == "COULDNT_CONNECT"
    listing = (await svc.call("GET", "/v1/hosts")).json()["hosts"]
    assert [h["host"] for h in listing] == [host]
    assert listing[0]["recent_errors"] == {"COULDNT_CONNECT": 3}


# -- conditional fetches ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revalidation_304_reuses_the_earlier_body(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """``revalidate`` sends the earlier job's ETag; the 304 ends the job succeeded and
    ``not_modified``, its body the earlier job's (served, not stored again); a chain of
    revalidations keeps pointing at the original body; raw validators work without one."""
    target = targets()
    svc = await services()
    first = await run(svc, {"url": target.url("/page1")})
    assert (first["result"]["etag"], first["result"]["last_modified"]) == (ETAG, LAST_MODIFIED)
    assert first["result"]["not_modified"] is False
    second = await run(svc, {"url": target.url("/page1"), "revalidate": first["id"]})
    assert target.seen[-1].headers["if-none-match"] == ETAG
    assert target.seen[-1].headers["if-modified-since"] == LAST_MODIFIED
    result = second["result"]
    assert (second["state"], result["status"], result["not_modified"]) == ("succeeded", 304, True)
    assert result["body_of"] == first["id"]
    assert result["body"]["sha256"] == first["result"]["body"]["sha256"]
    assert second["request"]["if_none_match"] == ETAG
    body = await svc.call("GET", f"/v1/jobs/{second['id']}/body")
    assert body.body == b"the page /page1"
    third = await run(svc, {"url": target.url("/page1"), "revalidate": second["id"]})
    assert third["result"]["body_of"] == first["id"]
    assert third["result"]["etag"] == ETAG
    raw = await run(svc, {"url": target.url("/page2"), "if_modified_since": LAST_MODIFIED})
    assert (raw["result"]["not_modified"], raw["result"]["body"]) == (True, None)
    changed = await run(svc, {"url": target.url("/page3"), "if_none_match": '"old"'})
    assert changed["result"]["status"] == 200
    assert changed["result"]["not_modified"] is False
    # A WARC export copies the one stored record once; each 304 is a metadata record.
    export = await svc.call("GET", "/v1/jobs/export.warc")
    records = list(ArchiveIterator(io.BytesIO(export.body)))
    ids = [r.rec_headers.get_header("WARC-Record-ID") for r in records]
    assert len(ids) == len(set(ids))
    kinds = [r.rec_type for r in records]
    assert (kinds.count("response"), kinds.count("metadata")) == (2, 4)
    assert b"curlfetch-body-of: " + first["id"].encode() in export.body


@pytest_twisted.ensureDeferred
async def test_bad_revalidations_are_refused_naming_the_field(
    services: ServiceFactory, targets: TargetFactory
) -> None:
    """``revalidate`` of an unknown job, of another client's job or of one not
    succeeded is a 400 naming the field (in a list and in an NDJSON batch, the item or
    line); a validator given twice, or a date that is not an HTTP-date, too; nothing is
    accepted."""
    target = targets()
    svc = await services(tokens={"alice": "a" * 32, "bob": "b" * 32})
    mine = await run(svc, {"url": target.url("/page1")})
    failed = await run(
        svc, {"url": f"http://127.0.0.1:{refused_port()}/", "retry": {"max_attempts": 1}}
    )
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"url": target.url("/p"), "revalidate": "0" * 32}, "revalidate", None),
        ({"url": target.url("/p"), "revalidate": mine["id"]}, "revalidate", "b" * 32),
        ({"url": target.url("/p"), "revalidate": failed["id"]}, "revalidate", None),
        ({"url": target.url("/p"), "revalidate": "nope"}, "revalidate", None),
        (
            {"url": target.url("/p"), "if_none_match": ETAG, "headers": [["If-None-Match", "x"]]},
            "if_none_match",
            None,
        ),
        ({"url": target.url("/p"), "if_modified_since": "yesterday"}, "if_modified_since", None),
    ]
    for spec, field, token in cases:
        reply = await svc.submit(spec, token=token)
        assert reply.status == 400, (spec, reply)
        assert reply.error["field"] == field, reply.error
    listed = await svc.call(
        "POST",
        "/v1/jobs",
        json_body={
            "jobs": [{"url": target.url("/p")}, {"url": target.url("/p"), "revalidate": "0" * 32}]
        },
    )
    assert (listed.status, listed.error["field"]) == (400, "jobs[1].revalidate")
    lines = b'{"url": "%s"}\n{"url": "%s", "revalidate": "%s"}\n' % (
        target.url("/p").encode(),
        target.url("/p").encode(),
        b"0" * 32,
    )
    ndjson = await svc.call(
        "POST", "/v1/batches", body=lines, headers=[("Content-Type", "application/x-ndjson")]
    )
    assert (ndjson.status, ndjson.error["field"]) == (400, "line 2: revalidate")
    good = b'{"url": "%s", "revalidate": "%s"}\n' % (
        target.url("/page1").encode(),
        mine["id"].encode(),
    )
    batch = await svc.call(
        "POST", "/v1/batches", body=good, headers=[("Content-Type", "application/x-ndjson")]
    )
    assert batch.status == 201, batch
    jobs = (await svc.call("GET", f"/v1/batches/{batch.json()['id']}/jobs")).json()["jobs"]
    done = await svc.wait_job(jobs[0]["id"])
    assert done["result"]["not_modified"] is True
    listing = (await svc.call("GET", "/v1/jobs")).json()["jobs"]
    assert len(listing) == 3  # mine, failed and the batch's job: nothing else accepted


def test_the_origin_whose_robots_txt_applies() -> None:
    """A job's origin is its scheme, host and port (default ports filled in, the host
    lower-cased, an IPv6 address in brackets): what robots.txt is fetched from."""
    limits = Limits()
    origins = [
        JobSpec.from_json({"url": url}, limits).origin
        for url in ("https://A.example/x", "http://a.example:8080/", "http://[::1]:8080/r")
    ]
    assert origins == ["https://a.example:443", "http://a.example:8080", "http://[::1]:8080"]
