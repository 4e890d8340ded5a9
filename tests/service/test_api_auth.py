"""Authentication, per-client isolation and quotas of the REST API over real HTTP (the
``apiserver`` harness with tokens). Only loopback traffic."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from curlfetch.api import JobAPI
from curlfetch.quotas import ClientQuotas, RateLimiter

from .apiserver import Service, ServiceFactory, services
from .test_api import raw_exchange, running

__all__ = ["services"]  # fixtures

pytestmark = pytest.mark.timeout(60)

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
TOKENS = {"alice": ALICE, "bob": BOB}
UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"


def v1_routes() -> list[tuple[str, str]]:
    """(method, path) of every /v1 route, from Klein's own map (so a new route is covered
    without editing this list); path parameters become an unknown job id."""
    routes = []
    for rule in JobAPI.app.url_map.iter_rules():
        if rule.rule.startswith("/v1/"):
            path = re.sub(r"<[^>]+>", UNKNOWN_JOB, rule.rule)
            routes += [(m, path) for m in sorted(rule.methods or ()) if m != "HEAD"]
    return routes


async def authed(services: ServiceFactory, **options: Any) -> Service:
    return await services(tokens=TOKENS, **options)


def assert_challenge(reply: Any, error: str | None) -> None:
    challenge = reply.headers.get("www-authenticate")
    expected = 'Bearer realm="curlfetch"' + (f', error="{error}"' if error else "")
    assert challenge == expected, challenge


# -- 401 / 400 ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_v1_route_needs_a_token(services: ServiceFactory) -> None:
    """With tokens configured, every /v1 route (found from the route map) answers: no
    header or Basic → 401 ``unauthorized`` with a bare Bearer challenge; an unknown token
    → 401 ``invalid_token``; a malformed Bearer header → 400 ``invalid_request``; all
    JSON in the API's error shape."""
    s = await authed(services)
    routes = v1_routes()
    assert ("POST", "/v1/jobs") in routes
    assert len(routes) >= 5
    for method, path in routes:
        for headers, status, code, error in (
            ([], 401, "unauthorized", None),
            ([("Authorization", "Basic YWxpY2U6eA==")], 401, "unauthorized", None),
            (
                [("Authorization", "Bearer nope-nope-nope-nope")],
                401,
                "invalid_token",
                "invalid_token",
            ),
            ([("Authorization", "Bearer")], 400, "invalid_request", "invalid_request"),
            ([("Authorization", "Bearer a,b")], 400, "invalid_request", "invalid_request"),
        ):
            reply = await s.call(method, path, headers=headers, anonymous=True)
            assert (reply.status, reply.error["code"]) == (status, code), (method, path, headers)
            assert reply.content_type == "application/json"
            assert_challenge(reply, error)


@pytest_twisted.ensureDeferred
async def test_health_readiness_and_the_document_stay_open(services: ServiceFactory) -> None:
    """/healthz, /readyz and /openapi.json answer 200 without a token."""
    s = await authed(services)
    for path in ("/healthz", "/readyz", "/openapi.json"):
        reply = await s.call("GET", path, anonymous=True)
        assert reply.status == 200, path
        assert reply.headers.get("www-authenticate") is None


@pytest_twisted.ensureDeferred
async def test_metrics_needs_a_token_unless_configured_open(services: ServiceFactory) -> None:
    """/metrics is token-protected by default when tokens exist (401 without, 200 with any
    client's token) and open with ``metrics_auth=False``."""
    s = await authed(services)
    assert (await s.call("GET", "/metrics", anonymous=True)).status == 401
    assert (await s.call("GET", "/metrics", token=BOB)).status == 200
    open_metrics = await authed(services, metrics_auth=False)
    assert (await open_metrics.call("GET", "/metrics", anonymous=True)).status == 200


