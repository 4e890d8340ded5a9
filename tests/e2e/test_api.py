"""The REST API of a real ``twistd -n curlfetch`` process, fetching from a loopback
target: submit, wait, results and bodies, batches, cancellation, retries, per-host
limits, backpressure, error statuses, configuration and start-up failures."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite, pattern_bytes
from .conftest import TWISTD, Daemons, sleep

pytestmark = pytest.mark.timeout(60)

JSON = [("Content-Type", "application/json")]


async def until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait (without blocking the reactor) until ``predicate()`` is true."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await sleep(0.02)


@pytest_twisted.ensureDeferred
async def test_submit_wait_and_read_result_and_body(daemons: Daemons, target: LoopbackSite) -> None:
    """A submitted job is 201 with a Location, runs once, and its view shows the status
    and the body's size and sha256; the body URL serves exactly the fetched bytes. The
    service endpoints answer too."""
    d = await daemons.start("--drain-timeout=1")
    reply = await d.post_json("/v1/jobs", {"url": target.url("/bytes?n=100000")})
    assert reply.status == 201
    job = reply.json()
    assert reply.headers.get("location") == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    done = await d.wait_state(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["result"]["status"] == 200
    expected = pattern_bytes(100000)
    body = done["result"]["body"]
    assert body["size"] == len(expected)
    assert body["sha256"] == hashlib.sha256(expected).hexdigest()
    assert body["truncated"] is False
    fetched = await d.get(body["url"])
    assert fetched.status == 200
    assert fetched.body == expected
    assert (await d.get("/healthz")).status == 200
    assert (await d.get("/readyz")).json()["status"] == "ready"
    assert b"curlfetch_jobs" in (await d.get("/metrics")).body
    assert "paths" in (await d.get("/openapi.json")).json()


@pytest_twisted.ensureDeferred
async def test_batch_submit(daemons: Daemons, target: LoopbackSite) -> None:
    """{"jobs": [...]} creates one job per spec, in order, and each one runs."""
    d = await daemons.start("--drain-timeout=1")
    sizes = [10, 2000, 30000]
    views = await d.submit_batch([{"url": target.url(f"/bytes?n={n}")} for n in sizes])
    assert len({v["id"] for v in views}) == 3
    assert [v["request"]["url"] for v in views] == [target.url(f"/bytes?n={n}") for n in sizes]
    for view, size in zip(views, sizes, strict=True):
        done = await d.wait_state(view["id"], {"succeeded", "failed"})
        assert done["result"]["body"]["size"] == size


@pytest_twisted.ensureDeferred
async def test_cancel_while_queued(daemons: Daemons, target: LoopbackSite) -> None:
    """A queued job cancelled with DELETE is cancelled and never fetched, while the job
    ahead of it finishes normally."""
    d = await daemons.start("--max-concurrency=1", "--drain-timeout=1")
    log = target.root.concurrency
    first = await d.submit({"url": target.url("/concurrent?s=1.5&id=first")})
    await until(lambda: log.active == 1, 5, "the first job to reach the target")
    queued = await d.submit({"url": target.url("/count/never")})
    assert (await d.job(queued["id"]))["state"] == "queued"
    reply = await d.request("DELETE", f"/v1/jobs/{queued['id']}")
    assert reply.status == 200
    assert reply.json()["state"] == "cancelled"
    assert (await d.wait_state(first["id"], {"succeeded"}))["attempts"] == 1
    await sleep(0.7)  # more than the scheduler's poll interval
    assert (await d.job(queued["id"]))["state"] == "cancelled"
    assert target.root.hits == {}


@pytest_twisted.ensureDeferred
async def test_cancel_while_running(daemons: Daemons, target: LoopbackSite) -> None:
    """DELETE on a running job cancels it and aborts the transfer at once (the target
    sees the connection go); it stays cancelled, and a second DELETE is a 409."""
    d = await daemons.start("--drain-timeout=1")
    log = target.root.concurrency
    job = await d.submit({"url": target.url("/concurrent?s=20&id=long")})
    await until(lambda: log.active == 1, 5, "the job to reach the target")
    assert (await d.job(job["id"]))["state"] == "running"
    reply = await d.request("DELETE", f"/v1/jobs/{job['id']}")
    assert reply.status == 200
    assert reply.json()["state"] == "cancelled"
    await until(lambda: log.active == 0, 2, "the transfer to be aborted")
    await sleep(0.3)
    view = await d.job(job["id"])
    assert view["state"] == "cancelled"
    assert view["result"] is None
    again = await d.request("DELETE", f"/v1/jobs/{job['id']}")
    assert again.status == 409
    assert log.starts == ["long"]


@pytest_twisted.ensureDeferred
async def test_retries_until_the_target_answers(daemons: Daemons, target: LoopbackSite) -> None:
    """A target that answers 503 twice and then 200 gets three attempts; the job
    succeeds with attempts == 3."""
    d = await daemons.start("--drain-timeout=1")
    job = await d.submit(
        {
            "url": target.url("/flaky/retry-me?fail=2"),
            "retry": {"max_attempts": 3, "backoff": 0.1},
        }
    )
    done = await d.wait_state(job["id"], {"succeeded", "failed"}, seconds=20)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 3
    assert done["result"]["status"] == 200
    assert len(target.root.flaky["/flaky/retry-me"]) == 3


@pytest_twisted.ensureDeferred
async def test_per_host_limit_is_what_the_target_sees(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """With --max-per-host 2, at most two requests are ever in progress at the target at
    once, though eight jobs and a higher global limit allow more."""
    d = await daemons.start("--max-per-host=2", "--max-concurrency=50", "--drain-timeout=1")
    views = await d.submit_batch(
        [{"url": target.url(f"/concurrent?s=0.4&id={i}")} for i in range(8)]
    )
    for view in views:
        await d.wait_state(view["id"], {"succeeded"}, seconds=20)
    log = target.root.concurrency
    assert sorted(log.starts) == [str(i) for i in range(8)]
    assert log.peak == 2


@pytest_twisted.ensureDeferred
async def test_backpressure_503_when_the_queue_is_full(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """With --max-queued 3 and the only slot busy, three submissions are accepted and
    the fourth (single or batch) gets 503 queue_full with Retry-After; nothing of a
    refused batch is accepted."""
    d = await daemons.start("--max-concurrency=1", "--max-queued=3", "--drain-timeout=1")
    log = target.root.concurrency
    await d.submit({"url": target.url("/concurrent?s=10&id=busy")})
    await until(lambda: log.active == 1, 5, "the first job to run")
    for i in range(3):
        await d.submit({"url": target.url(f"/count/{i}")})
    refused = await d.post_json("/v1/jobs", {"url": target.url("/count/3")})
    assert refused.status == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.headers.get("retry-after")
    batch = await d.post_json("/v1/jobs", {"jobs": [{"url": target.url("/count/4")}]})
    assert batch.status == 503
    listed = (await d.get("/v1/jobs?state=queued")).json()["jobs"]
    assert len(listed) == 3


@pytest_twisted.ensureDeferred
async def test_error_statuses(daemons: Daemons, target: LoopbackSite) -> None:
    """400, 404, 405, 409, 413 and 415 from the real process, each with a JSON error."""
    d = await daemons.start("--drain-timeout=1")

    bad_url = await d.post_json("/v1/jobs", {"url": "ftp://127.0.0.1/x"})
    assert bad_url.status == 400
    assert bad_url.json()["error"]["field"] == "url"
    bad_field = await d.post_json("/v1/jobs", {"jobs": [{"url": target.url("/"), "x": 1}]})
    assert bad_field.status == 400
    assert bad_field.json()["error"]["field"] == "jobs[0].x"
    malformed = await d.request("POST", "/v1/jobs", b'{"url": ', JSON)
    assert malformed.status == 400

    assert (await d.get("/v1/jobs/0123456789abcdef")).status == 404
    assert (await d.get("/no/such/thing")).status == 404

    not_allowed = await d.request("PUT", "/v1/jobs", b"{}", JSON)
    assert not_allowed.status == 405
    assert "POST" in not_allowed.headers.get("allow")

    done = await d.submit({"url": target.url("/bytes?n=1")})
    await d.wait_state(done["id"], {"succeeded"})
    conflict = await d.request("DELETE", f"/v1/jobs/{done['id']}")
    assert conflict.status == 409
    assert conflict.json()["error"]["code"] == "conflict"

    too_large = await d.request("POST", "/v1/jobs", b" " * (17 * 1024 * 1024), JSON)
    assert too_large.status == 413
    too_many = await d.post_json("/v1/jobs", {"jobs": [{"url": target.url("/")}] * 1001})
    assert too_many.status == 413

    wrong_type = await d.request(
        "POST",
        "/v1/jobs",
        json.dumps({"url": target.url("/")}).encode(),
        [("Content-Type", "text/plain")],
    )
    assert wrong_type.status == 415
    assert wrong_type.json()["error"]["code"] == "unsupported_media_type"


@pytest_twisted.ensureDeferred
async def test_environment_configures_json_logs(daemons: Daemons) -> None:
    """Options come from CURLFETCH_* variables; CURLFETCH_LOG_FORMAT=json makes every
    line the process writes to stdout a JSON object with a rendered message."""
    d = daemons.make(env={"CURLFETCH_LOG_FORMAT": "json", "CURLFETCH_MAX_PER_HOST": "3"})
    await d.start()
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    assert any("max_per_host=3 " in m for m in messages), messages
    assert any(m.startswith("curlfetch ready on") for m in messages), messages
    assert {line["level"] for line in lines} <= {"debug", "info", "warn", "error", "critical"}


def test_bad_option_is_a_usage_error() -> None:
    """twistd exits non-zero with a message naming the bad option (and its variable)."""
    env = {"CURLFETCH_MAX_QUEUED": "none"}
    run = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "curlfetch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert run.returncode != 0
    assert "--max-queued (from CURLFETCH_MAX_QUEUED): must be a whole number" in run.stdout


@pytest_twisted.ensureDeferred
async def test_start_up_failure_exits_1(daemons: Daemons, target: LoopbackSite) -> None:
    """When the port is taken the process logs why and exits with 1, not 0."""
    d = daemons.make(f"--listen=tcp:{target.port_number}:interface=127.0.0.1")
    d.spawn()
    assert await d.wait_exit(15) == 1
    assert "curlfetch could not start" in d.log()
    assert "Address already in use" in d.log()
