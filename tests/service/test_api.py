"""The REST API v1 over real HTTP: ``JobAPI.site()`` on 127.0.0.1, a real SQLite store, a
real scheduler and engine, and a loopback target. Only loopback traffic."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from curlfetch.engine import CurlTimeoutError
from curlfetch.metrics import METRIC_NAMES
from tests.engine.servers import pattern_bytes

from .apiserver import Service, ServiceFactory, services, sleep, svc

__all__ = ["services", "svc"]  # fixtures

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


async def closed_port_url(service: Service) -> str:
    """A loopback URL nothing listens on (connection refused at once)."""
    port = service.reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}/"


async def running(service: Service, job_id: str) -> None:
    async def check() -> bool:
        reply = await service.call("GET", f"/v1/jobs/{job_id}")
        state: str = reply.json()["state"]
        return state == "running"

    await service.until(check)


# -- submit, wait, result, body ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_submit_then_wait_then_result_and_body(svc: Service) -> None:
    """POST answers 201 with the queued job view and its Location; ``?wait=5`` returns
    it succeeded with the result; /body serves the stored bytes with the original
    Content-Type and the sha256 as ETag (If-None-Match gives 304)."""
    reply = await svc.submit({"url": svc.url("/bytes?n=5000"), "metadata": {"k": [1, "x"]}})
    assert reply.status == 201
    assert reply.content_type == "application/json"
    job = reply.json()
    assert reply.headers.get("location") == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    assert RFC3339_UTC.match(job["created_at"])
    assert job["finished_at"] is None
    assert job["result"] is None
    assert job["error"] is None
    assert job["metadata"] == {"k": [1, "x"]}
    assert job["request"]["url"] == svc.url("/bytes?n=5000")
    assert job["request"]["method"] == "GET"

    done = await svc.wait_job(job["id"])
    assert done["state"] == "succeeded"
    assert done["attempts"] == 1
    assert RFC3339_UTC.match(done["started_at"])
    assert RFC3339_UTC.match(done["finished_at"])
    expected = pattern_bytes(5000)
    digest = hashlib.sha256(expected).hexdigest()
    result = done["result"]
    assert result["status"] == 200
    warc = result["body"].pop("warc")
    assert result["body"] == {
        "size": 5000,
        "sha256": digest,
        "url": f"/v1/jobs/{job['id']}/body",
        "truncated": False,
    }
    # The record's place: the payload is the last 5000 bytes before the 4-byte trailer.
    assert warc["segment"].endswith(".warc")
    assert warc["offset"] > 0  # after the segment's warcinfo record
    assert warc["length"] == warc["payload_at"] + 5000 + 4

    body = await svc.call("GET", result["body"]["url"])
    assert body.status == 200
    assert body.body == expected
    assert body.content_type == "text/html"  # what the target sent
    assert body.headers.get("etag") == f'"{digest}"'
    assert body.headers.get("x-content-type-options") == "nosniff"
    cached = await svc.call(
        "GET", result["body"]["url"], headers=[("If-None-Match", f'"{digest}"')]
    )
    assert cached.status == 304
    assert cached.body == b""


@pytest_twisted.ensureDeferred
async def test_body_keeps_the_original_content_type(svc: Service) -> None:
    """A body is served with the Content-Type the target sent (here application/json from
    /echo), byte for byte."""
    reply = await svc.submit({"url": svc.url("/echo"), "method": "POST", "body": "hello"})
    done = await svc.wait_job(reply.json()["id"])
    body = await svc.call("GET", done["result"]["body"]["url"])
    assert body.content_type == "application/json"
    assert body.json()["body"] == "hello"
    assert hashlib.sha256(body.body).hexdigest() == done["result"]["body"]["sha256"]


@pytest_twisted.ensureDeferred
async def test_failed_job_shows_the_curl_error(svc: Service) -> None:
    """A transfer that fails ends ``failed`` with ``error`` = curl's code and name, no
    result, and /body answers 404 JSON."""
    url = await closed_port_url(svc)
    reply = await svc.submit({"url": url, "retry": {"max_attempts": 1}})
    done = await svc.wait_job(reply.json()["id"])
    assert done["state"] == "failed"
    assert done["result"] is None
    error = done["error"]
    assert error["code"] == "curl_error"
    assert error["curl_code"] == 7
    assert error["curl_name"] == "COULDNT_CONNECT"
    assert error["message"]
    body = await svc.call("GET", f"/v1/jobs/{done['id']}/body")
    assert body.status == 404
    assert body.error["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_wait_returns_as_soon_as_the_job_finishes(services: ServiceFactory) -> None:
    """A long-poll is woken by the scheduler's finished attempt, not by the slow fallback
    timer: with a 10 s fallback, a 0.3 s job answers well within 2 s."""
    service = await services(poll_interval=10.0)
    job = (await service.submit({"url": service.url("/delay?s=0.3")})).json()
    started = service.reactor.seconds()
    done = await service.wait_job(job["id"], seconds=8)
    elapsed = service.reactor.seconds() - started
    assert done["state"] == "succeeded"
    assert elapsed < 2.0, elapsed


@pytest_twisted.ensureDeferred
async def test_wait_gives_up_after_n_seconds_with_the_current_state(svc: Service) -> None:
    """``?wait=0.3`` on a job that takes longer answers after about 0.3 s with the job as
    it is (running), 200."""
    job = (await svc.submit({"url": svc.url("/delay?s=10")})).json()
    started = svc.reactor.seconds()
    reply = await svc.call("GET", f"/v1/jobs/{job['id']}?wait=0.3")
    elapsed = svc.reactor.seconds() - started
    assert reply.status == 200
    assert reply.json()["state"] in ("queued", "running")
    assert 0.25 <= elapsed < 3.0, elapsed


@pytest_twisted.ensureDeferred
async def test_disconnected_long_poll_releases_its_waiter(svc: Service) -> None:
    """A client that gives up on a long-poll (here: its 0.3 s timeout) cancels the
    server's waiter: none is left registered."""
    job = (await svc.submit({"url": svc.url("/delay?s=10")})).json()
    d = svc.http.fetch(svc.base + f"/v1/jobs/{job['id']}?wait=30", timeout=0.3)
    await svc.until(lambda: svc.api.waiters.sleeping == 1)
    with pytest.raises(CurlTimeoutError):
        await d
    await svc.until(lambda: len(svc.api.waiters) == 0)


