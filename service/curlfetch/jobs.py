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
import enum
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import pycurl

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


class SpecError(ValueError):
    """A job spec is invalid; ``field`` is a path into the submitted JSON."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def within(self, prefix: str) -> SpecError:
        """The same error, located inside ``prefix`` (``jobs[3]``)."""
        return SpecError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


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


@attrs.frozen
class RetryPolicy:
    max_attempts: int
    backoff: float


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
        if self.body is not None:
            out["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return out

    @classmethod
    def from_json(cls, raw: object, limits: Limits) -> JobSpec:
        """Validate one submitted spec; raise ``SpecError`` naming the first bad field."""
        return _parse_spec(raw, limits)


_SPEC_FIELDS = frozenset(
    {
        "url",
        "method",
        "headers",
        "body",
        "body_base64",
        "timeout",
        "connect_timeout",
        "follow_redirects",
        "max_redirects",
        "max_body_bytes",
        "http_version",
        "priority",
        "retry",
        "deadline",
        "metadata",
    }
)


def _number(raw: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(name, "must be a number")
    if not low < value <= high:
        raise SpecError(name, f"must be > {low:g} and <= {high:g}")
    return float(value)


def _integer(raw: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, "must be an integer")
    if not low <= value <= high:
        raise SpecError(name, f"must be between {low} and {high}")
    return value


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


def _parse_spec(raw: object, limits: Limits) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError("", "a job spec must be a JSON object")
    for key in raw:
        if key not in _SPEC_FIELDS:
            raise SpecError(str(key), "unknown field")

    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise SpecError("url", "is required and must be a string")
    _check_url(url, limits)

    method = raw.get("method", "GET")
    if not isinstance(method, str) or not _TOKEN.match(method):
        raise SpecError("method", "must be an HTTP method token")
    method = method.upper()
    if method not in limits.methods:
        raise SpecError("method", f"must be one of {sorted(limits.methods)}")

    headers_raw = raw.get("headers", [])
    if not isinstance(headers_raw, list):
        raise SpecError("headers", "must be a list of [name, value] pairs")
    if len(headers_raw) > limits.max_headers:
        raise SpecError("headers", f"at most {limits.max_headers} headers")
    headers: list[tuple[str, str]] = []
    header_bytes = 0
    for i, pair in enumerate(headers_raw):
        field = f"headers[{i}]"
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise SpecError(field, "must be a [name, value] pair of strings")
        name, value = pair
        if not _TOKEN.match(name):
            raise SpecError(field, "header name must be an RFC 9110 token")
        if name.lower() in FRAMING_HEADERS:
            raise SpecError(field, f"{name} is set by libcurl, not by a job")
        if _BAD_VALUE.search(value):
            raise SpecError(field, "header value must not contain CR, LF or NUL")
        if _NOT_FIELD_VALUE.search(value):
            raise SpecError(field, "header value must be visible ASCII, spaces and tabs")
        header_bytes += len(name) + len(value) + 4
        headers.append((name, value))
    if header_bytes > limits.max_header_bytes:
        raise SpecError("headers", f"more than {limits.max_header_bytes} bytes in all")

    body: bytes | None = None
    if "body" in raw and "body_base64" in raw:
        raise SpecError("body", "give body or body_base64, not both")
    if raw.get("body") is not None:
        if not isinstance(raw["body"], str):
            raise SpecError("body", "must be a string (use body_base64 for bytes)")
        body = raw["body"].encode("utf-8")
    elif raw.get("body_base64") is not None:
        if not isinstance(raw["body_base64"], str):
            raise SpecError("body_base64", "must be a base64 string")
        try:
            body = base64.b64decode(raw["body_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise SpecError("body_base64", "is not valid base64") from None
    if body is not None:
        if len(body) > limits.max_request_body_bytes:
            raise SpecError(
                "body" if "body" in raw else "body_base64",
                f"is larger than {limits.max_request_body_bytes} bytes",
            )
        if method == "HEAD":
            raise SpecError("body", "a HEAD request cannot have a body")

    timeout = _number(raw, "timeout", 0, limits.max_timeout) or min(
        limits.default_timeout, limits.max_timeout
    )
    connect_timeout = _number(raw, "connect_timeout", 0, limits.max_timeout) or min(
        limits.default_connect_timeout, timeout
    )

    follow = raw.get("follow_redirects", True)
    if not isinstance(follow, bool):
        raise SpecError("follow_redirects", "must be true or false")
    max_redirects = _integer(raw, "max_redirects", 0, limits.max_redirects)
    if max_redirects is None:
        max_redirects = min(limits.default_max_redirects, limits.max_redirects)
    max_body = _integer(raw, "max_body_bytes", 1, limits.max_body_bytes)

    http_version = raw.get("http_version")
    if http_version is not None and http_version not in ("1.1", "2", "3"):
        raise SpecError("http_version", 'must be "1.1", "2" or "3"')

    priority = _integer(raw, "priority", -(2**31), 2**31 - 1) or 0

    retry_raw = raw.get("retry")
    default_attempts = 3 if method in IDEMPOTENT_METHODS else 1
    retry = RetryPolicy(default_attempts, 1.0)
    if retry_raw is not None:
        if not isinstance(retry_raw, dict):
            raise SpecError("retry", 'must be {"max_attempts": n, "backoff": seconds}')
        for key in retry_raw:
            if key not in ("max_attempts", "backoff"):
                raise SpecError(f"retry.{key}", "unknown field")
        try:
            attempts = _integer(retry_raw, "max_attempts", 1, limits.max_attempts)
        except SpecError as e:
            raise e.within("retry") from None
        backoff = retry_raw.get("backoff")
        if backoff is not None and (
            isinstance(backoff, bool)
            or not isinstance(backoff, int | float)
            or not 0 <= backoff <= limits.max_backoff
        ):
            raise SpecError("retry.backoff", f"must be a number from 0 to {limits.max_backoff:g}")
        retry = RetryPolicy(
            attempts if attempts is not None else default_attempts,
            float(backoff) if backoff is not None else 1.0,
        )

    deadline = _number(raw, "deadline", 0, limits.max_deadline)

    metadata = raw.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise SpecError("metadata", "must be a JSON object")
        if len(json.dumps(metadata, separators=(",", ":"))) > limits.max_metadata_bytes:
            raise SpecError("metadata", f"is larger than {limits.max_metadata_bytes} bytes")

    return JobSpec(
        url=url,
        method=method,
        headers=tuple(headers),
        body=body,
        timeout=timeout,
        connect_timeout=connect_timeout,
        follow_redirects=follow,
        max_redirects=max_redirects,
        max_body_bytes=max_body if max_body is not None else limits.max_body_bytes,
        http_version=http_version,
        priority=priority,
        retry=retry,
        deadline=deadline,
        metadata=metadata,
    )


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
    )


@attrs.frozen
class BodyInfo:
    size: int
    sha256: str
    truncated: bool = False
    content_type: str | None = None


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

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "http_version": self.http_version,
            "headers": [list(h) for h in self.headers],
            "effective_url": self.effective_url,
            "primary_ip": self.primary_ip,
            "redirects": [{"status": s, "location": loc} for s, loc in self.redirects],
            "body": None
            if self.body is None
            else {
                "size": self.body.size,
                "sha256": self.body.sha256,
                "truncated": self.body.truncated,
                "content_type": self.body.content_type,
            },
            "timings": self.timings,
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
            body=None
            if body is None
            else BodyInfo(body["size"], body["sha256"], body["truncated"], body["content_type"]),
            timings=dict(data["timings"]),
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

    @property
    def deadline_at(self) -> float | None:
        return None if self.spec.deadline is None else self.created_at + self.spec.deadline


def new_job_id(now: float | None = None) -> str:
    """Sortable by creation time (48-bit ms clock) and unguessable (80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(10).hex()}"
