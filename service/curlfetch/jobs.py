"""Fetch jobs: the spec a client submits, its validation, and the job record the store keeps.

No Twisted here, and of curl only its URL parser: this is the vocabulary the API, the
store and the scheduler share. Validation is strict and precise, because a job is
accepted once and then runs unattended: every problem names the field (``headers[2]``)
it was found in. A URL is parsed twice, by ``urlsplit`` (the politeness key) and by
libcurl's own parser (what will be fetched), and refused unless both read the same host
and port, so that nothing the service decides about a URL can differ from what libcurl
connects to (libcurl-security.md: "use curl_url()").
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import enum
import os
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import attrs
import pycurl

from .fields import (
    Boolean,
    Check,
    Choice,
    Field,
    Integer,
    JsonObject,
    Number,
    Object,
    SpecError,
    Table,
    Text,
    constant,
    described,
)
from .openapi import HEADER_PAIR

__all__ = [
    "FRAMING_HEADERS",
    "IDEMPOTENT_METHODS",
    "SPEC",
    "BodyInfo",
    "Job",
    "JobError",
    "JobResult",
    "JobSpec",
    "JobState",
    "Limits",
    "RetryPolicy",
    "SpecError",
    "new_job_id",
    "spec_from_stored",
]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\r\n\0]")
_NOT_FIELD_VALUE = re.compile(r"[^\t\x20-\x7e]")
"""Header values are visible ASCII, SP and HTAB: pycurl sends str as ASCII, and any other
control character is not a valid field value (RFC 9110 5.5)."""
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection"}
    | {"te", "trailer", "upgrade"}
)
"""libcurl frames the message and manages the connection; a client that set these could
desynchronize a reused connection (a ``Content-Length: 0`` with a body is a second,
smuggled request whose response the next job on that connection would read)."""
_CURLU_FLAGS = pycurl.U_GUESS_SCHEME | pycurl.U_NON_SUPPORT_SCHEME
"""The flags libcurl itself parses CURLOPT_URL with (lib/url.c)."""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@attrs.frozen
class Limits:
    """Caps on what a job may ask for; a job may ask for less, never more."""

    max_url_length: int = 8192
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    max_request_body_bytes: int = 10 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_timeout: float = 300.0
    default_timeout: float = 60.0
    default_connect_timeout: float = 10.0
    max_redirects: int = 20
    default_max_redirects: int = 10
    max_body_bytes: int = 100 * 1024 * 1024
    max_attempts: int = 10
    max_backoff: float = 600.0
    max_deadline: float = 7 * 24 * 3600.0
    methods: frozenset[str] = frozenset(
        {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
    )
    schemes: frozenset[str] = frozenset({"http", "https"})
    default_robots: str = "ignore"
    """What a job without ``robots`` does (``--robots``): written into its spec, so a
    job keeps the policy it was accepted under."""


@attrs.frozen
class RetryPolicy:
    max_attempts: int
    backoff: float


JOB_EVENTS = ("job.retrying", "job.succeeded", "job.failed", "job.cancelled")
BATCH_EVENTS = ("batch.created", "batch.completed")
EVENT_TYPES = JOB_EVENTS + BATCH_EVENTS
"""Every event the log records. A job's start is not one: it is not durable news (a
crash repeats it), and ``GET`` shows it."""
DEFAULT_JOB_NOTIFY = ("job.succeeded", "job.failed", "job.cancelled")
DEFAULT_BATCH_NOTIFY = ("batch.completed",)


@attrs.frozen
class Notify:
    """Where a job's or a batch's webhooks go, and for which events."""

    url: str
    events: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Notify:
        return cls(data["url"], tuple(data["events"]))


def parse_notify(raw: object, limits: Limits, defaults: tuple[str, ...]) -> Notify:
    """A submitted ``notify``: an http(s) URL checked as a job's is (the egress policy
    applies when it is delivered) and event types from ``EVENT_TYPES``."""
    if not isinstance(raw, dict):
        raise SpecError("notify", 'must be {"url": ..., "events": [...]}')
    for key in raw:
        if key not in ("url", "events"):
            raise SpecError(f"notify.{key}", "unknown field")
    url = raw.get("url")
    if not isinstance(url, str) or not url or len(url) > limits.max_url_length:
        raise SpecError("notify.url", "is required and must be a URL string")
    try:
        _check_url(url, limits)
    except SpecError as e:
        raise SpecError("notify.url", e.message) from None
    events = raw.get("events", list(defaults))
    if (
        not isinstance(events, list)
        or not events
        or any(not isinstance(e, str) or e not in EVENT_TYPES for e in events)
    ):
        raise SpecError("notify.events", f"must be a non-empty list of {list(EVENT_TYPES)}")
    return Notify(url, tuple(dict.fromkeys(events)))


@attrs.frozen
class _Notify(Field):
    """A job's webhook (see ``parse_notify``)."""

    def bind(self, limits: Limits) -> Check:
        name = self.name

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is not None:
                out[name] = parse_notify(value, limits, DEFAULT_JOB_NOTIFY)

        return check

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        return {self.name: notify_schema(DEFAULT_JOB_NOTIFY, self.description)}

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: (notify_schema(DEFAULT_JOB_NOTIFY, None), False)}