@pytest_twisted.ensureDeferred
async def test_draining_answers_long_polls_at_once(svc: Service) -> None:
    """``start_draining()`` releases every long-poll: a ``?wait=30`` answers promptly
    with the job's current state."""
    job = (await svc.submit({"url": svc.url("/delay?s=10")})).json()
    poll = Deferred.fromCoroutine(svc.call("GET", f"/v1/jobs/{job['id']}?wait=30"))
    await svc.until(lambda: svc.api.waiters.sleeping == 1)
    started = svc.reactor.seconds()
    svc.api.start_draining()
    reply = await poll
    assert reply.status == 200
    assert reply.json()["state"] in ("queued", "running")
    assert svc.reactor.seconds() - started < 2.0


# -- batches -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_batch_submit_returns_jobs_in_submission_order(svc: Service) -> None:
    """``{"jobs": [...]}`` answers 201 with ``{"jobs": [...]}`` in the order submitted,
    Location pointing at the first job; the list shows them newest (last) first; every
    job runs."""
    specs = [{"url": svc.url(f"/bytes?n={10 + i}"), "metadata": {"i": i}} for i in range(5)]
    reply = await svc.submit({"jobs": specs})
    assert reply.status == 201
    jobs = reply.json()["jobs"]
    assert [j["metadata"]["i"] for j in jobs] == list(range(5))
    assert [j["request"]["url"] for j in jobs] == [s["url"] for s in specs]
    assert reply.headers.get("location") == f"/v1/jobs/{jobs[0]['id']}"
    listed = (await svc.call("GET", "/v1/jobs")).json()["jobs"]
    assert [j["id"] for j in listed] == [j["id"] for j in reversed(jobs)]  # newest first
    for i, job in enumerate(jobs):
        done = await svc.wait_job(job["id"])
        assert done["result"]["body"]["size"] == 10 + i


