"""The engine: libcurl's multi socket interface on the Twisted reactor, as a client library.

    client = CurlClient(reactor)
    response = await client.fetch("https://example.org/", timeout=10)

``curlmulti`` is the curl <-> reactor glue; ``client`` builds requests and results on it.
"""

from .client import CurlClient
from .curlmulti import CurlMultiDriver, CurlSocket, DriverStats, require_async_dns
from .errors import (
    BodyTooLargeError,
    ClientClosedError,
    ConnectError,
    CurlError,
    CurlMultiError,
    CurlTimeoutError,
    EgressDeniedError,
    FetchError,
    HeadersTooLargeError,
    ProtocolError,
    TLSError,
    TooManyRedirectsError,
    UnsupportedProtocolError,
    WrongThreadError,
)
from .request import Request, RequestOptions
from .response import Headers, Redirect, Response, Timings

__all__ = [
    "BodyTooLargeError",
    "ClientClosedError",
    "ConnectError",
    "CurlClient",
    "CurlError",
    "CurlMultiDriver",
    "CurlMultiError",
    "CurlSocket",
    "CurlTimeoutError",
    "DriverStats",
    "EgressDeniedError",
    "FetchError",
    "Headers",
    "HeadersTooLargeError",
    "ProtocolError",
    "Redirect",
    "Request",
    "RequestOptions",
    "Response",
    "TLSError",
    "Timings",
    "TooManyRedirectsError",
    "UnsupportedProtocolError",
    "WrongThreadError",
    "require_async_dns",
]