def notify_schema(defaults: tuple[str, ...], description: str | None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "description": "An http or https URL."},
            "events": {
                "type": "array",
                "items": {"type": "string", "enum": list(EVENT_TYPES)},
                "default": list(defaults),
            },
        },
    }
    if description:
        schema["description"] = description
    return schema


@attrs.frozen
class JobSpec:
    """A validated, normalized job spec. ``to_json`` is the ``request`` of the job view."""

    url: str
    method: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    timeout: float
    connect_timeout: float
    follow_redirects: bool
    max_redirects: int
    max_body_bytes: int
    http_version: str | None
    priority: int
    retry: RetryPolicy
    deadline: float | None
    metadata: dict[str, Any] | None
    notify: Notify | None = None
    robots: str = "ignore"
    """"obey": the origin's robots.txt decides whether this URL is fetched."""
    if_none_match: str | None = None
    if_modified_since: str | None = None
    revalidate: str | None = None
    """The earlier job (of the same client) whose validators were taken: a 304 ends
    this job ``not_modified``, its body that job's body."""
    host: str = attrs.field(init=False, eq=False, repr=False)
    """The politeness key: scheme-less host:port, lower-cased. Computed once from ``url``
    (the scheduler and the store read it per job, several times); not part of equality."""

    @host.default
    def _host(self) -> str:
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{(parts.hostname or '').lower()}:{port}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "method": self.method,
            "headers": [list(h) for h in self.headers],
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "follow_redirects": self.follow_redirects,
            "max_redirects": self.max_redirects,
            "max_body_bytes": self.max_body_bytes,
            "http_version": self.http_version,
            "priority": self.priority,
            "retry": {"max_attempts": self.retry.max_attempts, "backoff": self.retry.backoff},
            "deadline": self.deadline,
        }
        if self.notify is not None:
            out["notify"] = self.notify.to_json()
        out["robots"] = self.robots
        for name in ("if_none_match", "if_modified_since", "revalidate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.body is not None:
            out["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return out

    @classmethod
    def from_json(cls, raw: object, limits: Limits) -> JobSpec:
        """Validate one submitted spec; raise ``SpecError`` naming the first bad field."""
        return _parse_spec(raw, limits)

    @property
    def origin(self) -> str:
        """``scheme://host:port``, lower-cased: whose robots.txt applies."""
        return origin_of(self.url.split(":", 1)[0].lower(), self.host)

    def conditional_headers(self) -> tuple[tuple[str, str], ...]:
        """The request headers the validators become."""
        if self.if_none_match is None and self.if_modified_since is None:
            return ()
        out: list[tuple[str, str]] = []
        if self.if_none_match is not None:
            out.append(("If-None-Match", self.if_none_match))
        if self.if_modified_since is not None:
            out.append(("If-Modified-Since", self.if_modified_since))
        return tuple(out)

    def revalidating(self, job_id: str, etag: str | None, last_modified: str | None) -> JobSpec:
        """This spec with ``job_id``'s validators, where it does not give its own."""
        return attrs.evolve(
            self,
            revalidate=job_id,
            if_none_match=self.if_none_match if self.if_none_match is not None else etag,
            if_modified_since=(
                self.if_modified_since if self.if_modified_since is not None else last_modified
            ),
        )


def _check_url(url: str, limits: Limits) -> None:
    """Raise ``SpecError("url", ...)`` unless ``urlsplit`` and libcurl agree on it."""
    if len(url) > limits.max_url_length:
        raise SpecError("url", f"is longer than {limits.max_url_length} characters")
    if not url.isascii():
        raise SpecError(
            "url", "must be ASCII: percent-encode the path and give the host in punycode"
        )
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise SpecError("url", "must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise SpecError("url", f"is not a valid URL: {e}") from None
    if parts.scheme.lower() not in limits.schemes:
        raise SpecError("url", f"scheme must be one of {sorted(limits.schemes)}")
    if "@" in parts.netloc:
        # Credentials in URLs end up in job views, listings and logs, and "user@host"
        # is where parsers disagree (http://a@b@c/). An Authorization header does the same.
        raise SpecError("url", "must not contain user:password@; send an Authorization header")
    host = parts.hostname
    if not host:
        raise SpecError("url", "has no host")
    if "%" in host:
        raise SpecError("url", "the host must not be percent-encoded or carry a zone id")
    if port == 0:
        raise SpecError("url", "port 0 is not allowed")
    parsed = pycurl.CurlUrl()
    try:
        parsed.setpart(pycurl.UPART_URL, url, _CURLU_FLAGS)
        curl_host = (parsed.getpart(pycurl.UPART_HOST) or "").strip("[]").lower()
        curl_port = parsed.getpart(pycurl.UPART_PORT)
    except pycurl.error as e:
        raise SpecError("url", f"libcurl cannot parse it: {e.args[-1]}") from None
    if curl_host != host.lower() or (int(curl_port) if curl_port else None) != port:
        shown = f"{curl_host}:{curl_port}" if curl_port else curl_host
        raise SpecError("url", f"libcurl reads its host as {shown}; give the URL in that form")


# -- the spec's fields: validation and JSON Schema from one declaration -------------------


@attrs.frozen
class _Method(Field):
    """An HTTP method token, upper-cased, one of ``limits.methods``."""

    def bind(self, limits: Limits) -> Check:
        name, methods = self.name, limits.methods
        not_allowed = f"must be one of {sorted(methods)}"

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name, "GET")
            if value.__class__ is not str or not _TOKEN.match(value):
                raise SpecError(name, "must be an HTTP method token")
            value = value.upper()
            if value not in methods:
                raise SpecError(name, not_allowed)
            out[name] = value

        return check

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        description = f"One of {sorted(limits.methods)} (in any case)."
        return {self.name: {"type": "string", "default": "GET", "description": description}}

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"type": "string"}, True)}


