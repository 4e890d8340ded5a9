"""``twistd curlfetch``: the composition root.

The options are in ``curlfetch.options``, the service classes in ``curlfetch.services``,
the JSON log observer in ``curlfetch.logs``, the process's exit status and garbage
collector in ``curlfetch.process``; this module only wires them. It is the one module
that imports the global reactor, inside ``makeService``: by then twistd has installed
the reactor it was asked for (``-r``). Everything it builds takes the reactor as an
argument. The twistd plugin imports ``Options`` and ``makeService`` from here.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import strports

from .api import JobAPI
from .api.connections import default_max_connections
from .bodies import DirectoryBodyStore
from .engine import CurlClient
from .jobs import Limits
from .logs import json_log_observer, log_settings
from .metrics import Metrics
from .options import Config, Options
from .politeness import PolitenessConfig
from .process import (
    exit_0_if_clean,
    exit_1_after_shutdown,
    exit_now_if_start_up_abandoned,
    ready,
    second_signal_forces_stop,
    stop_on_early_signal,
    tune_gc,
)
from .robots import RobotsCache, RobotsConfig
from .scheduler import Scheduler, SchedulerConfig
from .segments import SegmentBodyStore
from .services import (
    CurlfetchService,
    LifecycleService,
    RetentionService,
    StartupError,
    check_data_dir,
    store_service,
)
from .store.postgres import PostgresJobStore, default_instance_id
from .store.sqlite import SQLiteJobStore
from .webhooks import SenderConfig, WebhookSender

__all__ = ["Options", "build_service", "json_log_observer", "makeService"]
"""``json_log_observer`` too: ``--logger=curlfetch.tap.json_log_observer`` is documented."""


LISTEN_BACKLOG = 1024
"""The accept queue of a tcp/tcp6/ssl/unix --listen that does not set ``backlog=``
(Twisted's default is 50): a burst of connections waits in it instead of having its SYNs
dropped and retried a second later. The kernel caps it (``net.core.somaxconn``)."""

_BACKLOG_TYPES = ("tcp:", "tcp6:", "ssl:", "unix:")


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """``description`` with ``:backlog=<backlog>`` added when it is a stream endpoint
    that takes one and does not set it."""
    if not description.lower().startswith(_BACKLOG_TYPES):
        return description
    if "backlog=" in description.lower():
        return description
    return f"{description}:backlog={backlog}"


def body_store(reactor: Any, config: Config, instance: str) -> SegmentBodyStore:
    """WARC segments under ``segments/``; the file-per-body store of earlier versions
    under ``bodies/`` where one exists (still read and purged), or written with
    ``--body-store files``."""
    write_files = config.body_store == "files"
    files = None
    if write_files or os.path.isdir(config.bodies_dir):
        files = DirectoryBodyStore(reactor, config.bodies_dir)
    return SegmentBodyStore(
        reactor,
        config.segments_dir,
        instance=instance,
        compression=config.body_compression,
        max_segment_bytes=config.segment_max_size,
        # Retention deletes a segment by its age: never one still being appended to.
        max_segment_age=min(config.segment_max_age, config.retention / 2),
        legacy=files,
        write_files=write_files,
    )


def build_service(reactor: Any, config: Config) -> CurlfetchService:
    """Everything, wired; nothing started. Children, in start order: store, engine,
    metrics, scheduler, retention, http."""
    store: SQLiteJobStore | PostgresJobStore
    instance = config.instance_id or default_instance_id()
    if config.database:
        store = PostgresJobStore(
            reactor,
            config.database,
            instance,
            lease_seconds=config.lease,
            max_per_host=config.max_per_host,  # shared by every instance
        )
    else:
        store = SQLiteJobStore(reactor, config.db_path)
    bodies = body_store(reactor, config, instance)
    client = CurlClient(
        reactor,
        max_concurrent=config.max_concurrency,
        max_host_connections=config.max_per_host,
        close_on_shutdown=False,  # closed by the "engine" child, after the drain
    )
    metrics = Metrics(reactor)
    scheduler = Scheduler(
        reactor,
        store=store,
        client=client,
        bodies=bodies,
        config=SchedulerConfig(
            max_concurrency=config.max_concurrency,
            max_per_host=config.max_per_host,
            per_host_interval=config.per_host_interval,
            max_per_client=config.client_max_in_flight,
            egress=config.egress,
            max_response_header_bytes=config.max_response_header_bytes,
            ca_bundle=config.ca_bundle or None,
            user_agent=config.user_agent,
            max_crawl_delay=config.max_crawl_delay,
            politeness=PolitenessConfig(
                max_cooldown=config.host_cooldown_max,
                failure_threshold=config.host_failure_threshold,
                failure_cooldown=config.host_failure_cooldown,
            ),
        ),
        observer=metrics,
        robots=RobotsCache(
            reactor,
            client,
            store,
            RobotsConfig(
                user_agent=config.user_agent,
                ttl=config.robots_ttl,
                error_ttl=config.robots_error_ttl,
                timeout=config.robots_timeout,
                egress=config.egress,
                ca_bundle=config.ca_bundle or None,
            ),
        ),
    )
    scheduler.setName("scheduler")
    if isinstance(store, PostgresJobStore):
        # Other instances' submissions and requeues, and cancels of our running jobs.
        store.on_wakeup = scheduler.wake
        store.on_cancelled = scheduler.abort
    api = JobAPI(
        reactor,
        store=store,
        scheduler=scheduler,
        bodies=bodies,
        limits=Limits(max_body_bytes=config.max_body_size, default_robots=config.robots),
        metrics=metrics,
        max_queued=config.max_queued,
        tokens=config.tokens,
        metrics_auth=config.metrics_auth == "token",
        quotas=config.quotas,
        max_batch_bytes=config.max_batch_bytes,
        webhook_secrets=config.tokens.webhook_secrets,
        events_heartbeat=config.events_heartbeat,
        events_stall_timeout=config.events_stall_timeout,
    )
    sender = WebhookSender(
        reactor,
        store,
        client,
        egress=config.egress,
        metrics=metrics,
        config=SenderConfig(
            concurrency=config.webhook_concurrency,
            timeout=config.webhook_timeout,
            first_backoff=config.webhook_backoff,
            max_backoff=config.webhook_max_backoff,
            horizon=config.webhook_horizon,
            secrets=config.tokens.webhook_secrets,
        ),
    )
    sender.setName("webhooks")
    # api.site(): a Site whose requests refuse a too-large body before reading it, and
    # whose connections are bounded in number and in time (api/connections.py).
    site = api.site(
        idle_timeout=config.idle_timeout,
        header_timeout=config.header_timeout,
        max_connections=config.max_connections or default_max_connections(config.max_concurrency),
    )
    http = strports.service(with_backlog(config.listen), site, reactor=reactor)
    http.setName("http")

    root = CurlfetchService(
        reactor, api=api, scheduler=scheduler, drain_timeout=config.drain_timeout
    )
    for child in (
        store_service(reactor, store=store, bodies=bodies, shared=bool(config.database)),
        LifecycleService("engine", stop=client.close),
        LifecycleService("metrics", metrics.start, metrics.stop),
        scheduler,
        sender,
        RetentionService(
            reactor,
            store=store,
            bodies=bodies,
            retention=config.retention,
            event_retention=config.event_retention,
        ),
        http,
    ):
        child.setServiceParent(root)
    return root


def makeService(options: Options) -> CurlfetchService:
    """twistd's entry point (through ``twisted/plugins/curlfetch_plugin.py``)."""
    from twisted.internet import reactor

    config = options.config
    log_settings(config)
    try:
        check_data_dir(config.data_dir)  # before the reactor runs: blocking is fine here
    except StartupError as e:
        raise SystemExit(f"curlfetch could not start: {e}") from None
    root = build_service(reactor, config)
    tune_gc()
    root.when_started().addCallbacks(
        ready,
        exit_1_after_shutdown,
        callbackArgs=(config.listen,),
        errbackArgs=(reactor,),
    )
    reactor.addSystemEventTrigger("after", "shutdown", exit_0_if_clean, root, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", exit_now_if_start_up_abandoned, root)
    second_signal_forces_stop(root, reactor)
    stop_on_early_signal(reactor)
    return root
