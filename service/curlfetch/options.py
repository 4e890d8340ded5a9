"""``twistd curlfetch``'s options: their declarations, the parsers behind them, the
``CURLFETCH_<NAME>`` environment variables, and the ``Config`` they produce.

Apart from the composition root (``curlfetch.tap``) so that what an operator can set,
and how a bad value is reported, reads in one place. Parsing needs no reactor: it runs
before twistd installs the one it was asked for (``-r``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
from twisted.internet import endpoints
from twisted.python import usage

from . import __version__
from .auth import TokenError, TokenSet, load_tokens
from .egress import EgressPolicy, parse_cidr, parse_host_pattern, parse_ports
from .quotas import ClientQuotas
from .store.postgres import DEFAULT_LEASE, is_postgres_url, redact_dsn

ENV_PREFIX = "CURLFETCH_"
DB_NAME = "jobs.sqlite3"
BODIES_DIR = "bodies"
SEGMENTS_DIR = "segments"
JSON_LOGGER = "curlfetch.logs.json_log_observer"
"""What ``--log-format=json`` hands to twistd's ``--logger`` option."""
TOKENS_ENV = ENV_PREFIX + "TOKENS"
"""Tokens straight from the environment (``client:token,...``); deliberately not an
option, since a command line is visible to every local user."""


# -- parsing -----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``1.5``, ``250ms``, ``30s``, ``30m``, ``12h`` or ``7d``."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"must be seconds or a number with ms, s, m, h or d, not {text!r}")
    return float(match[1]) * _UNITS[match[2] or "s"]


