"""JSON log lines for ``--log-format=json`` (twistd's ``--logger``), and what the service
says about its settings at start-up, secrets left out."""

from __future__ import annotations

import sys

import attrs
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    eventAsJSON,
    formatEvent,
)
from twisted.python.failure import Failure

from .options import Config
from .redact import redact_event, redact_text
from .store.postgres import redact_dsn

log = Logger()


def json_line(event: LogEvent) -> str:
    """One event as one line: Twisted's ``eventAsJSON`` (``eventFromJSON`` reads it back)
    plus what a log collector indexes: the rendered ``message``, the ``level`` name and,
    for a failure, its ``traceback``. Secrets are redacted (``curlfetch.redact``): in the
    event's fields first, then anywhere in the finished line."""
    event = redact_event(event)
    extra: dict[str, object] = {"message": formatEvent(event)}
    level = event.get("log_level")
    if level is not None:
        extra["level"] = level.name
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        extra["traceback"] = failure.getTraceback()
    return redact_text(eventAsJSON({**event, **extra})) + "\n"


def json_log_observer() -> ILogObserver:
    """twistd's ``--logger`` factory for ``--log-format=json``: JSON lines on stdout.

    twistd calls it just before it begins logging, so ``sys.stdout`` is still the real
    one (twistd then points ``sys.stdout`` at the log). Also usable directly:
    ``twistd -n --logger=curlfetch.logs.json_log_observer curlfetch``.
    """
    return FileLogObserver(sys.stdout, json_line)


def log_settings(config: Config) -> None:
    """One line of the settings an operator chose, then the store, the egress policy and,
    without tokens, a warning."""
    # Twisted's key; digests and the database URL's password stay out of logs.
    hidden = {"log_format", "tokens", "egress", "database", "instance_id", "lease"}
    log.info(
        "curlfetch: listen={listen} data_dir={data_dir} max_concurrency={max_concurrency}"
        " max_per_host={max_per_host} per_host_interval={per_host_interval}s"
        " max_queued={max_queued} retention={retention}s drain_timeout={drain_timeout}s"
        " clients={clients} metrics_auth={metrics_auth}"
        " client_max_queued={client_max_queued} client_max_in_flight={client_max_in_flight}"
        " client_rate={client_rate}/s client_burst={client_burst}",
        clients=len(config.tokens.clients),
        **attrs.asdict(config, filter=lambda a, _: a.name not in hidden),
    )
    if config.database:
        log.info(
            "job store: PostgreSQL {url} instance_id={instance} lease={lease}s",
            url=redact_dsn(config.database),
            instance=config.instance_id or "(host-pid-random)",
            lease=config.lease,
        )
    log.info(
        "egress policy: {egress} max_response_header_bytes={max_header}",
        egress=config.egress.describe(),
        max_header=config.max_response_header_bytes,
    )
    if not config.tokens:
        log.warn(
            "no tokens configured: the API is open to anyone who can reach {listen}",
            listen=config.listen,
        )
