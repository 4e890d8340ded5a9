"""Webhooks against a running service and a real receiver: Standard Webhooks signatures
that the reference library verifies, the events a notify names (on a job, on a batch),
retries spaced by the backoff and by Retry-After, a delivery that runs out of retries
failing visibly and retried by hand, the egress policy at connect time, and the secret
shown once."""

from __future__ import annotations

import itertools
import json

import pytest_twisted
from standardwebhooks.webhooks import Webhook

from curlfetch.egress import EgressPolicy
from curlfetch.webhooks import new_secret, sign

from .apiserver import Service, ServiceFactory, services, svc
from .receiver import Receiver

__all__ = ["services", "svc"]  # fixtures

ALICE = "alice-token-0123456789abcdef"


async def secret_of(s: Service) -> str:
    reply = await s.call("POST", "/v1/webhooks/secret")
    assert reply.status == 201
    secret: str = reply.json()["secret"]
    return secret


def test_signatures_match_the_reference_library() -> None:
    """sign() makes what standardwebhooks' Webhook.verify accepts, and a changed body,
    id or timestamp does not verify."""
    import time

    secret = new_secret()
    body = b'{"type":"job.succeeded"}'
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    for changed in (
        (body + b" ", headers),
        (body, {**headers, "webhook-id": "msg_2"}),
        (body, {**headers, "webhook-timestamp": str(now + 1)}),
    ):
        try:
            Webhook(secret).verify(*changed)
        except Exception:
            continue
        raise AssertionError(f"verified a changed message: {changed}")