@pytest_twisted.ensureDeferred
async def test_batch_validation_is_all_or_nothing(svc: Service) -> None:
    """One invalid spec in a batch rejects the whole batch with 400 naming it
    (``jobs[3].headers[2]``), and no job is stored."""
    specs: list[dict[str, Any]] = [{"url": svc.url("/bytes")} for _ in range(5)]
    specs[3]["headers"] = [["X-A", "1"], ["X-B", "2"], ["X-C", "bad\r\nvalue"]]
    reply = await svc.submit({"jobs": specs})
    assert reply.status == 400
    assert reply.error["code"] == "invalid_request"
    assert reply.error["field"] == "jobs[3].headers[2]"
    listed = await svc.call("GET", "/v1/jobs")
    assert listed.json() == {"jobs": [], "next_cursor": None}


@pytest_twisted.ensureDeferred
async def test_batch_errors_name_the_item(svc: Service) -> None:
    """A non-object item is named by its index alone; an empty batch or extra top-level
    keys are 400 naming the key."""
    reply = await svc.submit({"jobs": [{"url": svc.url("/")}, "nope"]})
    assert (reply.status, reply.error["field"]) == (400, "jobs[1]")
    reply = await svc.submit({"jobs": []})
    assert (reply.status, reply.error["field"]) == (400, "jobs")
    reply = await svc.submit({"jobs": [{"url": svc.url("/")}], "extra": 1})
    assert (reply.status, reply.error["field"]) == (400, "extra")


@pytest_twisted.ensureDeferred
async def test_too_many_specs_is_413_naming_the_limit(services: ServiceFactory) -> None:
    """A batch over the limit (here 3) is refused whole with 413 ``too_many_jobs``,
    ``field: jobs``, and the limit in the message."""
    service = await services(max_batch=3)
    reply = await service.submit({"jobs": [{"url": service.url("/")}] * 4})
    assert reply.status == 413
    assert reply.error["code"] == "too_many_jobs"
    assert reply.error["field"] == "jobs"
    assert "3" in reply.error["message"]
    assert (await service.call("GET", "/v1/jobs")).json()["jobs"] == []


# -- 400, 404, 405, 409, 413, 415 ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(svc: Service) -> None:
    """Bodies that are not JSON (or not UTF-8, or use NaN) are 400 invalid_request."""
    for body in (b"{", b"\xff\xfe", b'{"url": NaN}', b"[" * 100_000):
        reply = await svc.call(
            "POST", "/v1/jobs", body=body, headers=[("Content-Type", "application/json")]
        )
        assert reply.status == 400, body[:10]
        assert reply.content_type == "application/json"
        assert reply.error["code"] == "invalid_request"


@pytest_twisted.ensureDeferred
async def test_invalid_specs_are_400_naming_the_field(svc: Service) -> None:
    """Validation errors name the field: an unknown field, a CR/LF in a header value, a
    missing URL, a bad scheme."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": svc.url("/"), "bogus": 1}, "bogus"),
        ({"url": svc.url("/"), "headers": [["X-A", "a\r\nInjected: 1"]]}, "headers[0]"),
        ({"url": svc.url("/"), "headers": [["X-A", "1"], ["X-B", "b\nc"]]}, "headers[1]"),
        ({"method": "GET"}, "url"),
        ({"url": "ftp://127.0.0.1/"}, "url"),
        ({"url": svc.url("/"), "retry": {"max_attempts": 0}}, "retry.max_attempts"),
    ]
    for spec, field in cases:
        reply = await svc.submit(spec)
        assert reply.status == 400, spec
        assert reply.error["field"] == field, (spec, reply.error)
        assert reply.error["message"]
    reply = await svc.submit([1, 2])
    assert reply.status == 400
    assert "field" not in reply.error


@pytest_twisted.ensureDeferred
async def test_bad_wait_is_400(svc: Service) -> None:
    """``wait`` must be a number >= 0: words, negatives, NaN and infinity are 400 naming
    ``wait`` (checked before the job is even looked up)."""
    job = (await svc.submit({"url": svc.url("/bytes")})).json()
    for value in ("abc", "-1", "nan", "inf", ""):
        reply = await svc.call("GET", f"/v1/jobs/{job['id']}?wait={value}")
        assert reply.status == 400, value
        assert reply.error["field"] == "wait"
    reply = await svc.call("GET", "/v1/jobs/unknown?wait=soon")
    assert reply.status == 400


@pytest_twisted.ensureDeferred
async def test_unknown_job_and_unknown_route_are_404_json(svc: Service) -> None:
    """Unknown job ids (GET, DELETE, /body) and unknown paths answer 404 with the JSON
    error body."""
    for method, path in (
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/body"),
        ("GET", "/v1/jobs/../../etc/passwd/body"),
        ("GET", "/nope"),
        ("GET", "/v2/jobs"),
        ("POST", "/v1/jobs/x/y/z"),
    ):
        reply = await svc.call(method, path)
        assert reply.status == 404, path
        assert reply.content_type == "application/json"
        assert reply.error["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(svc: Service) -> None:
    """A known path with an unsupported method answers 405 JSON with Allow."""
    for method, path, allowed in (
        ("PUT", "/v1/jobs", {"GET", "HEAD", "POST"}),
        ("POST", "/v1/jobs/abc", {"GET", "HEAD", "DELETE"}),
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("POST", "/metrics", {"GET", "HEAD"}),
    ):
        reply = await svc.call(method, path)
        assert reply.status == 405, path
        assert reply.error["code"] == "method_not_allowed"
        allow = reply.headers.get("allow") or ""
        assert {m.strip() for m in allow.split(",")} == allowed


@pytest_twisted.ensureDeferred
async def test_deleting_a_finished_job_is_409(svc: Service) -> None:
    """DELETE on a terminal job answers 409 conflict and leaves it as it was."""
    job = (await svc.submit({"url": svc.url("/bytes?n=10")})).json()
    done = await svc.wait_job(job["id"])
    assert done["state"] == "succeeded"
    reply = await svc.call("DELETE", f"/v1/jobs/{job['id']}")
    assert reply.status == 409
    assert reply.error["code"] == "conflict"
    assert (await svc.wait_job(job["id"], 0))["state"] == "succeeded"


class _RawHTTP(protocol.Protocol):
    """Sends bytes, collects the answer until the response is complete or the connection
    closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        if sep and match and len(body) >= int(match.group(1)) and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.data)


