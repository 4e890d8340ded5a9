"""Per-transfer checks that cost a Python call per header line or per connection: the
response-header cap, the connect-time address check and the per-hop host check.

A ``TransferGuard`` exists only for a request that sets ``max_header_bytes``,
``connect_check`` or ``host_check``; other fetches keep libcurl's callbacks at their
fastest (``list.append`` for headers, libcurl's own ``socket()``).

Its callbacks run inside libcurl: they record, return a verdict, and never call back
into curl (pycurl refuses even ``getinfo`` there, so hosts are tracked from the URL and
the ``Location`` headers, resolved with libcurl's own parser, ``CurlUrl``).
"""

from __future__ import annotations

import socket
from typing import Any

import pycurl

from .errors import CurlError, EgressDeniedError, FetchError, HeadersTooLargeError
from .request import Request

_SOCKET_BAD = pycurl.SOCKET_BAD
_PREREQ_OK = pycurl.PREREQFUNC_OK
_PREREQ_ABORT = pycurl.PREREQFUNC_ABORT
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# The flags libcurl itself parses with: the request URL (url.c) and a Location (Curl_follow).
_URL_FLAGS = pycurl.U_GUESS_SCHEME | pycurl.U_NON_SUPPORT_SCHEME
_LOCATION_FLAGS = pycurl.U_URLENCODE | pycurl.U_ALLOW_SPACE
_FOLLOWED_SCHEMES = ("http", "https")  # (REDIR_)PROTOCOLS: libcurl refuses the rest itself
_BLANK = (b"\r\n", b"\n")