@pytest_twisted.ensureDeferred
async def test_job_and_batch_webhooks_are_signed_and_say_what_happened(svc: Service) -> None:
    """A batch notify for batch.completed and job.failed, and a job's own notify: each
    event the notify names is delivered once, signed with the client's secret (the
    reference library verifies it), with a stable webhook-id per delivery."""
    receiver = Receiver(svc.reactor)
    try:
        secret = await secret_of(svc)
        own = {"url": receiver.url("/own"), "events": ["job.succeeded"]}
        jobs = [{"url": svc.url("/bytes?n=7"), "notify": own}, {"url": svc.url("/bytes")}]
        notify = {"url": receiver.url("/batch"), "events": ["batch.completed", "job.failed"]}
        reply = await svc.call("POST", "/v1/batches", json_body={"jobs": jobs, "notify": notify})
        assert reply.status == 201, reply
        batch = reply.json()["id"]
        await svc.until(lambda: len(receiver.received) >= 2)
        await svc.call("GET", "/v1/batches/" + batch + "?wait=1")
        paths = sorted(r.path for r in receiver.received)
        assert paths == ["/batch", "/own"]
        for got in receiver.received:
            message = Webhook(secret).verify(got.body, got.headers)
            assert got.headers["webhook-id"].startswith("msg_")
            assert got.headers["content-type"] == "application/json"
            if got.path == "/own":
                assert message["type"] == "job.succeeded"
                assert message["data"]["job"]["body"]["size"] == 7
            else:
                assert message["type"] == "batch.completed"
                assert message["data"]["batch"]["counts"]["succeeded"] == 2
        listed = (await svc.call("GET", "/v1/webhooks/deliveries?status=succeeded")).json()
        assert len(listed["deliveries"]) == 2
        assert all(d["attempts"] == 1 for d in listed["deliveries"])
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_receiver_gets_retries_spaced_by_the_backoff(
    services: ServiceFactory,
) -> None:
    """A receiver that answers 500 three times, then 204: four attempts, the waits in
    [b/2, b], [b, 2b], [2b, 4b] (b = 0.4 s, with a little slack for the poll), the same
    webhook-id each time; the delivery's log shows every attempt."""
    s = await services(webhook_backoff=0.4)
    receiver = Receiver(s.reactor, lambda n, r: (500 if n < 3 else 204, {}))
    try:
        secret = await secret_of(s)
        hook = {"url": receiver.url(), "events": ["job.succeeded"]}
        await s.submit({"url": s.url("/bytes"), "notify": hook})
        await s.until(lambda: len(receiver.received) == 4, seconds=10)
        times = [r.at for r in receiver.received]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, full in zip(gaps, (0.4, 0.8, 1.6), strict=True):
            assert full / 2 - 0.02 <= gap <= full + 0.15, gaps
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
        for r in receiver.received:
            Webhook(secret).verify(r.body, r.headers)
        [d] = (await s.call("GET", "/v1/webhooks/deliveries")).json()["deliveries"]
        reply = await s.call("GET", f"/v1/webhooks/deliveries/{d['id']}")
        view = reply.json()
        assert view["status"] == "succeeded"
        assert [a.get("status") for a in view["log"]] == [500, 500, 500, 204]
        assert all("retry_at" in a for a in view["log"][:3])
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_retry_after_is_honoured(services: ServiceFactory) -> None:
    """A 503 with Retry-After: 2 delays the next attempt by at least 2 s (the backoff
    alone would wait under 0.2 s)."""
    s = await services(webhook_backoff=0.1)
    receiver = Receiver(
        s.reactor, lambda n, r: (503, {"Retry-After": "2"}) if n == 0 else (200, {})
    )
    try:
        await secret_of(s)
        await s.submit({"url": s.url("/bytes"), "notify": {"url": receiver.url()}})
        await s.until(lambda: len(receiver.received) == 2, seconds=8)
        assert receiver.received[1].at - receiver.received[0].at >= 1.95
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_out_of_retries_fails_visibly_and_can_be_retried(services: ServiceFactory) -> None:
    """Past the horizon a delivery fails for good: listed with ?status=failed, with its
    last error, counted by the metric; POST .../retry sends it again, now delivered."""
    s = await services(webhook_backoff=0.2, webhook_horizon=1.0)
    answer = {"status": 500}
    receiver = Receiver(s.reactor, lambda n, r: (answer["status"], {}))
    try:
        await s.call("POST", "/v1/webhooks/secret")
        await s.submit({"url": s.url("/bytes"), "notify": {"url": receiver.url()}})

        async def failed() -> bool:
            reply = await s.call("GET", "/v1/webhooks/deliveries?status=failed")
            return len(reply.json()["deliveries"]) == 1

        await s.until(failed, seconds=10)
        [d] = (await s.call("GET", "/v1/webhooks/deliveries?status=failed")).json()["deliveries"]
        assert d["last_error"] == "http_status: the receiver answered 500"
        assert d["attempts"] == len(receiver.received) >= 2
        metrics = (await s.call("GET", "/metrics")).body.decode()
        assert 'curlfetch_webhook_deliveries_total{outcome="failed"} 1.0' in metrics
        answer["status"] = 204
        reply = await s.call("POST", f"/v1/webhooks/deliveries/{d['id']}/retry")
        assert (reply.status, reply.json()["status"]) == (200, "pending")
        await s.until(lambda: len(receiver.received) == d["attempts"] + 1)

        async def delivered() -> bool:
            view = (await s.call("GET", f"/v1/webhooks/deliveries/{d['id']}")).json()
            return bool(view["status"] == "succeeded")

        await s.until(delivered)
        again = await s.call("POST", f"/v1/webhooks/deliveries/{d['id']}/retry")
        assert again.status == 409
        unknown = await s.call("POST", "/v1/webhooks/deliveries/msg_nope/retry")
        assert unknown.status == 404
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_webhooks_obey_the_egress_policy_at_connect_time(services: ServiceFactory) -> None:
    """Under the default egress policy, a webhook to loopback, in every spelling that
    submission accepts, fails at once with egress_denied and the receiver sees nothing;
    a spelling libcurl reads differently is refused at submission (400, notify.url)."""
    s = await services(webhook_egress=EgressPolicy())
    receiver = Receiver(s.reactor)
    port = receiver.port.getHost().port  # type: ignore[attr-defined]
    try:
        await s.call("POST", "/v1/webhooks/secret")
        accepted = 0
        for host in (
            "127.0.0.1",
            "127.0.0.2",
            "localhost",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "2130706433",
            "0x7f.1",
            "127.1",
            "0177.0.0.1",
        ):
            hook = {"url": f"http://{host}:{port}/hook"}
            reply = await s.submit({"url": s.url("/bytes"), "notify": hook})
            if reply.status == 400:
                assert reply.error["field"] == "notify.url", reply
                continue
            assert reply.status == 201, reply
            accepted += 1

        async def all_failed() -> bool:
            reply = await s.call("GET", "/v1/webhooks/deliveries?status=failed")
            return len(reply.json()["deliveries"]) == accepted

        await s.until(all_failed, seconds=10)
        listed = (await s.call("GET", "/v1/webhooks/deliveries")).json()["deliveries"]
        for d in listed:
            assert d["last_error"].startswith("egress_denied: connection to "), d
            assert d["attempts"] == 1
        assert accepted >= 5
        assert receiver.received == []
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_the_secret_is_shown_once_or_comes_from_the_tokens(services: ServiceFactory) -> None:
    """POST /v1/webhooks/secret makes a new whsec_ secret each time (the newest signs);
    a secret from the tokens configuration cannot be replaced (409) and signs."""
    s = await services()
    first, second = await secret_of(s), await secret_of(s)
    assert first != second
    assert first.startswith("whsec_")
    configured = new_secret()
    t = await services(tokens={"alice": ALICE}, webhook_secrets={"alice": configured})
    reply = await t.call("POST", "/v1/webhooks/secret")
    assert (reply.status, reply.error["code"]) == (409, "secret_configured")
    receiver = Receiver(t.reactor)
    try:
        await t.submit({"url": t.url("/bytes"), "notify": {"url": receiver.url()}})
        await t.until(lambda: len(receiver.received) == 1)
        got = receiver.received[0]
        assert json.loads(got.body)["type"] == "job.succeeded"
        Webhook(configured).verify(got.body, got.headers)
    finally:
        await receiver.stop()