@pytest_twisted.ensureDeferred
async def test_without_tokens_everything_is_the_anonymous_client(
    services: ServiceFactory,
) -> None:
    """No tokens configured: no header is needed, and a stray Authorization header is
    ignored (there is nothing to check it against)."""
    s = await services()
    reply = await s.submit({"url": s.url("/bytes")})
    assert reply.status == 201
    job_id = reply.json()["id"]
    stray = await s.call("GET", f"/v1/jobs/{job_id}", headers=[("Authorization", "Bearer x")])
    assert stray.status == 200
    assert (await s.store.get("", job_id)) is not None


@pytest_twisted.ensureDeferred
async def test_unauthenticated_body_is_refused_before_it_is_sent(
    services: ServiceFactory,
) -> None:
    """A POST without a token announcing a 1 GB body (Expect: 100-continue) is answered
    401 JSON with the challenge and Connection: close right after its headers: the body
    is never asked for, let alone stored."""
    s = await authed(services)
    head, body = await raw_exchange(
        s.reactor,
        s.port_number,
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"100 Continue" not in head
    assert b'www-authenticate: bearer realm="curlfetch"' in head.lower()
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert s.store.queued() == 0


# -- isolation -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_another_clients_job_is_404_everywhere(services: ServiceFactory) -> None:
    """Bob cannot see, wait on, read the body of, list or cancel Alice's job: each is 404
    (or an empty list), exactly as for a job that does not exist; Alice's job is
    untouched and she still sees it."""
    s = await authed(services)
    job = (await s.submit({"url": s.url("/bytes?n=100")}, token=ALICE)).json()
    done = await s.wait_job(job["id"], token=ALICE)
    assert done["state"] == "succeeded"
    job_path = f"/v1/jobs/{job['id']}"

    for method, path in (
        ("GET", job_path),
        ("GET", job_path + "?wait=0.2"),
        ("GET", job_path + "/body"),
        ("DELETE", job_path),
    ):
        theirs = await s.call(method, path, token=BOB)
        assert theirs.status == 404, (method, path)
        assert theirs.error["code"] == "not_found"
        unknown = await s.call(method, path.replace(job["id"], UNKNOWN_JOB), token=BOB)
        assert unknown.status == 404
        assert unknown.error["message"].replace(UNKNOWN_JOB, job["id"]) == theirs.error["message"]
    assert (await s.call("GET", "/v1/jobs", token=BOB)).json()["jobs"] == []

    mine = await s.call("GET", "/v1/jobs", token=ALICE)
    assert [j["id"] for j in mine.json()["jobs"]] == [job["id"]]
    assert (await s.call("GET", job_path + "/body", token=ALICE)).status == 200
    assert (await s.wait_job(job["id"], 0, token=ALICE))["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_another_client_cannot_cancel_a_running_job(services: ServiceFactory) -> None:
    """Bob's DELETE of Alice's running job is 404 and the transfer goes on; Alice's own
    DELETE then cancels it."""
    s = await authed(services)
    job = (await s.submit({"url": s.url("/delay?s=30")}, token=ALICE)).json()
    await running(s, job["id"])
    assert (await s.call("DELETE", f"/v1/jobs/{job['id']}", token=BOB)).status == 404
    assert s.scheduler.in_flight == 1
    assert (await s.wait_job(job["id"], 0, token=ALICE))["state"] == "running"
    reply = await s.call("DELETE", f"/v1/jobs/{job['id']}", token=ALICE)
    assert reply.json()["state"] == "cancelled"


# -- quotas --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queued_quota_is_429_with_retry_after_and_accepts_nothing(
    services: ServiceFactory,
) -> None:
    """With at most 2 queued jobs and 1 transfer per client, Alice's third waiting job (or
    a batch that would pass 2) is 429 ``quota_exceeded`` with Retry-After and nothing of
    it is stored; Bob, under his own quota, is still accepted and runs."""
    s = await authed(services, quotas=ClientQuotas(max_queued=2, max_in_flight=1))
    busy = (await s.submit({"url": s.url("/delay?s=30")}, token=ALICE)).json()
    await running(s, busy["id"])
    spec = {"url": s.url("/bytes")}
    assert (await s.submit({"jobs": [spec, spec]}, token=ALICE)).status == 201
    for payload in (spec, {"jobs": [spec]}):
        reply = await s.submit(payload, token=ALICE)
        assert reply.status == 429
        assert reply.error["code"] == "quota_exceeded"
        assert reply.headers.get("retry-after") == "3"
    assert len((await s.call("GET", "/v1/jobs", token=ALICE)).json()["jobs"]) == 3
    assert s.store.queued_for("alice") == 2

    theirs = await s.submit({"jobs": [spec, spec]}, token=BOB)
    assert theirs.status == 201
    for job in theirs.json()["jobs"]:
        assert (await s.wait_job(job["id"], token=BOB))["state"] == "succeeded"
    assert s.store.queued_for("alice") == 2  # still waiting behind her in-flight cap


@pytest_twisted.ensureDeferred
async def test_rate_quota_is_429_with_retry_after_on_a_clock(services: ServiceFactory) -> None:
    """2 jobs/s with a burst of 3, on a Clock: Alice's first three jobs pass, the fourth
    is 429 ``rate_limited`` with Retry-After 1 and is not stored; Bob has his own bucket;
    after 0.5 s one more passes; a batch of 5 passes a full bucket and the next job must
    wait 2 s (the batch's debt plus one job)."""
    s = await authed(services, quotas=ClientQuotas(rate=2, burst=3))
    clock = Clock()
    s.api.rates = RateLimiter(clock, rate=2, burst=3)
    url = s.url("/bytes")
    for _ in range(3):
        assert (await s.submit({"url": url}, token=ALICE)).status == 201
    reply = await s.submit({"url": url}, token=ALICE)
    assert reply.status == 429
    assert reply.error["code"] == "rate_limited"
    assert reply.headers.get("retry-after") == "1"
    assert len((await s.call("GET", "/v1/jobs", token=ALICE)).json()["jobs"]) == 3
    assert (await s.submit({"url": url}, token=BOB)).status == 201

    clock.advance(0.5)
    assert (await s.submit({"url": url}, token=ALICE)).status == 201
    assert (await s.submit({"url": url}, token=ALICE)).status == 429
    clock.advance(10)
    assert (await s.submit({"jobs": [{"url": url}] * 5}, token=ALICE)).status == 201
    reply = await s.submit({"url": url}, token=ALICE)
    assert reply.status == 429
    assert reply.headers.get("retry-after") == "2"


@pytest_twisted.ensureDeferred
async def test_in_flight_quota_caps_one_clients_transfers(services: ServiceFactory) -> None:
    """With 1 transfer per client (4 overall), Alice's 3 jobs run one at a time (the
    target never sees two of hers at once) while Bob's job runs beside them."""
    s = await authed(services, quotas=ClientQuotas(max_in_flight=1), max_concurrency=4)
    log = s.target.root.concurrency
    log.reset()
    alice = [
        (await s.submit({"url": s.url(f"/concurrent?s=0.3&id=a{i}")}, token=ALICE)).json()
        for i in range(3)
    ]
    await s.until(lambda: log.active == 1)
    bob = (await s.submit({"url": s.url("/concurrent?s=0.3&id=b")}, token=BOB)).json()
    await s.until(lambda: log.active == 2)
    assert s.scheduler.in_flight_for("alice") == 1
    assert s.scheduler.in_flight_for("bob") == 1
    for job in alice:
        assert (await s.wait_job(job["id"], token=ALICE))["state"] == "succeeded"
    assert (await s.wait_job(bob["id"], token=BOB))["state"] == "succeeded"
    assert log.peak == 2
    assert [i for i in log.starts if i.startswith("a")] == ["a0", "a1", "a2"]