def _count(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _quota(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"must be a whole number (0: no limit), not {text!r}") from None
    if value < 0:
        raise ValueError(f"must be 0 (no limit) or more, not {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(
            f"must be a number of jobs per second (0: no limit), not {text!r}"
        ) from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be 0 (no limit) or more, not {text!r}")
    return value


def _tokens_file(text: str) -> str:
    if not text.strip():
        return ""
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    return path


def _metrics_auth(text: str) -> str:
    value = text.strip().lower()
    if value not in ("token", "open"):
        raise ValueError(f"must be token or open, not {text!r}")
    return value


def listens_on_loopback_only(description: str) -> bool:
    """True if the strports ``description`` accepts connections from this host only: a
    unix socket, or tcp/tcp6/ssl bound to a loopback address. Anything else (no
    interface, which means all of them, a host name, an endpoint type whose address we
    cannot see) counts as reachable from the network."""
    no_reactor: Any = object()
    endpoint = endpoints.serverFromString(no_reactor, description)
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    if not isinstance(
        endpoint,
        endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint | endpoints.SSL4ServerEndpoint,
    ):
        return False
    interface = getattr(endpoint, "_interface", "")
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _interval(text: str) -> float:
    return parse_duration(text)


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0, not {text!r}")
    return value


def _user_agent(text: str) -> str:
    value = text.strip()
    if not value or not re.fullmatch(r"[A-Za-z0-9_-]+[\x20-\x7e]*", value):
        raise ValueError(
            "must start with a product token (letters, digits, _ and -) and be printable "
            f"ASCII, not {text!r}"
        )
    return value


def _ca_bundle(text: str) -> str:
    path = text.strip()
    if path and not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file")
    return path


def _robots_ttl(text: str) -> float:
    value = _positive_duration(text)
    if value > 86400:
        raise ValueError(f"must be at most 24h (RFC 9309), not {text!r}")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be {' or '.join(choices)}, not {text!r}")
        return value

    return convert


_SIZE_UNITS: dict[str, int] = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?\Z", re.IGNORECASE)


def _byte_size(text: str) -> int:
    """``1048576``, ``512MiB``, ``1G``: binary units."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"must be a size in bytes (512MiB, 1GiB), not {text!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1024 * 1024:
        raise ValueError(f"must be at least 1MiB, not {text!r}")
    return value


def _listen(text: str) -> str:
    # serverFromString only stores the reactor in the endpoint it builds, so parsing
    # needs none; a real one would have to be imported, and this runs before twistd
    # installs the reactor it was asked for.
    no_reactor: Any = object()
    try:
        endpoints.serverFromString(no_reactor, text)
    except Exception as e:
        raise ValueError(f"is not a strports description ({e})") from None
    return text


def _data_dir(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    return path


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"must be text or json, not {text!r}")
    return value


_ENV_NAMES = {"database": ENV_PREFIX + "DATABASE_URL"}
"""Where the usual ``CURLFETCH_<NAME>`` would not be the conventional name."""


def env_name(option: str) -> str:
    """``max-per-host`` -> ``CURLFETCH_MAX_PER_HOST`` (``database``: the URL's
    conventional ``CURLFETCH_DATABASE_URL``)."""
    return _ENV_NAMES.get(option) or ENV_PREFIX + option.upper().replace("-", "_")


def _database(text: str) -> str:
    value = text.strip()
    if value and not is_postgres_url(value):
        raise ValueError(
            "must be a postgresql:// URL (or empty: SQLite in --data-dir), "
            f"not {redact_dsn(value)!r}"
        )
    return value


_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,100}\Z")


def _instance_id(text: str) -> str:
    value = text.strip()
    if value and not _INSTANCE_ID.match(value):
        raise ValueError(
            f"must be 1-100 letters, digits and . _ : @ - (empty: host-pid-random), not {text!r}"
        )
    return value


@attrs.frozen
class Config:
    """The parsed options: everything ``build_service`` needs."""

    listen: str = "tcp:8080:interface=127.0.0.1"
    data_dir: str = "curlfetch-data"
    max_concurrency: int = 256
    max_per_host: int = 8
    per_host_interval: float = 0.0
    max_queued: int = 100_000
    retention: float = 7 * 86400.0
    drain_timeout: float = 20.0
    log_format: str = "text"
    tokens_file: str = ""
    tokens: TokenSet = attrs.field(factory=TokenSet)
    """From ``--tokens-file`` and ``CURLFETCH_TOKENS``; empty: no authentication."""
    metrics_auth: str = "token"
    insecure_no_auth: bool = False
    client_max_queued: int = 0
    client_max_in_flight: int = 0
    client_rate: float = 0.0
    client_burst: int = 0
    egress: EgressPolicy = attrs.field(factory=EgressPolicy)
    """From the repeatable --allow-cidr, --deny-cidr, --allow-port, --allow-host and
    --deny-host; the default denies every non-global address and ports but 80 and 443."""
    max_response_header_bytes: int = 256 * 1024
    database: str = ""
    """A postgresql:// URL (several instances share it); empty: SQLite in ``data_dir``."""
    instance_id: str = ""
    """Names this process's job leases in PostgreSQL; empty: ``host-pid-random``."""
    lease: float = DEFAULT_LEASE
    idle_timeout: float = 10.0
    """Seconds a connection with no request in progress stays open."""
    header_timeout: float = 10.0
    """Seconds a request's head may take to arrive (its body: longer, by its size)."""
    max_connections: int = 0
    """Open API connections at most; 0: the file descriptor limit less a reserve."""
    body_store: str = "segments"
    """segments: WARC segments with group commit; files: a file per body (earlier
    versions' store, kept selectable for one release)."""
    body_compression: str = "none"
    segment_max_size: int = 1 << 30
    segment_max_age: float = 3600.0
    max_body_size: int = 100 * 1024 * 1024
    """The most a job may download (its ``max_body_bytes`` may ask for less)."""
    max_batch_bytes: int = 64 * 1024 * 1024
    event_retention: float = 7 * 86400.0
    events_heartbeat: float = 15.0
    events_stall_timeout: float = 30.0
    webhook_concurrency: int = 50
    webhook_timeout: float = 15.0
    webhook_backoff: float = 5.0
    webhook_max_backoff: float = 3600.0
    webhook_horizon: float = 86400.0
    robots: str = "ignore"
    user_agent: str = f"curlfetch/{__version__}"
    robots_ttl: float = 86400.0
    robots_error_ttl: float = 60.0
    robots_timeout: float = 10.0
    max_crawl_delay: float = 30.0
    host_cooldown_max: float = 300.0
    host_failure_threshold: int = 5
    host_failure_cooldown: float = 30.0
    ca_bundle: str = ""

    @property
    def quotas(self) -> ClientQuotas:
        return ClientQuotas(
            max_queued=self.client_max_queued,
            max_in_flight=self.client_max_in_flight,
            rate=self.client_rate,
            burst=self.client_burst,
        )

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, DB_NAME)

    @property
    def bodies_dir(self) -> str:
        return os.path.join(self.data_dir, BODIES_DIR)

    @property
    def segments_dir(self) -> str:
        return os.path.join(self.data_dir, SEGMENTS_DIR)


