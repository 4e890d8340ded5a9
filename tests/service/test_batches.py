"""The batch routes against a running service: JSON and NDJSON submissions (all or
nothing, the bad line named), progress and its long-poll, the batch's jobs, cancel,
listing, a list on POST /v1/jobs making a batch, and batch filters in the exports."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import protocol

from .apiserver import Service, ServiceFactory, services, svc

__all__ = ["services", "svc"]  # fixtures

NDJSON = ("Content-Type", "application/x-ndjson")


def ndjson(*lines: object) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def refused_url(s: Service) -> str:
    port = s.reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/"
    await port.stopListening()
    return url


@pytest_twisted.ensureDeferred
async def test_a_json_batch_reports_exact_progress_until_done(svc: Service) -> None:
    """POST /v1/batches (JSON) answers 201 with the batch, all queued; ?wait returns once
    it is finished, with counts, done/total, bytes, and the failures grouped by code."""
    refused = await refused_url(svc)
    specs: list[dict[str, object]] = [{"url": svc.url(f"/bytes?n={100 + i}")} for i in range(4)]
    specs.append({"url": refused, "retry": {"max_attempts": 1}})
    reply = await svc.call(
        "POST", "/v1/batches", json_body={"jobs": specs, "metadata": {"run": "r1"}}
    )
    assert reply.status == 201, reply
    view = reply.json()
    assert reply.headers.get("location") == f"/v1/batches/{view['id']}"
    assert (view["state"], view["total"], view["done"]) == ("running", 5, 0)
    assert view["counts"]["queued"] == 5
    assert view["metadata"] == {"run": "r1"}
    reply = await svc.call("GET", f"/v1/batches/{view['id']}?wait=10", seconds=12)
    done = reply.json()
    assert done["state"] == "completed"
    assert (done["done"], done["total"]) == (5, 5)
    assert done["counts"]["succeeded"] == 4
    assert done["counts"]["failed"] == 1
    assert done["bytes"] == 100 + 101 + 102 + 103
    assert done["finished_at"] is not None
    [error] = done["errors"]
    assert error["code"] == "COULDNT_CONNECT"
    assert error["count"] == 1
    jobs = (await svc.call("GET", done["jobs_url"] + "?state=failed")).json()["jobs"]
    assert [j["id"] for j in jobs] == error["jobs"]
    assert all(j["batch"] == view["id"] for j in jobs)


@pytest_twisted.ensureDeferred
async def test_an_ndjson_batch_is_streamed_in_and_all_or_nothing(
    services: ServiceFactory,
) -> None:
    """NDJSON: a header line for metadata, then one spec per line (blank lines ignored);
    3,000 jobs in one request are stored in submission order. A bad line refuses the
    whole batch, names the line, and stores nothing."""
    svc = await services(max_queued=10_000, max_concurrency=16)
    lines: list[object] = [{"batch": {"metadata": {"src": "nd"}}}]
    lines += [{"url": svc.url("/bytes?n=10"), "metadata": {"i": i}} for i in range(3000)]
    bad = [*lines[:50], {"url": "ftp://x/"}, *lines[50:]]
    reply = await svc.call("POST", "/v1/batches", body=ndjson(*bad), headers=[NDJSON])
    assert reply.status == 400
    assert reply.error["field"] == "line 51: url"
    assert reply.error["message"].startswith("line 51: ")
    reply = await svc.call("POST", "/v1/batches", body=b'{"url": \n', headers=[NDJSON])
    assert reply.status == 400
    assert reply.error["field"] == "line 1"
    assert (await svc.call("GET", "/v1/batches")).json()["batches"] == []
    assert (await svc.call("GET", "/v1/jobs")).json()["jobs"] == []
    body = ndjson(*lines).replace(b"\n", b"\n\n", 3)
    reply = await svc.call("POST", "/v1/batches", body=body, headers=[NDJSON], seconds=30)
    assert reply.status == 201, reply
    batch = reply.json()
    assert batch["total"] == 3000
    assert batch["metadata"] == {"src": "nd"}
    done = (await svc.call("GET", f"/v1/batches/{batch['id']}?wait=60", seconds=62)).json()
    assert done["counts"]["succeeded"] == 3000
    assert done["bytes"] == 30000
    seen: list[int] = []
    cursor = ""
    while True:
        page = (await svc.call("GET", f"{done['jobs_url']}?limit=1000{cursor}")).json()
        seen += [j["metadata"]["i"] for j in page["jobs"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == list(range(2999, -1, -1))  # newest first: submission order reversed


@pytest_twisted.ensureDeferred
async def test_batch_submissions_are_refused_cleanly(services: ServiceFactory) -> None:
    """Too many JSON jobs (413), an NDJSON body over its byte limit (413), another media
    type (415), a notify without a webhook secret (400), an unknown batch (404)."""
    s = await services(max_batch=2, max_batch_bytes=1000)
    url = s.url("/bytes")
    reply = await s.call("POST", "/v1/batches", json_body={"jobs": [{"url": url}] * 3})
    assert (reply.status, reply.error["code"]) == (413, "too_many_jobs")
    big = ndjson(*[{"url": url}] * 40)
    reply = await s.call("POST", "/v1/batches", body=big, headers=[NDJSON])
    assert (reply.status, reply.error["code"]) == (413, "payload_too_large")
    reply = await s.call("POST", "/v1/batches", body=b"x", headers=[("Content-Type", "text/plain")])
    assert reply.status == 415
    hook = {"url": "http://127.0.0.1:9/hook"}
    reply = await s.call("POST", "/v1/batches", json_body={"jobs": [{"url": url}], "notify": hook})
    assert (reply.status, reply.error["code"]) == (400, "webhook_secret_missing")
    reply = await s.submit({"url": url, "notify": hook})
    assert (reply.status, reply.error["code"]) == (400, "webhook_secret_missing")
    reply = await s.call(
        "POST", "/v1/batches", json_body={"jobs": [{"url": url}], "notify": {"url": "x"}}
    )
    assert reply.status == 400
    assert reply.error["field"] == "notify.url"
    assert (await s.call("GET", "/v1/batches/" + "0" * 32)).status == 404
    assert (await s.call("GET", "/v1/jobs")).json()["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_a_list_on_post_jobs_is_a_batch(svc: Service) -> None:
    """POST /v1/jobs with a list answers the jobs and their batch id; the batch is
    listed, and the exports select it with ?batch=."""
    reply = await svc.submit({"jobs": [{"url": svc.url("/bytes")}] * 3})
    assert reply.status == 201
    batch = reply.json()["batch"]
    assert all(j["batch"] == batch for j in reply.json()["jobs"])
    await svc.submit({"url": svc.url("/bytes")})
    done = (await svc.call("GET", f"/v1/batches/{batch}?wait=10", seconds=12)).json()
    assert done["counts"]["succeeded"] == 3
    listed = (await svc.call("GET", "/v1/batches")).json()
    assert [b["id"] for b in listed["batches"]] == [batch]
    export = await svc.call("GET", f"/v1/jobs/export.ndjson?batch={batch}")
    rows = [json.loads(line) for line in export.body.splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(j["id"] for j in reply.json()["jobs"])
    assert (await svc.call("GET", "/v1/jobs/export.ndjson?batch=nope")).status == 400


@pytest_twisted.ensureDeferred
async def test_cancelling_a_batch_stops_its_transfers_and_keeps_its_results(
    services: ServiceFactory,
) -> None:
    """DELETE /v1/batches/{id}: finished jobs keep their results, queued ones are
    cancelled, running transfers are aborted at once; the batch is cancelled, and a
    second DELETE changes nothing."""
    s = await services(max_concurrency=2)
    quick = [{"url": s.url("/bytes?n=5")}]
    slow = [{"url": s.url("/delay?s=30")}] * 4
    reply = await s.call("POST", "/v1/batches", json_body={"jobs": quick})
    await s.call("GET", f"/v1/batches/{reply.json()['id']}?wait=5")
    reply = await s.call("POST", "/v1/batches", json_body={"jobs": quick + slow})
    batch = reply.json()["id"]
    await s.until(lambda: s.scheduler.in_flight == 2)
    started = s.reactor.seconds()
    reply = await s.call("DELETE", f"/v1/batches/{batch}")
    assert reply.status == 200
    view = reply.json()
    assert view["state"] == "cancelled"
    assert view["counts"]["cancelled"] >= 4
    assert view["done"] == 5
    await s.until(lambda: s.scheduler.in_flight == 0, seconds=3)
    assert s.reactor.seconds() - started < 3
    again = await s.call("DELETE", f"/v1/batches/{batch}")
    assert again.json()["counts"] == view["counts"]
    assert (await s.call("DELETE", "/v1/batches/" + "1" * 32)).status == 404
