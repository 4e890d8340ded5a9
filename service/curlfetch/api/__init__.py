"""The REST API v1 (Klein), composed of resources: ``jobs`` (submit, inspect, long-poll,
download and cancel fetch jobs), ``batches`` (a submission as one object: progress,
long-poll, its jobs, cancel), ``events`` (Server-Sent Events from the durable event
log), ``webhooks`` (the signing secret, deliveries and their attempts), ``export`` (the
caller's jobs as one WARC or NDJSON download) and ``ops`` (health, readiness, metrics,
the OpenAPI document), over the plumbing in ``http`` (bounded requests, JSON errors, auth, quotas).

Every response is JSON except a job's body and ``/metrics``; every error is
``{"error": {"code", "message", "field"?}}`` with a precise status. Each route declares
its OpenAPI operation next to itself (``routes.route``) and ``GET /openapi.json`` is
built from those declarations; ``tests/service/test_openapi.py`` checks the document
against the routes and the real responses.

Authentication (``service/curlfetch/auth.py``): with tokens configured, every ``/v1`` route
(and ``/metrics`` unless it is configured open) needs ``Authorization: Bearer <token>``.
Without tokens every request is the anonymous client ``""``.

A new resource is a module with an ``ApiResource`` subclass and one line in
``RESOURCES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

from ..auth import AuthFailure, TokenSet
from ..jobs import Limits, rfc3339
from ..metrics import Metrics
from ..openapi import build_openapi
from ..quotas import ClientQuotas, RateLimiter
from ..scheduler import Scheduler
from ..segments import SegmentBodyStore
from ..store import JobStore
from .batches import BatchesResource
from .connections import DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, ApiSite
from .events import EventsResource
from .export import ExportResource
from .hosts import HostsResource
from .http import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    REFUSE_GRACE,
    ApiError,
    BoundedRequest,
    auth_outcome,
    bounded_request_factory,
    client_of,
    error_json,
    install_error_handlers,
)
from .jobs import DEFAULT_LIST_LIMIT, MAX_BATCH, MAX_LIST_LIMIT, MAX_WAIT, JobsResource
from .ops import OpsResource
from .routes import ApiResource, mount, paths
from .ui import DashboardResource
from .views import job_view
from .waiters import JobWaiters
from .webhooks import WebhooksResource

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_BATCH",
    "MAX_LIST_LIMIT",
    "MAX_WAIT",
    "REFUSE_GRACE",
    "RESOURCES",
    "ApiError",
    "BoundedRequest",
    "JobAPI",
    "JobWaiters",
    "bounded_request_factory",
    "error_json",
    "job_view",
    "rfc3339",
]

R = TypeVar("R", bound=ApiResource)

RESOURCES: tuple[type[ApiResource], ...] = (
    JobsResource,
    BatchesResource,
    EventsResource,
    WebhooksResource,
    ExportResource,
    HostsResource,
    DashboardResource,
    OpsResource,
)
"""Every resource of the API, mounted on ``JobAPI.app`` and documented, in this order."""


class JobAPI:
    """The v1 REST API over a store, a scheduler and a body store: the services and
    settings every resource shares, and the resources themselves.

    ``resource()`` is the Klein resource; ``site()`` wraps it in a ``Site`` whose requests
    refuse too-large bodies before reading them (use it rather than a bare ``Site``).
    """

    app = Klein()

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        store: JobStore,
        scheduler: Scheduler,
        bodies: SegmentBodyStore,
        limits: Limits,
        metrics: Metrics,
        max_queued: int,
        tokens: TokenSet | None = None,
        metrics_auth: bool = True,
        quotas: ClientQuotas | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_batch: int = MAX_BATCH,
        retry_after: int = 5,
        poll_interval: float = 1.0,
        ping_timeout: float = 5.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        webhook_secrets: Mapping[str, str] | None = None,
        events_heartbeat: float = 15.0,
        events_stall_timeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.scheduler = scheduler
        self.bodies = bodies
        self.limits = limits
        self.metrics = metrics
        self.max_queued = max_queued
        self.tokens = tokens or TokenSet()
        self.metrics_auth = metrics_auth
        self.quotas = quotas or ClientQuotas()
        self.rates = RateLimiter(reactor, self.quotas.rate, self.quotas.bucket_size)
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.retry_after = retry_after
        self.poll_interval = poll_interval
        self.ping_timeout = ping_timeout
        self.max_batch_bytes = max_batch_bytes
        self.webhook_secrets = dict(webhook_secrets or {})
        """Per-client webhook secrets from the tokens configuration."""
        self.events_heartbeat = events_heartbeat
        self.events_stall_timeout = events_stall_timeout
        self.event_pulse = JobWaiters(reactor)
        """Woken (key ``"*"``) whenever events commit: event streams and batch
        long-polls wait on it."""
        store.event_listeners.append(lambda: self.event_pulse.notify("*"))
        self.draining = False
        metrics.track(store=store, scheduler=scheduler, bodies=bodies)
        self._components: dict[type[ApiResource], ApiResource] = {
            cls: cls(self) for cls in RESOURCES
        }

    def component(self, cls: type[R]) -> R:
        """The instance of resource ``cls`` serving this API."""
        component = self._components[cls]
        assert isinstance(component, cls)
        return component

    @property
    def waiters(self) -> JobWaiters:
        """The long-polls in progress (the jobs resource's)."""
        return self.component(JobsResource).waiters

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def site(
        self,
        *,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = 0,
        **kwargs: Any,
    ) -> Site:
        """A ``Site`` serving ``resource()`` with ``BoundedRequest`` requests, closing
        connections idle for ``idle_timeout`` and requests whose head takes longer than
        ``header_timeout``, and at most ``max_connections`` open (0: no limit); see
        ``connections``."""
        gate = self._auth_failure if self.tokens else None
        site = ApiSite(
            self.resource(),
            requestFactory=bounded_request_factory(
                self.max_request_bytes, self.reactor, gate, self.max_batch_bytes
            ),
            header_timeout=header_timeout,
            max_connections=max_connections,
            max_body=self.max_request_bytes,
            timeout=idle_timeout,
            reactor=self.reactor,
            **kwargs,
        )
        site.displayTracebacks = False
        return site

    def start_draining(self) -> None:
        """Fail readiness and refuse submissions from now on; answer long-polls at once."""
        self.draining = True
        for component in self._components.values():
            component.start_draining()

    def openapi(self) -> dict[str, Any]:
        schemas: dict[str, Any] = {}
        for cls in RESOURCES:
            schemas.update(cls.schemas(self))
        return build_openapi(
            paths=paths(self, RESOURCES),
            schemas=schemas,
            max_request_bytes=self.max_request_bytes,
        )

    def client(self, request: IRequest) -> str:
        """The authenticated client of ``request``, or the ``ApiError`` (401/400)."""
        return client_of(self.tokens, request)

    def _auth_failure(self, request: IRequest) -> AuthFailure | None:
        """The gate of ``BoundedRequest``: why a request with a body is refused unread."""
        outcome = auth_outcome(self.tokens, request)
        return outcome if isinstance(outcome, AuthFailure) else None


mount(JobAPI.app, RESOURCES)
install_error_handlers(JobAPI.app)