DEFAULTS = Config()

_CONVERTERS: dict[str, Callable[[str], object]] = {
    "listen": _listen,
    "data-dir": _data_dir,
    "max-concurrency": _count,
    "max-per-host": _count,
    "per-host-interval": _interval,
    "max-queued": _count,
    "retention": _positive_duration,
    "drain-timeout": _interval,
    "log-format": _log_format,
    "tokens-file": _tokens_file,
    "metrics-auth": _metrics_auth,
    "client-max-queued": _quota,
    "client-max-in-flight": _quota,
    "client-rate": _rate,
    "client-burst": _quota,
    "max-response-header-bytes": _count,
    "database": _database,
    "instance-id": _instance_id,
    "lease": _positive_duration,
    "idle-timeout": _positive_duration,
    "header-timeout": _positive_duration,
    "max-connections": _quota,
    "body-store": _one_of("segments", "files"),
    "body-compression": _one_of("none", "gzip"),
    "segment-max-size": _byte_size,
    "segment-max-age": _positive_duration,
    "max-body-size": _byte_size,
    "max-batch-bytes": _byte_size,
    "event-retention": _positive_duration,
    "events-heartbeat": _positive_duration,
    "events-stall-timeout": _positive_duration,
    "webhook-concurrency": _count,
    "webhook-timeout": _positive_duration,
    "webhook-backoff": _positive_duration,
    "webhook-max-backoff": _positive_duration,
    "webhook-horizon": _positive_duration,
    "robots": _one_of("ignore", "obey"),
    "user-agent": _user_agent,
    "robots-ttl": _robots_ttl,
    "robots-error-ttl": _positive_duration,
    "robots-timeout": _positive_duration,
    "max-crawl-delay": _interval,
    "host-cooldown-max": _positive_duration,
    "host-failure-threshold": _quota,
    "host-failure-cooldown": _positive_duration,
    "ca-bundle": _ca_bundle,
}

_EGRESS_LISTS: dict[str, tuple[str, Callable[[str], object]]] = {
    "allow-cidr": ("allow_cidrs", parse_cidr),
    "deny-cidr": ("deny_cidrs", parse_cidr),
    "allow-port": ("allow_ports", parse_ports),
    "allow-host": ("allow_hosts", parse_host_pattern),
    "deny-host": ("deny_hosts", parse_host_pattern),
}
"""Repeatable options (each value may also be a comma-separated list), building the
egress policy. From the environment as CURLFETCH_ALLOW_CIDR=a,b; any use of an option on
the command line replaces its environment value."""


