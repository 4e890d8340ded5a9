"""What to fetch and how: a validated, immutable ``Request`` and its libcurl options."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, TypedDict

import attrs
import pycurl
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer

HTTP_VERSIONS: dict[str, int] = {
    "1.0": pycurl.CURL_HTTP_VERSION_1_0,
    "1.1": pycurl.CURL_HTTP_VERSION_1_1,
    "2": pycurl.CURL_HTTP_VERSION_2TLS,
    "3": pycurl.CURL_HTTP_VERSION_3,
}
_FEATURE_FOR_VERSION = {"2": "VERSION_HTTP2", "3": "VERSION_HTTP3"}

# RFC 9110 token characters, for header names and methods.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\0]")
_FORBIDDEN_IN_URL = re.compile(r"[\r\n\0 \t]")

Body = bytes | IO[bytes] | IBodyProducer
"""bytes are sent as-is; a binary file is read as curl asks; a producer is streamed."""

Sink = str | os.PathLike[str] | IConsumer
"""Where the body goes besides memory: a file path, or a consumer with backpressure."""


def _headers(value: Mapping[str, str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name), str(val)) for name, val in items)


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number, not {value!r}")


@attrs.frozen(kw_only=True)
class Request:
    """One fetch. Invalid combinations fail here, with ``ValueError``, before any I/O."""

    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers)
    body: Body | None = None
    timeout: float | None = attrs.field(default=None, validator=_positive)
    """Seconds for the whole transfer, redirects included (CURLOPT_TIMEOUT_MS)."""
    connect_timeout: float | None = attrs.field(default=None, validator=_positive)
    low_speed: tuple[int, float] | None = None
    """``(bytes_per_second, seconds)``: fail if slower than this for that long."""
    follow_redirects: bool = True
    max_redirects: int = 10
    max_body_bytes: int | None = attrs.field(default=None, validator=_positive)
    """Stop, with ``BodyTooLargeError``, once the (decoded) body would pass this."""
    truncate_body: bool = False
    """With ``max_body_bytes`` and no sink: keep the body's first ``max_body_bytes``
    bytes and end the transfer there as a success (``Response.truncated``) instead of
    failing it. For readers that must parse a prefix, as a robots.txt parser must."""
    max_header_bytes: int | None = attrs.field(default=None, validator=_positive)
    """Stop, with ``HeadersTooLargeError``, once the response headers (status lines and
    line ends included, every redirect counted) would pass this."""
    http_version: str | None = None
    """"1.0", "1.1", "2" or "3"; None lets libcurl choose (HTTP/2 over TLS)."""
    user_agent: str | None = None
    """The User-Agent sent unless ``headers`` give one (CURLOPT_USERAGENT: a header of
    that name, in any case, replaces it); None: none."""
    decode: bool = False
    """Send Accept-Encoding for every encoding libcurl has and decode the body."""
    proxy: str | None = None
    """An explicit proxy URL. Proxies from the environment are always ignored."""
    verify: bool = True
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    buffer_size: int | None = None
    """libcurl's receive buffer (CURLOPT_BUFFERSIZE); 512 KiB is ~1.7x faster on big bodies."""
    sink: Sink | None = None
    resolve: tuple[str, ...] = ()
    """``host:port:address`` pins (CURLOPT_RESOLVE). Library use only: never from a job."""
    prepare: Callable[[pycurl.Curl], None] | None = None
    """Last word on the easy handle before it starts. Library use only."""
    connect_check: Callable[[str, int], str | None] | None = None
    """``(ip, port) -> reason or None``, asked before every connection libcurl opens
    (each address of a host, each redirect) and when a pooled connection is reused. A
    reason refuses that address; if no address is left the fetch fails with
    ``EgressDeniedError``. Runs inside libcurl: keep it fast, pure and non-blocking. With
    a ``proxy`` it sees the proxy's address, not the target's."""
    host_check: Callable[[str], str | None] | None = None
    """``host -> reason or None``, asked for the URL's host (as libcurl parses it) before
    anything is sent and for the host of every redirect before it is followed. A reason
    fails the fetch with ``EgressDeniedError``."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ValueError("url must be a non-empty string")
        if _FORBIDDEN_IN_URL.search(self.url):
            raise ValueError("url must not contain whitespace, CR, LF or NUL")
        if not _TOKEN.match(self.method):
            raise ValueError(f"method {self.method!r} is not an HTTP token")
        for index, (name, value) in enumerate(self.headers):
            if not _TOKEN.match(name):
                raise ValueError(f"headers[{index}]: name {name!r} is not an HTTP token")
            if _FORBIDDEN_IN_VALUE.search(value):
                raise ValueError(f"headers[{index}]: value must not contain CR, LF or NUL")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        if self.truncate_body and (self.max_body_bytes is None or self.sink is not None):
            raise ValueError("truncate_body needs max_body_bytes and no sink")
        if self.http_version is not None:
            if self.http_version not in HTTP_VERSIONS:
                raise ValueError(
                    f"http_version must be one of {sorted(HTTP_VERSIONS)}, "
                    f"not {self.http_version!r}"
                )
            feature = _FEATURE_FOR_VERSION.get(self.http_version)
            if feature and not pycurl.version_info()[4] & getattr(pycurl, feature):
                raise ValueError(f"this libcurl cannot speak HTTP/{self.http_version}")
        if self.low_speed is not None:
            limit, seconds = self.low_speed
            if limit <= 0 or seconds <= 0:
                raise ValueError("low_speed must be (bytes_per_second > 0, seconds > 0)")
        if self.buffer_size is not None and not 1024 <= self.buffer_size <= 10 * 1024 * 1024:
            raise ValueError("buffer_size must be between 1 KiB and 10 MiB")
        if self.method == "HEAD" and self.body is not None:
            raise ValueError("a HEAD request cannot have a body")
        _check_body(self.body)
        if (self.client_key is not None) and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        sink = self.sink
        if sink is not None and not isinstance(sink, str | os.PathLike):  # noqa: SIM102
            if not IConsumer.providedBy(sink):
                raise ValueError("sink must be a file path or an IConsumer")


def _check_body(body: object) -> None:
    """Refuse, up front, a body the client could only fail on later (a str, a text file)."""
    if body is None or isinstance(body, bytes | bytearray | memoryview):
        return
    if IBodyProducer.providedBy(body):
        return
    if isinstance(body, io.TextIOBase) or not callable(getattr(body, "read", None)):
        # ValueError like every other bad option: one exception type to catch up front.
        raise ValueError(  # noqa: TRY004
            f"body must be bytes, a binary file or an IBodyProducer, not {type(body).__name__}"
            + (" (encode text first)" if isinstance(body, str | io.TextIOBase) else "")
        )


class RequestOptions(TypedDict, total=False):
    """Keyword options of ``CurlClient.fetch``; each is the ``Request`` field of that name."""

    method: str
    headers: Mapping[str, str] | Sequence[tuple[str, str]]
    body: Body | None
    timeout: float | None
    connect_timeout: float | None
    low_speed: tuple[int, float] | None
    follow_redirects: bool
    max_redirects: int
    max_body_bytes: int | None
    truncate_body: bool
    max_header_bytes: int | None
    http_version: str | None
    user_agent: str | None
    decode: bool
    proxy: str | None
    verify: bool
    ca_bundle: str | None
    client_cert: str | None
    client_key: str | None
    buffer_size: int | None
    sink: Sink | None
    resolve: tuple[str, ...]
    prepare: Callable[[pycurl.Curl], None] | None
    connect_check: Callable[[str, int], str | None] | None
    host_check: Callable[[str], str | None] | None


def configure(curl: pycurl.Curl, request: Request) -> None:
    """Set every static option of ``request`` on a freshly reset handle.

    Body, sink and header callbacks belong to the transfer and are set by the client.
    """
    setopt = curl.setopt
    setopt(pycurl.URL, request.url)
    setopt(pycurl.NOSIGNAL, 1)
    # Only HTTP(S), on the first request and on every redirect: never file:, gopher:...
    setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    # "" disables http_proxy/https_proxy/ALL_PROXY from the environment, and an explicit
    # NOPROXY keeps no_proxy/NO_PROXY from bypassing an explicit proxy.
    setopt(pycurl.PROXY, request.proxy or "")
    setopt(pycurl.NOPROXY, "")
    if request.follow_redirects:
        setopt(pycurl.FOLLOWLOCATION, 1)
        setopt(pycurl.MAXREDIRS, request.max_redirects)
    if request.timeout is not None:
        setopt(pycurl.TIMEOUT_MS, max(1, round(request.timeout * 1000)))
    if request.connect_timeout is not None:
        setopt(pycurl.CONNECTTIMEOUT_MS, max(1, round(request.connect_timeout * 1000)))
    if request.low_speed is not None:
        limit, seconds = request.low_speed
        setopt(pycurl.LOW_SPEED_LIMIT, int(limit))
        setopt(pycurl.LOW_SPEED_TIME, max(1, round(seconds)))
    if request.max_body_bytes is not None and not request.truncate_body:
        setopt(pycurl.MAXFILESIZE_LARGE, request.max_body_bytes)
    if request.http_version is not None:
        setopt(pycurl.HTTP_VERSION, HTTP_VERSIONS[request.http_version])
    if request.http_version not in {"1.1", "1.0"} and request.url[:8].lower() == "https://":
        # Wait for a connection that can multiplex rather than opening another one. Only
        # over TLS, where ALPN may pick HTTP/2: on http:// it would hold every concurrent
        # fetch to a new host until the first response arrived.
        setopt(pycurl.PIPEWAIT, 1)
    if request.user_agent is not None:
        setopt(pycurl.USERAGENT, request.user_agent)
    if request.decode:
        setopt(pycurl.ACCEPT_ENCODING, "")
    if not request.verify:
        setopt(pycurl.SSL_VERIFYPEER, 0)
        setopt(pycurl.SSL_VERIFYHOST, 0)
    if request.ca_bundle is not None:
        setopt(pycurl.CAINFO, request.ca_bundle)
    if request.client_cert is not None:
        setopt(pycurl.SSLCERT, request.client_cert)
    if request.client_key is not None:
        setopt(pycurl.SSLKEY, request.client_key)
    if request.buffer_size is not None:
        setopt(pycurl.BUFFERSIZE, request.buffer_size)
    if request.resolve:
        setopt(pycurl.RESOLVE, list(request.resolve))

    method = request.method
    if method == "HEAD":
        setopt(pycurl.NOBODY, 1)
    elif method != "GET" and not (method == "POST" and request.body is not None):
        setopt(pycurl.CUSTOMREQUEST, method)
    if method == "POST" and request.body is None:
        setopt(pycurl.POSTFIELDSIZE_LARGE, 0)
        setopt(pycurl.POSTFIELDS, b"")

    lines = [f"{name}: {value}" if value else f"{name};" for name, value in request.headers]
    if request.body is not None:
        given = {name.lower() for name, _ in request.headers}
        if "expect" not in given:
            # 100-continue stalls uploads for a second on servers that ignore it.
            lines.append("Expect:")
        if "content-type" not in given:
            # libcurl would label every body application/x-www-form-urlencoded.
            lines.append("Content-Type:")
    if lines:
        setopt(pycurl.HTTPHEADER, lines)
