"""curlfetch: libcurl's multi socket interface on the Twisted reactor, as a client library
(``from curlfetch import CurlClient``) and as a job service (``twistd curlfetch``).

The client library's public names are ``curlfetch.engine``'s, re-exported here; the
service's modules are imported only by the twistd plugin (``curlfetch.tap``) and tests."""

from . import engine as _engine
from .engine import *  # noqa: F403 - the client library's names, listed in engine.__all__

__version__ = "0.1.0"

__all__ = [*_engine.__all__, "__version__"]  # noqa: PLE0604 - engine.__all__ is a list of str