class Options(usage.Options):
    """``twistd curlfetch`` options. Each can also come from ``CURLFETCH_<NAME>`` in the
    environment (``CURLFETCH_MAX_CONCURRENCY``); the command line wins."""

    synopsis = "[options]"
    longdesc = (
        "Runs the curlfetch job service: a REST API for HTTP fetch jobs, a durable SQLite "
        "queue (or PostgreSQL, shared by several instances: --database) and a scheduler "
        "on libcurl. Every option can also be set as an environment "
        "variable CURLFETCH_<NAME> (CURLFETCH_MAX_CONCURRENCY=64); the command line wins. "
        "Durations take seconds or a unit: 250ms, 30s, 30m, 12h, 7d."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["listen", None, DEFAULTS.listen, "Where the HTTP API listens (strports description)."],
        [
            "data-dir",
            None,
            DEFAULTS.data_dir,
            f"Directory for the job database ({DB_NAME}) and the bodies "
            f"({SEGMENTS_DIR}/); created if missing.",
        ],
        ["max-concurrency", None, str(DEFAULTS.max_concurrency), "Transfers running at once."],
        [
            "max-per-host",
            None,
            str(DEFAULTS.max_per_host),
            "Transfers (and connections) running at once per host:port.",
        ],
        [
            "per-host-interval",
            None,
            "0",
            "Least time between two request starts to one host (duration).",
        ],
        [
            "max-queued",
            None,
            str(DEFAULTS.max_queued),
            "Queued jobs at which submissions are refused with 503.",
        ],
        ["retention", None, "7d", "How long finished jobs and their bodies are kept."],
        [
            "drain-timeout",
            None,
            "20s",
            "On SIGTERM, how long running transfers may finish before they are requeued.",
        ],
        ["log-format", None, "text", "text, or json: one JSON object per line on stdout."],
        [
            "tokens-file",
            None,
            "",
            "Bearer tokens, one 'client_id:token' or 'client_id:sha256:<hex>' a line; each "
            f"token is a client. More can come from {TOKENS_ENV} (comma-separated). "
            "Without any, the API listens on loopback only.",
        ],
        [
            "metrics-auth",
            None,
            "token",
            "token: /metrics needs a token when tokens are configured; open: it never does.",
        ],
        [
            "client-max-queued",
            None,
            "0",
            "Queued jobs per client at which its submissions get 429 (0: no limit).",
        ],
        [
            "client-max-in-flight",
            None,
            "0",
            "Transfers per client at once; the rest wait queued (0: no limit).",
        ],
        [
            "client-rate",
            None,
            "0",
            "Jobs per second a client may submit; over it, 429 (0: no limit).",
        ],
        [
            "client-burst",
            None,
            "0",
            "Jobs a client may submit at once above --client-rate (0: one second's worth).",
        ],
        [
            "max-response-header-bytes",
            None,
            str(DEFAULTS.max_response_header_bytes),
            "Response header bytes of one fetch attempt, redirects included.",
        ],
        [
            "database",
            None,
            "",
            "A postgresql:// URL (also CURLFETCH_DATABASE_URL): several instances share "
            "its job queue; bodies stay in --data-dir, which they must share too (a "
            "shared volume). Empty: SQLite in --data-dir, one instance.",
        ],
        [
            "instance-id",
            None,
            "",
            "With --database: this instance's name on the jobs it runs (default: "
            "host-pid-random). Unique among running instances; a restart with the same "
            "id takes its jobs back at once instead of after --lease.",
        ],
        [
            "lease",
            None,
            "30s",
            "With --database: how long a job claimed by an instance that stopped "
            "heartbeating waits before another instance runs it again (duration).",
        ],
        [
            "idle-timeout",
            None,
            "10s",
            "How long an API connection with no request in progress (before its first, "
            "between keep-alive requests) stays open (duration).",
        ],
        [
            "header-timeout",
            None,
            "10s",
            "How long a request's head may take to arrive, however slowly it trickles "
            "(its body gets that plus 1s per 64 KiB); then 408 and the connection "
            "closes (duration).",
        ],
        [
            "max-connections",
            None,
            "0",
            "Open API connections at most; beyond, new ones are closed at once "
            "(0: the open-files limit less one per --max-concurrency and 256).",
        ],
        [
            "body-store",
            None,
            DEFAULTS.body_store,
            "segments: bodies as WARC records appended to segment files, synced in groups; "
            "files: one file and one fsync per body (the earlier store, for one release).",
        ],
        [
            "body-compression",
            None,
            DEFAULTS.body_compression,
            "none, or gzip: .warc.gz segments, each record its own gzip member (smaller, "
            "about 4x the CPU per stored byte).",
        ],
        [
            "segment-max-size",
            None,
            "1GiB",
            "A segment is sealed and a new one begun at this size.",
        ],
        [
            "segment-max-age",
            None,
            "1h",
            "A segment is sealed this long after it was begun, even if idle (at most half "
            "of --retention).",
        ],
        [
            "max-body-size",
            None,
            "100MiB",
            "The largest body a job may download; a job's max_body_bytes may ask for less "
            "(bodies past 256 KiB stream to disk, so memory does not grow with it).",
        ],
        [
            "max-batch-bytes",
            None,
            "64MiB",
            "The largest NDJSON body of POST /v1/batches (up to 100,000 jobs).",
        ],
        [
            "event-retention",
            None,
            "7d",
            "How long the event log keeps events (GET /v1/events resumes within it).",
        ],
        [
            "events-heartbeat",
            None,
            "15s",
            "A comment line on a quiet event stream this often (proxies keep it open).",
        ],
        [
            "events-stall-timeout",
            None,
            "30s",
            "An event stream whose client reads nothing this long is cut off (it resumes "
            "from the log).",
        ],
        ["webhook-concurrency", None, "50", "Webhook deliveries in flight at once."],
        ["webhook-timeout", None, "15s", "Seconds for one delivery attempt."],
        [
            "webhook-backoff",
            None,
            "5s",
            "The wait after a delivery's first failed attempt; doubled after each "
            "(jittered, at most --webhook-max-backoff; Retry-After if later).",
        ],
        ["webhook-max-backoff", None, "1h", "The longest wait between attempts."],
        [
            "webhook-horizon",
            None,
            "24h",
            "A delivery is retried until this long after its event, then fails visibly.",
        ],
        [
            "robots",
            None,
            "ignore",
            "obey: a job without its own `robots` is fetched only if the origin's "
            "robots.txt allows it; ignore: robots.txt is not read.",
        ],
        [
            "user-agent",
            None,
            f"curlfetch/{__version__}",
            "The User-Agent jobs send unless they set one; its product token (before "
            "the /) is what robots.txt groups are matched against.",
        ],
        ["robots-ttl", None, "24h", "How long a fetched robots.txt is used (at most 24h)."],
        [
            "robots-error-ttl",
            None,
            "60s",
            "How long an unreachable robots.txt (5xx, 429, no answer) disallows its origin "
            "before it is fetched again.",
        ],
        ["robots-timeout", None, "10s", "Seconds for one robots.txt fetch."],
        [
            "max-crawl-delay",
            None,
            "30s",
            "The longest robots.txt Crawl-delay honoured as a host's interval.",
        ],
        [
            "host-cooldown-max",
            None,
            "5m",
            "The longest a host is paused (429/503 Retry-After, or a failure run).",
        ],
        [
            "host-failure-threshold",
            None,
            "5",
            "Connect failures or timeouts in a row that pause a host (0: never).",
        ],
        [
            "host-failure-cooldown",
            None,
            "30s",
            "The pause after --host-failure-threshold failures; doubled for each more.",
        ],
        [
            "ca-bundle",
            None,
            "",
            "A PEM file of CA certificates that jobs' HTTPS targets are verified "
            "against (default: the system's).",
        ],
    ]
    optFlags: ClassVar[list[list[Any]]] = [
        [
            "insecure-no-auth",
            None,
            "Listen on a non-loopback --listen address without tokens: anyone who can "
            "reach it can submit fetches (also CURLFETCH_INSECURE_NO_AUTH=1).",
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.from_env: dict[str, str] = {}
        for name, *_ in self.optParameters:
            value = self.environ.get(env_name(name))
            if value is not None:
                self[name] = value
                self.from_env[name] = value
        self.egress_args: dict[str, list[str]] = {}
        self.config = Config()

    def _egress_arg(self, name: str, value: str) -> None:
        self.egress_args.setdefault(name, []).append(value)

    def opt_allow_cidr(self, value: str) -> None:
        """Allow connections to this network (repeatable; 127.0.0.1/32, ::1/128), even
        one denied by default. Checked after --deny-cidr."""
        self._egress_arg("allow-cidr", value)

    def opt_deny_cidr(self, value: str) -> None:
        """Deny connections to this network (repeatable); checked first."""
        self._egress_arg("deny-cidr", value)

    def opt_allow_port(self, value: str) -> None:
        """Ports fetches may connect to (repeatable; 8080 or 1024-65535). Default 80, 443."""
        self._egress_arg("allow-port", value)

    def opt_allow_host(self, value: str) -> None:
        """Only fetch from hosts matching these patterns (repeatable; *.example.com); the
        address rules still apply."""
        self._egress_arg("allow-host", value)

    def opt_deny_host(self, value: str) -> None:
        """Never fetch from hosts matching this pattern (repeatable; *.internal)."""
        self._egress_arg("deny-host", value)

    def _egress_policy(self) -> EgressPolicy:
        fields: dict[str, list[object]] = {}
        for name, (field, parse) in _EGRESS_LISTS.items():
            given = self.egress_args.get(name)
            source = ""
            if given is None:
                raw = self.environ.get(env_name(name))
                if raw is None:
                    continue
                given, source = [raw], f" (from {env_name(name)})"
            items = [item for value in given for item in value.split(",") if item.strip()]
            try:
                fields[field] = [parse(item) for item in items]
            except ValueError as e:
                raise usage.UsageError(f"--{name}{source}: {e}") from None
            if name == "allow-port" and not items:
                raise usage.UsageError(f"--{name}{source}: give at least one port")
        return EgressPolicy(**fields)  # type: ignore[arg-type]

    def postOptions(self) -> None:
        values: dict[str, Any] = {}
        for name, convert in _CONVERTERS.items():
            raw = self[name]
            try:
                values[name.replace("-", "_")] = self[name] = convert(str(raw))
            except ValueError as e:
                source = f" (from {env_name(name)})" if self.from_env.get(name) == raw else ""
                raise usage.UsageError(f"--{name}{source}: {e}") from None
        values["insecure_no_auth"] = self._flag("insecure-no-auth")
        values["egress"] = self._egress_policy()
        try:
            values["tokens"] = load_tokens(values["tokens_file"], self.environ, TOKENS_ENV)
        except TokenError as e:
            message = str(e)
            raise usage.UsageError(
                message if message.startswith(TOKENS_ENV) else f"--tokens-file: {message}"
            ) from None
        self.config = Config(**values)
        self._check_exposure()
        if self.config.log_format == "json":
            self._log_json()

    def _flag(self, name: str) -> bool:
        if self[name]:
            return True
        raw = self.environ.get(env_name(name))
        if raw is None or raw.strip().lower() in ("", "0", "false", "no"):
            return False
        if raw.strip().lower() in ("1", "true", "yes"):
            return True
        raise usage.UsageError(f"--{name} (from {env_name(name)}): must be 1 or 0, not {raw!r}")

    def _check_exposure(self) -> None:
        """No tokens: loopback only, unless the operator insists."""
        config = self.config
        if config.tokens or config.insecure_no_auth or listens_on_loopback_only(config.listen):
            return
        raise usage.UsageError(
            f"--listen: {config.listen} is reachable from other hosts and no tokens are "
            f"configured: give --tokens-file (or {TOKENS_ENV}), listen on a loopback "
            "address (tcp:8080:interface=127.0.0.1), or pass --insecure-no-auth"
        )

    def _log_json(self) -> None:
        """Have twistd log through ``json_log_observer``: its ``--logger`` option, which
        twistd resolves after this (in its own ``postOptions``) and uses when its logging
        begins. That happens after ``makeService``, so makeService itself could only add
        a second observer beside twistd's text one."""
        parent = self.parent
        if parent is None or parent.get("logger"):
            return  # not under twistd, or an explicit --logger: that one wins
        if parent.get("logfile") not in (None, "", "-"):
            raise usage.UsageError("--log-format=json writes to stdout; drop --logfile")
        if "nodaemon" in parent and not parent["nodaemon"]:
            raise usage.UsageError(
                "--log-format=json writes to stdout, which a daemon closes: use twistd -n"
            )
        parent["logger"] = JSON_LOGGER
