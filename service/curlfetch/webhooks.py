"""Webhook deliveries: signed per Standard Webhooks, sent from the store's outbox through
the curlfetch engine, under the egress policy, retried with backoff.

The outbox row is written in the transaction of the state change that causes it
(``curlfetch.store.events``), so nothing here has to be durable: a sender claims due
rows with a lease, sends, and records the attempt. A crash between the send and the
record sends it again after the lease (at least once: receivers deduplicate on
``webhook-id``, which stays the same across attempts).

- **Signature** (https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp``
  (Unix seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
  with the client's secret (``whsec_`` + base64 key), from the tokens configuration or
  made by ``POST /v1/webhooks/secret``.
- **Retries.** A 2xx is delivered. Anything else is tried again after an exponential
  backoff with jitter (``first_backoff * 2**(attempt-1)``, at most ``max_backoff``, the
  wait drawn from its upper half), or after ``Retry-After`` if that is later, until
  ``horizon`` seconds after the delivery was created: then it fails for good, visibly
  (``GET /v1/webhooks/deliveries?status=failed``, a metric). A target the egress policy
  denies (checked at connect time, as for jobs) fails at once: ``egress_denied``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .auth import WEBHOOK_SECRET_PREFIX
from .egress import EgressPolicy
from .engine import CurlClient, CurlError, EgressDeniedError
from .scheduler import parse_retry_after
from .store import JobStore
from .store.events import Delivery

log = Logger()

SECRET_PREFIX = WEBHOOK_SECRET_PREFIX
USER_AGENT = "curlfetch-webhooks/1"
SECRET_TTL = 5.0
"""Seconds a sender keeps a client's secret read from the store (one read per burst)."""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 24 or len(key) > 64:
        raise ValueError("a webhook secret's key must be 24 to 64 bytes")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class SenderReactor(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def seconds(self) -> float: ...


class _Metrics(Protocol):
    def delivery_finished(self, outcome: str, seconds: float | None) -> None: ...
    def outbox(self, depth: int, oldest_age: float) -> None: ...


@attrs.frozen
class SenderConfig:
    concurrency: int = 50
    """Deliveries in flight at once, per instance."""
    timeout: float = 15.0
    """Seconds for one attempt (connect included)."""
    first_backoff: float = 5.0
    max_backoff: float = 3600.0
    horizon: float = 24 * 3600.0
    """Seconds after its creation that a delivery is still tried."""
    poll_interval: float = 1.0
    lease: float = 120.0
    """How long a claim holds a row: well past ``timeout``, so that only a dead sender
    loses one."""
    secrets: Mapping[str, str] = attrs.field(factory=dict)
    """Per-client secrets from the tokens configuration; the store holds the others."""
    max_response_bytes: int = 64 * 1024


def backoff(attempt: int, first: float, most: float, rng: random.Random) -> float:
    """The wait after the ``attempt``-th failure: exponential, drawn from its upper half
    (jitter that still keeps the spacing)."""
    full = min(most, first * 2.0 ** max(0, attempt - 1))
    return float(full / 2 + rng.random() * full / 2)


class WebhookSender(Service):
    """Claims due deliveries and sends them, at most ``concurrency`` at once; woken when
    deliveries commit (here, or on PostgreSQL when another instance wrote events) and
    every ``poll_interval``."""

    def __init__(
        self,
        reactor: SenderReactor,
        store: JobStore,
        client: CurlClient,
        *,
        egress: EgressPolicy | None = None,
        metrics: _Metrics | None = None,
        config: SenderConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._client = client
        self._egress = egress
        self._metrics = metrics
        self.config = config or SenderConfig()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._in_flight: dict[str, Deferred[Any]] = {}
        self._claiming = False
        self._again = False
        self._wake_call: IDelayedCall | None = None
        self._due_call: IDelayedCall | None = None
        self._poll: LoopingCall | None = None
        self._stopping = False
        self._reaped_own = False
        self._secrets: dict[str, tuple[str, float]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._store.delivery_listeners.append(self.wake)
        poll = LoopingCall(self._tick)
        poll.clock = self._reactor  # type: ignore[assignment]
        self._poll = poll
        # The first tick also takes back what a predecessor of this store left sending.
        poll.start(self.config.poll_interval, now=True).addErrback(
            lambda f: log.failure("the webhook poll stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        """Stop claiming, cancel the attempts in flight and put their deliveries back to
        ``pending`` (a receiver may have got one: at least once), so that another
        instance, or the next start, sends them without waiting out the lease."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self.wake in self._store.delivery_listeners:
            self._store.delivery_listeners.remove(self.wake)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for call in (self._wake_call, self._due_call):
            if call is not None and call.active():
                call.cancel()
        self._wake_call = self._due_call = None
        pending = list(self._in_flight.values())
        if not pending:
            return succeed(None)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    def wake(self) -> None:
        if self._stopping or self._wake_call is not None:
            return
        self._wake_call = self._reactor.callLater(0, self._woken)

    def _woken(self) -> None:
        self._wake_call = None
        self._pump()

    def _tick(self) -> Deferred[None]:
        self._pump()
        return Deferred.fromCoroutine(self._check_outbox())

    async def _check_outbox(self) -> None:
        """Take back expired leases (and, first time, this store's own leftovers), and
        read the outbox's depth for the metrics."""
        now = self._reactor.seconds()
        try:
            own, self._reaped_own = not self._reaped_own, True
            if await self._store.reap_deliveries(now, own=own):
                self.wake()
            self._stats(await self._store.delivery_stats(), now)
        except Exception as e:
            log.warn("webhook outbox check: {e}", e=str(e))

    def _stats(self, stats: tuple[int, float | None], now: float) -> None:
        depth, oldest = stats
        if self._metrics is not None:
            self._metrics.outbox(depth, 0.0 if oldest is None else max(0.0, now - oldest))

    def _pump(self) -> None:
        if self._stopping:
            return
        if self._claiming:
            self._again = True
            return
        room = self.config.concurrency - len(self._in_flight)
        if room <= 0:
            return
        self._claiming = True
        self._again = False
        now = self._reactor.seconds()
        d = self._store.claim_deliveries(room, now, self.config.lease)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claimed(self, deliveries: list[Delivery]) -> None:
        self._claiming = False
        for delivery in deliveries:
            d = Deferred.fromCoroutine(self._deliver(delivery))
            self._in_flight[delivery.id] = d
            d.addErrback(self._crashed, delivery.id)
            d.addBoth(self._done, delivery.id)
        if self._again or (len(deliveries) and len(self._in_flight) < self.config.concurrency):
            self.wake()

    async def _secret(self, client: str) -> str | None:
        """The client's secret: configured, or the store's, remembered for
        ``SECRET_TTL`` seconds (a new one made by the API signs from then on)."""
        configured = self.config.secrets.get(client)
        if configured is not None:
            return configured
        now = self._reactor.seconds()
        cached = self._secrets.get(client)
        if cached is not None and cached[1] > now:
            return cached[0]
        secret = await self._store.webhook_secret(client)
        if secret is not None:
            self._secrets[client] = (secret, now + SECRET_TTL)
        return secret

    def _crashed(self, failure: Failure, delivery_id: str) -> None:
        """A bug, or the store refused the record: the lease brings the row back."""
        if failure.check(CancelledError) is None:
            log.failure("delivery {id} failed", failure, id=delivery_id)

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        log.warn("claiming webhook deliveries failed: {e}", e=failure.getErrorMessage())

    def _done(self, _: object, delivery_id: str) -> None:
        self._in_flight.pop(delivery_id, None)
        self.wake()

    async def _deliver(self, delivery: Delivery) -> None:
        started = self._reactor.seconds()
        attempt: dict[str, Any] = {"at": started}
        status: int | None = None
        error: tuple[str, str] | None = None
        retry_after: float | None = None
        secret = await self._secret(delivery.client)
        if secret is None:
            error = ("no_webhook_secret", "the client has no webhook secret")
            attempt.update(error={"code": error[0], "message": error[1]})
            await self._record(delivery, attempt, "failed", started, error, final=True)
            return
        body = delivery.payload.encode()
        timestamp = int(self._reactor.seconds())
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", USER_AGENT),
            ("webhook-id", delivery.id),
            ("webhook-timestamp", str(timestamp)),
            ("webhook-signature", sign(secret, delivery.id, timestamp, body)),
        ]
        egress = self._egress
        try:
            response = await self._client.fetch(
                delivery.url,
                method="POST",
                headers=headers,
                body=body,
                timeout=self.config.timeout,
                connect_timeout=self.config.timeout,
                follow_redirects=False,
                max_body_bytes=self.config.max_response_bytes,
                connect_check=None if egress is None else egress.connect_check,
                host_check=egress.host_check if egress and egress.checks_hosts else None,
            )
        except CancelledError:
            raise  # stopping: the row is handed back by stopService
        except EgressDeniedError as e:
            error = ("egress_denied", e.message)
        except CurlError as e:
            error = (e.name, e.message)
            attempt["curl_code"] = e.code
        except Exception as e:  # a bad URL, or a body over the cap
            error = (type(e).__name__, str(e))
        else:
            status = response.status
            attempt["status"] = status
            attempt["timings"] = attrs.asdict(response.timings)
            if not 200 <= status < 300:
                error = ("http_status", f"the receiver answered {status}")
                retry_after = parse_retry_after(
                    response.headers.get("retry-after"), self._reactor.seconds()
                )
        now = self._reactor.seconds()
        attempt["seconds"] = round(now - started, 6)
        if error is None:
            await self._record(delivery, attempt, "succeeded", now, None, final=True)
            return
        attempt["error"] = {"code": error[0], "message": error[1]}
        if error[0] == "egress_denied":
            await self._record(delivery, attempt, "failed", now, error, final=True)
            return
        wait = backoff(
            delivery.attempts + 1, self.config.first_backoff, self.config.max_backoff, self._rng
        )
        if retry_after is not None:
            wait = max(wait, retry_after)
        next_at = now + wait
        if next_at > delivery.created_at + self.config.horizon:
            await self._record(delivery, attempt, "failed", now, error, final=True)
            return
        attempt["retry_at"] = next_at
        await self._record(delivery, attempt, "pending", next_at, error, final=False)

    async def _record(
        self,
        delivery: Delivery,
        attempt: dict[str, Any],
        state: str,
        when: float,
        error: tuple[str, str] | None,
        *,
        final: bool,
    ) -> None:
        mine = await self._store.finish_delivery(
            delivery.id,
            state=state,
            next_at=when,
            finished_at=when if final else None,
            error=None if error is None else f"{error[0]}: {error[1]}",
            attempt=attempt,
        )
        if not mine:
            log.warn("delivery {id} was taken over while it was being sent", id=delivery.id)
        if self._metrics is not None:
            outcome = {"succeeded": "succeeded", "failed": "failed"}.get(state, "retried")
            latency = when - delivery.created_at if state == "succeeded" else None
            self._metrics.delivery_finished(outcome, latency)
        if state == "pending":
            self._wake_at(when)

    def _wake_at(self, when: float) -> None:
        """Claim again when a retry is due (sooner than the next poll, if need be)."""
        call = self._due_call
        if self._stopping or (call is not None and call.active() and call.getTime() <= when):
            return
        if call is not None and call.active():
            call.cancel()
        self._due_call = self._reactor.callLater(
            max(0.0, when - self._reactor.seconds()), self._due
        )

    def _due(self) -> None:
        self._due_call = None
        self._pump()
