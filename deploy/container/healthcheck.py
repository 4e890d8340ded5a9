#!/usr/bin/env python3
"""The container's HEALTHCHECK: ``GET /healthz`` on the address ``CURLFETCH_LISTEN`` names.

Standard library only, so it runs with any python3. ``CURLFETCH_LISTEN`` is a strports
description (``tcp:8080``, ``tcp:8080:interface=127.0.0.1``, ``tcp6:port=8080``,
``ssl:8443:privateKey=...``, ``unix:/run/curlfetch.sock``); a wildcard or missing interface
is checked on loopback. An explicit URL may be given instead: ``curlfetch-healthcheck
http://127.0.0.1:8080/healthz``. Exit status 0: healthy; 1: not (the reason on stderr).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import urllib.parse

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
TIMEOUT = 5.0
PATH = "/healthz"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """A strports description as (type, positional arguments, keyword arguments); ``\\:``
    escapes a colon, as in Twisted's own parser."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    kind, args = parts[0].strip().lower(), parts[1:]
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep:
            keywords[key] = value
        else:
            positional.append(arg)
    return kind, positional, keywords


def connection_for(description: str, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    """A connection to the API that ``description`` (a ``--listen`` value) listens on."""
    kind, positional, keywords = split_description(description)
    if kind == "unix":
        path = keywords.get("address") or (positional[0] if positional else "")
        if not path:
            raise ValueError(f"no socket path in {description!r}")
        return _UnixConnection(path, timeout)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise ValueError(f"cannot check a {kind!r} endpoint: give a URL instead")
    port = keywords.get("port") or (positional[0] if positional else "")
    if not port.isdigit():
        raise ValueError(f"no port in {description!r}")
    interface = keywords.get("interface") or (positional[1] if len(positional) > 1 else "")
    if interface in ("", "0.0.0.0"):  # noqa: S104 (every interface: check loopback)
        interface = "::1" if kind == "tcp6" and not interface else "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    if kind == "ssl":
        # Liveness, not identity: the certificate is the operator's business.
        context = ssl._create_unverified_context()  # noqa: S323
        return http.client.HTTPSConnection(interface, int(port), timeout=timeout, context=context)
    return http.client.HTTPConnection(interface, int(port), timeout=timeout)


def check(connection: http.client.HTTPConnection, path: str = PATH) -> str | None:
    """None if ``GET path`` answers 200, else why not."""
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as e:
        return f"GET {path}: {e or type(e).__name__}"
    finally:
        connection.close()
    if response.status != 200:
        return f"GET {path}: HTTP {response.status}"
    return None


def connection_for_url(text: str) -> tuple[http.client.HTTPConnection, str]:
    """A connection to an ``http`` or ``https`` URL's host, and the path to get."""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname, url.port, timeout=TIMEOUT), url.path
    return http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT), url.path


def main(argv: list[str]) -> int:
    try:
        if argv:
            connection, path = connection_for_url(argv[0])
        else:
            connection = connection_for(os.environ.get("CURLFETCH_LISTEN") or DEFAULT_LISTEN)
            path = PATH
    except ValueError as e:
        print(f"curlfetch-healthcheck: {e}", file=sys.stderr)
        return 1
    problem = check(connection, path or PATH)
    if problem is not None:
        print(f"curlfetch-healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
