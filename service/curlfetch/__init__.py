"""curlfetch: libcurl's multi socket interface on the Twisted reactor, as a client library
(``from curlfetch import CurlClient``) and as a job service (``twistd curlfetch``).

The client library's names are re-exported here from ``curlfetch.engine``; the service's
modules are imported only by the twistd plugin (``curlfetch.tap``) and by tests."""

from .engine import (
    BodyTooLargeError,
    ClientClosedError,
    ConnectError,
    CurlClient,
    CurlError,
    CurlTimeoutError,
    EgressDeniedError,
    FetchError,
    Headers,
    HeadersTooLargeError,
    ProtocolError,
    Redirect,
    Request,
    RequestOptions,
    Response,
    Timings,
    TLSError,
    TooManyRedirectsError,
    UnsupportedProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "BodyTooLargeError",
    "ClientClosedError",
    "ConnectError",
    "CurlClient",
    "CurlError",
    "CurlTimeoutError",
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
    "__version__",
]