@attrs.frozen
class _Headers(Field):
    """[name, value] pairs that libcurl sends as given: tokens, field values, no framing."""

    def bind(self, limits: Limits) -> Check:
        name, max_headers, max_bytes = self.name, limits.max_headers, limits.max_header_bytes
        too_many, too_large = (
            f"at most {max_headers} headers",
            f"more than {max_bytes} bytes in all",
        )

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            pairs = raw.get(name, [])
            if not isinstance(pairs, list):
                raise SpecError(name, "must be a list of [name, value] pairs")
            if len(pairs) > max_headers:
                raise SpecError(name, too_many)
            headers: list[tuple[str, str]] = []
            size = 0
            for i, pair in enumerate(pairs):
                if not (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and all(isinstance(p, str) for p in pair)
                ):
                    raise SpecError(f"{name}[{i}]", "must be a [name, value] pair of strings")
                key, value = pair
                if not _TOKEN.match(key):
                    raise SpecError(f"{name}[{i}]", "header name must be an RFC 9110 token")
                if key.lower() in FRAMING_HEADERS:
                    raise SpecError(f"{name}[{i}]", f"{key} is set by libcurl, not by a job")
                if _BAD_VALUE.search(value):
                    raise SpecError(f"{name}[{i}]", "header value must not contain CR, LF or NUL")
                if _NOT_FIELD_VALUE.search(value):
                    raise SpecError(
                        f"{name}[{i}]", "header value must be visible ASCII, spaces and tabs"
                    )
                size += len(key) + len(value) + 4
                headers.append((key, value))
            if size > max_bytes:
                raise SpecError(name, too_large)
            out[name] = tuple(headers)

        return check

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        schema = {"type": "array", "items": HEADER_PAIR, "maxItems": limits.max_headers}
        return {self.name: described(schema, self.description)}

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"type": "array", "items": HEADER_PAIR}, True)}