class TransferGuard:
    """The checks of one transfer, and what they found."""

    __slots__ = (
        "after_location",
        "checked",
        "denial",
        "denied_more",
        "error",
        "header_bytes",
        "header_lines",
        "location",
        "opened",
        "request",
        "status",
        "url",
    )

    def __init__(self, request: Request, header_lines: list[bytes]) -> None:
        self.request = request
        self.header_lines = header_lines
        self.error: FetchError | None = None
        """Set when a check stopped the transfer; it is the fetch's failure."""
        self.header_bytes = 0
        # Address checks, for the current hop: the first refusal, how many more, and
        # whether any address was allowed (then a failure is that address's, not ours).
        self.denial: EgressDeniedError | None = None
        self.denied_more = 0
        self.opened = False
        self.checked: tuple[str, int] | None = None
        # Host checks: the current URL, and the response head being read.
        self.url: pycurl.CurlUrl | None = None
        self.status = 0
        self.location: bytes | None = None
        self.after_location = False  # the line before was the Location

    def install(self, curl: pycurl.Curl) -> None:
        """Set the callbacks this request needs; raises ``EgressDeniedError`` if the
        URL's own host is refused (before anything is sent)."""
        request = self.request
        if request.host_check is not None:
            self._check_first_host(request.host_check)
        if request.max_header_bytes is not None or (
            request.host_check is not None and request.follow_redirects
        ):
            curl.setopt(pycurl.HEADERFUNCTION, self.header)
        if request.connect_check is not None:
            curl.setopt(pycurl.OPENSOCKETFUNCTION, self.open_socket)
            curl.setopt(pycurl.PREREQFUNCTION, self.prereq)

    def failure(self, error: FetchError) -> FetchError:
        """What a failed transfer reports: a refused address explains a connect failure."""
        denial = self.denial
        if denial is None or not isinstance(error, CurlError):
            return error
        if not self.opened:
            # Nothing was allowed in this hop: the refusal is why it never connected.
            if self.denied_more:
                return EgressDeniedError(
                    denial.address, denial.port, denial.reason, others=self.denied_more
                )
            return denial
        return CurlError.from_code(
            error.code, f"{error.message} (egress policy also refused: {denial.message})"
        )

    # -- libcurl callbacks ---------------------------------------------------------------

    def header(self, line: bytes) -> int | None:
        """HEADERFUNCTION: keep the line, count it, and check where a redirect goes."""
        self.header_lines.append(line)
        request = self.request
        limit = request.max_header_bytes
        if limit is not None:
            self.header_bytes += len(line)
            if self.header_bytes > limit:
                self.error = HeadersTooLargeError(
                    100, f"response headers passed max_header_bytes={limit}"
                )
                return 0
        check = request.host_check
        if check is None or not request.follow_redirects:
            return None
        after_location, self.after_location = self.after_location, False
        if line[:5] == b"HTTP/":
            fields = line.split(None, 2)
            self.status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
            self.location = None
        elif 300 <= self.status < 400:
            if line in _BLANK:
                location, self.location, self.status = self.location, None, 0
                if location and not self._check_redirect(check, location):
                    return 0
            elif line[:1] in (b" ", b"\t"):
                if after_location:
                    # obs-fold continues the Location: refuse rather than guess how
                    # libcurl joins the lines.
                    self._deny_host("", "a folded Location header")
                    return 0
            elif self.location is None and line[:9].lower() == b"location:":
                self.location = line[9:].strip()
                self.after_location = True
        return None

    def open_socket(self, purpose: int, address: Any) -> int:
        """OPENSOCKETFUNCTION: ask ``connect_check``; allowed, open the socket ourselves
        and hand libcurl a bare fd (a socket object would be dup()ed and leak, pitfall
        16); refused, ``SOCKET_BAD`` (libcurl tries the host's next address)."""
        family, socktype, protocol, addr = address
        check = self.request.connect_check
        assert check is not None
        if family in _IP_FAMILIES:
            ip, port = addr[0], addr[1]
            try:
                reason = check(ip, port)
            except Exception as e:  # fail closed
                reason = f"connect_check raised {type(e).__name__}: {e}"
        else:
            ip, port, reason = repr(addr), 0, f"not an IP socket (family {family})"
        if reason is not None:
            if self.denial is None:
                self.denial = EgressDeniedError(ip, port, reason)
            else:
                self.denied_more += 1
            return _SOCKET_BAD
        try:
            fd = socket.socket(family, socktype, protocol).detach()
        except OSError:
            return _SOCKET_BAD  # libcurl reports it as a connect failure
        self.opened = True
        self.checked = (ip, port)
        return fd

    def prereq(self, primary_ip: str, local_ip: str, primary_port: int, local_port: int) -> int:
        """PREREQFUNCTION (connected or reused, before the request is sent): a pooled
        connection was never shown to this request's ``connect_check``, so ask it now.
        A new hop starts from here with no refusals."""
        if (primary_ip, primary_port) != self.checked:
            check = self.request.connect_check
            assert check is not None
            try:
                reason = check(primary_ip, primary_port)
            except Exception as e:
                reason = f"connect_check raised {type(e).__name__}: {e}"
            if reason is not None:
                self.error = EgressDeniedError(primary_ip, primary_port, reason)
                return _PREREQ_ABORT
            self.checked = (primary_ip, primary_port)
        self.denial = None
        self.denied_more = 0
        self.opened = False
        return _PREREQ_OK

    # -- hosts ---------------------------------------------------------------------------

    def _check_first_host(self, check: Any) -> None:
        url = self.url = pycurl.CurlUrl()
        try:
            url.setpart(pycurl.UPART_URL, self.request.url, _URL_FLAGS)
            if url.getpart(pycurl.UPART_SCHEME) not in _FOLLOWED_SCHEMES:
                return  # PROTOCOLS: libcurl refuses it (UnsupportedProtocolError)
            host = url.getpart(pycurl.UPART_HOST)
        except (pycurl.error, ValueError) as e:
            raise EgressDeniedError("", None, f"cannot parse the URL's host ({e})") from None
        self._ask(check, host or "")
        if self.error is not None:
            raise self.error

    def _check_redirect(self, check: Any, location: bytes) -> bool:
        """False (and ``self.error`` set) if the redirect's host is refused."""
        url = self.url
        assert url is not None
        try:
            url.setpart(pycurl.UPART_URL, location, _LOCATION_FLAGS)
            if url.getpart(pycurl.UPART_SCHEME) not in _FOLLOWED_SCHEMES:
                return True  # libcurl refuses to follow it (UnsupportedProtocolError)
            host = url.getpart(pycurl.UPART_HOST)
        except (pycurl.error, ValueError) as e:
            self._deny_host("", f"cannot parse the redirect's Location ({e})")
            return False
        return self._ask(check, host or "")

    def _ask(self, check: Any, host: str) -> bool:
        try:
            reason = check(host)
        except Exception as e:
            reason = f"host_check raised {type(e).__name__}: {e}"
        if reason is None:
            return True
        self._deny_host(host, reason)
        return False

    def _deny_host(self, host: str, reason: str) -> None:
        self.error = EgressDeniedError(host, None, reason)
