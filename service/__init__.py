"""curlfetch: libcurl's multi socket interface on the Twisted reactor."""

__version__ = "0.1.0"