@attrs.frozen
class _Body(Field):
    """``body`` (text, sent as UTF-8) or ``body_base64`` (bytes), not both; none for HEAD.
    Checked after ``method``."""

    base64_name: str = "body_base64"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, self.base64_name)

    def bind(self, limits: Limits) -> Check:
        text_name, b64_name, max_bytes = self.name, self.base64_name, limits.max_request_body_bytes
        too_large = f"is larger than {max_bytes} bytes"

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            if text_name in raw and b64_name in raw:
                raise SpecError(text_name, f"give {text_name} or {b64_name}, not both")
            body: bytes | None = None
            text, encoded = raw.get(text_name), raw.get(b64_name)
            if text is not None:
                if not isinstance(text, str):
                    raise SpecError(text_name, f"must be a string (use {b64_name} for bytes)")
                body = text.encode("utf-8")
            elif encoded is not None:
                if not isinstance(encoded, str):
                    raise SpecError(b64_name, "must be a base64 string")
                try:
                    body = base64.b64decode(encoded, validate=True)
                except (binascii.Error, ValueError):
                    raise SpecError(b64_name, "is not valid base64") from None
            if body is not None:
                if len(body) > max_bytes:
                    raise SpecError(text_name if text_name in raw else b64_name, too_large)
                if root["method"] == "HEAD":
                    raise SpecError(text_name, "a HEAD request cannot have a body")
            out[text_name] = body

        return check

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        return {
            self.name: described({"type": ["string", "null"]}, self.description),
            self.base64_name: {
                "type": ["string", "null"],
                "contentEncoding": "base64",
                "description": f"A binary body (give `{self.name}` or this, not both).",
            },
        }

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.base64_name: ({"type": "string", "contentEncoding": "base64"}, False)}


@attrs.frozen
class _Robots(Field):
    """``obey`` or ``ignore``; absent: the service's default (``Limits.default_robots``)."""

    def bind(self, limits: Limits) -> Check:
        name, default = self.name, limits.default_robots

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is None:
                value = default
            elif value.__class__ is not str or value not in ROBOTS_POLICIES:
                raise SpecError(name, 'must be "obey" or "ignore"')
            out[name] = value

        return check

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        schema = {"enum": [*ROBOTS_POLICIES, None], "default": limits.default_robots}
        return {self.name: described(schema, self.description)}

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"enum": list(ROBOTS_POLICIES)}, True)}


ROBOTS_POLICIES = ("obey", "ignore")
_JOB_ID = re.compile(r"[0-9a-f]{32}\Z")


@attrs.frozen
class _OptionalString(Field):
    """A string shown in the view only when given."""

    def schema(self, limits: Limits) -> dict[str, dict[str, Any]]:
        return {self.name: described({"type": ["string", "null"]}, self.description)}

    def view(self, limits: Limits) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"type": "string"}, False)}