async def raw_exchange(reactor: Any, port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` as raw bytes to the API on 127.0.0.1:``port``; return the
    response's head and body (for what an HTTP client library would not send)."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    raw = _RawHTTP(request)
    await endpoints.connectProtocol(endpoint, raw)
    try:
        data = await raw.done.addTimeout(5, reactor)
    finally:
        assert raw.transport is not None
        raw.transport.loseConnection()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@pytest_twisted.ensureDeferred
async def test_oversize_content_length_is_413_before_the_body_is_sent(
    services: ServiceFactory,
) -> None:
    """A Content-Length over the cap is answered 413 JSON (Connection: close) right after
    the headers: the client never sends a byte of the body."""
    service = await services(max_request_bytes=64 * 1024)
    head, body = await raw_exchange(
        service.reactor,
        service.port_number,
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"100 Continue" not in head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "payload_too_large"


@pytest_twisted.ensureDeferred
async def test_oversize_bodies_are_413(services: ServiceFactory) -> None:
    """A body over the cap is 413 whether it is announced by Content-Length (sent by
    curl anyway) or chunked; nothing is accepted, and a body under the cap still works."""
    service = await services(max_request_bytes=64 * 1024)
    spec = {"url": service.url("/bytes"), "metadata": {"pad": "x" * 200_000}}
    reply = await service.submit(spec)
    assert reply.status == 413
    assert reply.error["code"] == "payload_too_large"

    reply = await service.call(
        "POST",
        "/v1/jobs",
        body=json.dumps(spec).encode(),
        headers=[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
    )
    assert reply.status == 413
    assert reply.error["code"] == "payload_too_large"
    assert (await service.call("GET", "/v1/jobs")).json()["jobs"] == []
    assert (await service.submit({"url": service.url("/bytes")})).status == 201


@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(svc: Service) -> None:
    """POST without ``Content-Type: application/json`` (missing, text/plain, form) is 415;
    ``application/json; charset=utf-8`` is fine."""
    body = json.dumps({"url": svc.url("/bytes")}).encode()
    for headers in (
        [],
        [("Content-Type", "text/plain")],
        [("Content-Type", "application/x-www-form-urlencoded")],
    ):
        reply = await svc.call("POST", "/v1/jobs", body=body, headers=headers)
        assert reply.status == 415, headers
        assert reply.error["code"] == "unsupported_media_type"
    reply = await svc.call(
        "POST", "/v1/jobs", body=body, headers=[("Content-Type", "application/json; charset=utf-8")]
    )
    assert reply.status == 201


# -- cancel ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_a_queued_job(services: ServiceFactory) -> None:
    """With the only transfer slot busy, a second job waits queued; DELETE makes it
    cancelled (200 with the view), it never runs, and a second DELETE is 409."""
    service = await services(max_concurrency=1)
    busy = (await service.submit({"url": service.url("/delay?s=30")})).json()
    await running(service, busy["id"])
    queued = (await service.submit({"url": service.url("/count")})).json()
    assert (await service.wait_job(queued["id"], 0))["state"] == "queued"

    reply = await service.call("DELETE", f"/v1/jobs/{queued['id']}")
    assert reply.status == 200
    view = reply.json()
    assert view["state"] == "cancelled"
    assert RFC3339_UTC.match(view["finished_at"])
    assert view["attempts"] == 0
    again = await service.call("DELETE", f"/v1/jobs/{queued['id']}")
    assert again.status == 409
    assert service.target.root.hits == {}


@pytest_twisted.ensureDeferred
async def test_cancel_a_running_job_aborts_the_transfer(svc: Service) -> None:
    """DELETE on a running job answers 200 cancelled and aborts the transfer at once: the
    target sees the client disconnect, and the job stays cancelled."""
    log = svc.target.root.concurrency
    log.reset()
    job = (await svc.submit({"url": svc.url("/concurrent?s=30&id=a")})).json()
    await svc.until(lambda: log.active == 1)
    reply = await svc.call("DELETE", f"/v1/jobs/{job['id']}")
    assert reply.status == 200
    assert reply.json()["state"] == "cancelled"
    await svc.until(lambda: log.active == 0, seconds=2.0)
    assert svc.scheduler.in_flight == 0
    await sleep(0.2)
    after = await svc.wait_job(job["id"], 0)
    assert after["state"] == "cancelled"
    assert after["result"] is None


# -- list --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_is_newest_first_with_cursor_pagination(svc: Service) -> None:
    """GET /v1/jobs pages newest first; following ``next_cursor`` visits every job once,
    and the last page has ``next_cursor: null``."""
    ids = []
    for i in range(5):
        ids.append((await svc.submit({"url": svc.url(f"/bytes?n={i + 1}")})).json()["id"])
        await sleep(0.003)  # distinct milliseconds: ids sort by creation time
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        reply = await svc.call("GET", "/v1/jobs" + query)
        assert reply.status == 200
        page = reply.json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert pages == 3


@pytest_twisted.ensureDeferred
async def test_list_filters_by_state(svc: Service) -> None:
    """``?state=`` keeps only jobs in that state."""
    refused = await closed_port_url(svc)
    good = [(await svc.submit({"url": svc.url("/bytes")})).json()["id"] for _ in range(3)]
    bad = [
        (await svc.submit({"url": refused, "retry": {"max_attempts": 1}})).json()["id"]
        for _ in range(2)
    ]
    for job_id in good + bad:
        await svc.wait_job(job_id)
    succeeded = (await svc.call("GET", "/v1/jobs?state=succeeded")).json()
    failed = (await svc.call("GET", "/v1/jobs?state=failed")).json()
    assert {j["id"] for j in succeeded["jobs"]} == set(good)
    assert {j["id"] for j in failed["jobs"]} == set(bad)
    assert all(j["state"] == "failed" for j in failed["jobs"])
    assert (await svc.call("GET", "/v1/jobs?state=queued")).json()["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_list_rejects_bad_parameters(svc: Service) -> None:
    """Bad ``state``, ``limit`` and ``cursor`` are 400 naming the parameter."""
    for query, field in (
        ("state=done", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=%C2%B2", "limit"),
        ("cursor=a%20b", "cursor"),
    ):
        reply = await svc.call("GET", f"/v1/jobs?{query}")
        assert reply.status == 400, query
        assert reply.error["field"] == field


# -- backpressure, health, draining, metrics ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backpressure_503_with_retry_after_accepts_nothing(
    services: ServiceFactory,
) -> None:
    """With ``max_queued=2`` and the only slot busy, two jobs may wait; a third (or a
    batch that would pass the limit) is 503 ``queue_full`` with Retry-After, and nothing
    of it is stored."""
    service = await services(max_queued=2, max_concurrency=1)
    busy = (await service.submit({"url": service.url("/delay?s=30")})).json()
    await running(service, busy["id"])
    spec = {"url": service.url("/bytes")}
    assert (await service.submit({"jobs": [spec, spec]})).status == 201
    for payload in (spec, {"jobs": [spec]}):
        reply = await service.submit(payload)
        assert reply.status == 503
        assert reply.error["code"] == "queue_full"
        assert reply.headers.get("retry-after") == "3"
    jobs = (await service.call("GET", "/v1/jobs")).json()["jobs"]
    assert len(jobs) == 3


@pytest_twisted.ensureDeferred
async def test_a_batch_larger_than_the_queue_limit_is_refused(
    services: ServiceFactory,
) -> None:
    """A batch that alone exceeds ``max_queued`` is refused whole with 503."""
    service = await services(max_queued=2)
    reply = await service.submit({"jobs": [{"url": service.url("/bytes")}] * 3})
    assert reply.status == 503
    assert reply.headers.get("retry-after") is not None
    assert (await service.call("GET", "/v1/jobs")).json()["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_healthz_readyz_and_draining(svc: Service) -> None:
    """healthz and readyz are 200 when up; after ``start_draining()`` readyz is 503 at
    once and POST is 503 ``draining`` with Retry-After, while healthz and reads work."""
    assert (await svc.call("GET", "/healthz")).json() == {"status": "ok"}
    ready = await svc.call("GET", "/readyz")
    assert (ready.status, ready.json()) == (200, {"status": "ready"})
    job = (await svc.submit({"url": svc.url("/bytes")})).json()

    svc.api.start_draining()
    assert svc.api.draining
    ready = await svc.call("GET", "/readyz")
    assert ready.status == 503
    assert ready.json()["status"] == "draining"
    reply = await svc.submit({"url": svc.url("/bytes")})
    assert reply.status == 503
    assert reply.error["code"] == "draining"
    assert reply.headers.get("retry-after") == "3"
    assert (await svc.call("GET", "/healthz")).status == 200
    assert (await svc.call("GET", f"/v1/jobs/{job['id']}")).status == 200


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_when_the_store_is_down(svc: Service) -> None:
    """With the store closed, readyz is 503 ``unavailable`` and job routes answer 503
    ``store_unavailable`` with Retry-After, not 500."""
    await svc.store.close()
    ready = await svc.call("GET", "/readyz")
    assert ready.status == 503
    assert ready.json()["status"] == "unavailable"
    reply = await svc.call("GET", "/v1/jobs/0123")
    assert reply.status == 503
    assert reply.error["code"] == "store_unavailable"
    assert reply.headers.get("retry-after") == "3"


@pytest_twisted.ensureDeferred
async def test_metrics_after_jobs_ran(svc: Service) -> None:
    """/metrics is Prometheus text with every documented family, reflecting a job that
    succeeded (bytes, duration, jobs by state) and one that failed (curl error name)."""
    ok = (await svc.submit({"url": svc.url("/bytes?n=5000")})).json()
    refused = await closed_port_url(svc)
    bad = (await svc.submit({"url": refused, "retry": {"max_attempts": 1}})).json()
    await svc.wait_job(ok["id"])
    await svc.wait_job(bad["id"])
    await sleep(0.25)  # let the reactor-lag probe tick
    reply = await svc.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    text = reply.body.decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'curlfetch_jobs{state="succeeded"} 1.0' in text
    assert 'curlfetch_jobs{state="failed"} 1.0' in text
    assert "curlfetch_jobs_submitted_total 2.0" in text
    assert "curlfetch_downloaded_bytes_total 5000.0" in text
    assert "curlfetch_body_records_total 1.0" in text  # the one body, in one group
    assert "curlfetch_body_groups_total 1.0" in text
    assert re.search(r"^curlfetch_body_bytes_total 5\d\d\d\.0", text, re.M)  # record > body
    assert 'curlfetch_curl_errors_total{name="COULDNT_CONNECT"} 1.0' in text
    assert 'curlfetch_fetch_duration_seconds_count{outcome="response"} 1.0' in text
    assert "curlfetch_transfers_in_flight 0.0" in text
    assert "curlfetch_queue_depth 0.0" in text
    assert re.search(r"^curlfetch_reactor_lag_seconds \d", text, re.M)