@attrs.frozen
class _Validator(_OptionalString):
    """A conditional request's validator: ``etag`` (an entity-tag list, or ``*``) or
    ``date`` (an HTTP-date), sent as ``header``, which ``headers`` must then not give.
    Checked after ``headers``."""

    kind: str = "etag"
    header: str = "If-None-Match"

    def bind(self, limits: Limits) -> Check:
        name, kind, header = self.name, self.kind, self.header
        lowered = header.lower()

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is not None:
                if value.__class__ is not str or not value or len(value) > 1024:
                    raise SpecError(name, "must be a string of 1 to 1024 characters")
                if _NOT_FIELD_VALUE.search(value):
                    raise SpecError(name, "must be visible ASCII, spaces and tabs")
                if kind == "date" and not is_http_date(value):
                    raise SpecError(name, "must be an HTTP-date (Sun, 06 Nov 1994 08:49:37 GMT)")
                if any(key.lower() == lowered for key, _ in root["headers"]):
                    raise SpecError(name, f"give {name} or a {header} header, not both")
            out[name] = value

        return check


@attrs.frozen
class _JobRef(_OptionalString):
    """A job id, or null."""

    def bind(self, limits: Limits) -> Check:
        name = self.name

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is not None and (value.__class__ is not str or not _JOB_ID.match(value)):
                raise SpecError(name, "must be a job id")
            out[name] = value

        return check


def is_http_date(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


def _default_attempts(limits: Limits, spec: dict[str, Any]) -> int:
    return 3 if spec["method"] in IDEMPOTENT_METHODS else 1


_RETRY = Table(
    (
        Integer("max_attempts", 1, lambda lim: lim.max_attempts, default=_default_attempts),
        Number("backoff", 0, lambda lim: lim.max_backoff, exclusive=False, default=constant(1.0)),
    )
)

SPEC = Table(
    (
        Text(
            "url",
            max_length=lambda lim: lim.max_url_length,
            message="is required and must be a string",
            check=_check_url,
            description="An http or https URL, without whitespace.",
        ),
        _Method("method"),
        _Headers(
            "headers",
            description=(
                "[name, value] pairs, sent in order; names are RFC 9110 tokens, "
                "values must not contain CR, LF or NUL."
            ),
        ),
        _Validator(
            "if_none_match",
            description="Sent as If-None-Match; a 304 ends the job `not_modified`.",
        ),
        _Validator(
            "if_modified_since",
            kind="date",
            header="If-Modified-Since",
            description="An HTTP-date, sent as If-Modified-Since.",
        ),
        _JobRef(
            "revalidate",
            description=(
                "An earlier succeeded job of yours: its ETag and Last-Modified become "
                "this job's validators (unless given), and a 304 makes that job's body "
                "this job's body, not fetched or stored again."
            ),
        ),
        _Body("body", description="A text body, sent as UTF-8."),
        Number(
            "timeout",
            0,
            lambda lim: lim.max_timeout,
            default=lambda lim, spec: min(lim.default_timeout, lim.max_timeout),
            description="Seconds for the whole transfer.",
        ),
        Number(
            "connect_timeout",
            0,
            lambda lim: lim.max_timeout,
            default=lambda lim, spec: min(lim.default_connect_timeout, spec["timeout"]),
        ),
        Boolean("follow_redirects", default=True),
        Integer(
            "max_redirects",
            0,
            lambda lim: lim.max_redirects,
            default=lambda lim, spec: min(lim.default_max_redirects, lim.max_redirects),
        ),
        Integer(
            "max_body_bytes",
            1,
            lambda lim: lim.max_body_bytes,
            default=lambda lim, spec: lim.max_body_bytes,
        ),
        Choice("http_version", ("1.1", "2", "3"), 'must be "1.1", "2" or "3"'),
        Integer(
            "priority",
            -(2**31),
            2**31 - 1,
            default=constant(0),
            description="Higher runs first; FIFO within a priority.",
        ),
        Object(
            "retry",
            table=_RETRY,
            message='must be {"max_attempts": n, "backoff": seconds}',
            build=lambda fields: RetryPolicy(**fields),
        ),
        Number(
            "deadline",
            0,
            lambda lim: lim.max_deadline,
            description="Seconds after submission by which the job must finish.",
        ),
        JsonObject(
            "metadata",
            max_bytes=lambda lim: lim.max_metadata_bytes,
            description="Yours; returned unchanged in the job view.",
        ),
        _Notify(
            "notify",
            description=(
                "A webhook for this job's events, signed per Standard Webhooks with the "
                "client's secret (see /v1/webhooks/secret)."
            ),
        ),
        _Robots(
            "robots",
            description=(
                "`obey`: fetched only if the origin's robots.txt (RFC 9309) allows it "
                "for the service's user agent; else the job fails `robots_disallowed`."
            ),
        ),
    ),
    description=(
        "One job to run. Only `url` is required; everything else has a default "
        "(shown normalized in the job's `request`). Unknown fields are refused."
    ),
    view_description="The job spec as accepted, with every default filled in.",
)
"""The job spec: what ``JobSpec.from_json`` accepts, in the order it checks (the first
error wins), and the ``JobSpec`` and ``Request`` schemas of the OpenAPI document."""


_bound: dict[int, tuple[Limits, Check]] = {}
"""``SPEC`` bound to each ``Limits`` in use, by identity: hashing a ``Limits`` per spec
would cost more than checking most fields."""


def _parse_spec(raw: object, limits: Limits) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError("", "a job spec must be a JSON object")
    entry = _bound.get(id(limits))
    if entry is None or entry[0] is not limits:
        if len(_bound) > 16:
            _bound.clear()
        entry = _bound[id(limits)] = (limits, SPEC.bind(limits))
    spec: dict[str, Any] = {}
    entry[1](raw, spec, spec)
    return JobSpec(**spec)


def spec_from_stored(data: Mapping[str, Any], metadata: dict[str, Any] | None) -> JobSpec:
    """Rebuild a spec from ``to_json`` output (trusted: it was validated on the way in)."""
    body = data.get("body_base64")
    retry = data["retry"]
    return JobSpec(
        url=data["url"],
        method=data["method"],
        headers=tuple((h[0], h[1]) for h in data["headers"]),
        body=base64.b64decode(body) if body is not None else None,
        timeout=data["timeout"],
        connect_timeout=data["connect_timeout"],
        follow_redirects=data["follow_redirects"],
        max_redirects=data["max_redirects"],
        max_body_bytes=data["max_body_bytes"],
        http_version=data["http_version"],
        priority=data["priority"],
        retry=RetryPolicy(retry["max_attempts"], retry["backoff"]),
        deadline=data["deadline"],
        metadata=metadata,
        notify=Notify.from_json(data["notify"]) if "notify" in data else None,
        robots=data.get("robots", "ignore"),
        if_none_match=data.get("if_none_match"),
        if_modified_since=data.get("if_modified_since"),
        revalidate=data.get("revalidate"),
    )


@attrs.frozen
class BodyInfo:
    """A stored body: its size and sha256, and where its WARC record is (``segment``
    None: a file of the earlier file-per-body store)."""

    size: int
    sha256: str
    truncated: bool = False
    content_type: str | None = None
    segment: str | None = None
    offset: int = 0
    """Where the record starts in the segment file."""
    length: int = 0
    """The record's bytes in the segment file (compressed, in a ``.warc.gz``)."""
    payload_at: int = 0
    """Where the payload starts in the (uncompressed) record."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size,
            "sha256": self.sha256,
            "truncated": self.truncated,
            "content_type": self.content_type,
        }
        if self.segment is not None:
            out["warc"] = {
                "segment": self.segment,
                "offset": self.offset,
                "length": self.length,
                "payload_at": self.payload_at,
            }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BodyInfo:
        record = data.get("warc")
        return cls(
            data["size"],
            data["sha256"],
            data["truncated"],
            data["content_type"],
            segment=None if record is None else record["segment"],
            offset=0 if record is None else record["offset"],
            length=0 if record is None else record["length"],
            payload_at=0 if record is None else record["payload_at"],
        )


@attrs.frozen
class JobResult:
    """What arrived, as the job view shows it (the body itself lives in the body store)."""

    status: int
    http_version: str
    headers: tuple[tuple[str, str], ...]
    effective_url: str
    primary_ip: str
    redirects: tuple[tuple[int, str | None], ...]
    body: BodyInfo | None
    timings: dict[str, float]
    etag: str | None = None
    last_modified: str | None = None
    """The validators: the response's, or for a 304 without them, the earlier job's."""
    not_modified: bool = False
    """A 304 to a conditional request: ``body`` is the earlier job's (``body_of``)."""
    body_of: str | None = None
    """The job whose fetch stored ``body``, when not this one."""

    def validators(self) -> tuple[str | None, str | None]:
        """(ETag, Last-Modified) for a revalidation (from the headers for a result
        stored before they were kept apart)."""
        etag, modified = self.etag, self.last_modified
        if etag is None and modified is None and not self.not_modified:
            for name, value in self.headers:
                lowered = name.lower()
                if lowered == "etag":
                    etag = value
                elif lowered == "last-modified":
                    modified = value
        return etag, modified

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "http_version": self.http_version,
            "headers": [list(h) for h in self.headers],
            "effective_url": self.effective_url,
            "primary_ip": self.primary_ip,
            "redirects": [{"status": s, "location": loc} for s, loc in self.redirects],
            "body": None if self.body is None else self.body.to_json(),
            "timings": self.timings,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "not_modified": self.not_modified,
            "body_of": self.body_of,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobResult:
        body = data.get("body")
        return cls(
            status=data["status"],
            http_version=data["http_version"],
            headers=tuple((h[0], h[1]) for h in data["headers"]),
            effective_url=data["effective_url"],
            primary_ip=data["primary_ip"],
            redirects=tuple((r["status"], r["location"]) for r in data["redirects"]),
            body=None if body is None else BodyInfo.from_json(body),
            timings=dict(data["timings"]),
            etag=data.get("etag"),
            last_modified=data.get("last_modified"),
            not_modified=data.get("not_modified", False),
            body_of=data.get("body_of"),
        )


@attrs.frozen
class JobError:
    """Why a job failed: curl's code and name (``OPERATION_TIMEDOUT``), or a lower-case
    service-level code (``deadline_exceeded``, ``egress_denied``)."""

    name: str
    message: str
    curl_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        if self.curl_code is not None:
            return {
                "code": "curl_error",
                "curl_code": self.curl_code,
                "curl_name": self.name,
                "message": self.message,
            }
        return {"code": self.name, "message": self.message}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobError:
        if data.get("curl_code") is not None:
            return cls(data["curl_name"], data["message"], data["curl_code"])
        return cls(data["code"], data["message"])


@attrs.frozen
class Job:
    """One job as stored. Timestamps are Unix seconds; ``not_before`` delays a retry."""

    id: str
    client: str
    state: JobState
    spec: JobSpec
    created_at: float
    attempts: int = 0
    not_before: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: JobResult | None = None
    error: JobError | None = None
    batch: str | None = None
    """The batch that created it, if it came in one."""

    @property
    def deadline_at(self) -> float | None:
        return None if self.spec.deadline is None else self.created_at + self.spec.deadline


def origin_of(scheme: str, host: str) -> str:
    """The origin of a politeness key (``host:port``; an IPv6 address gets brackets)."""
    name, port = host.rsplit(":", 1)
    if ":" in name:
        name = f"[{name}]"
    return f"{scheme}://{name}:{port}"


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds (``...T12:00:00.123Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def new_job_id(now: float | None = None) -> str:
    """Sortable by creation time (48-bit ms clock) and unguessable (80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(10).hex()}"
