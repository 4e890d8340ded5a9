"""Typed errors for curl failures, so callers can catch by kind and still see curl's code."""

from __future__ import annotations

from typing import ClassVar

# libcurl's canonical CURLE_* names (curl.h, 8.x). pycurl exports aliases for many codes
# (E_OPERATION_TIMEOUTED, E_MULTI_*...), so the names are spelled out here once.
CURLE_NAMES: dict[int, str] = {
    0: "OK", 1: "UNSUPPORTED_PROTOCOL", 2: "FAILED_INIT", 3: "URL_MALFORMAT",
    4: "NOT_BUILT_IN", 5: "COULDNT_RESOLVE_PROXY", 6: "COULDNT_RESOLVE_HOST",
    7: "COULDNT_CONNECT", 8: "WEIRD_SERVER_REPLY", 9: "REMOTE_ACCESS_DENIED",
    10: "FTP_ACCEPT_FAILED", 11: "FTP_WEIRD_PASS_REPLY", 12: "FTP_ACCEPT_TIMEOUT",
    13: "FTP_WEIRD_PASV_REPLY", 14: "FTP_WEIRD_227_FORMAT", 15: "FTP_CANT_GET_HOST",
    16: "HTTP2", 17: "FTP_COULDNT_SET_TYPE", 18: "PARTIAL_FILE", 19: "FTP_COULDNT_RETR_FILE",
    21: "QUOTE_ERROR", 22: "HTTP_RETURNED_ERROR", 23: "WRITE_ERROR", 25: "UPLOAD_FAILED",
    26: "READ_ERROR", 27: "OUT_OF_MEMORY", 28: "OPERATION_TIMEDOUT", 30: "FTP_PORT_FAILED",
    31: "FTP_COULDNT_USE_REST", 33: "RANGE_ERROR", 35: "SSL_CONNECT_ERROR",
    36: "BAD_DOWNLOAD_RESUME", 37: "FILE_COULDNT_READ_FILE", 38: "LDAP_CANNOT_BIND",
    39: "LDAP_SEARCH_FAILED", 42: "ABORTED_BY_CALLBACK", 43: "BAD_FUNCTION_ARGUMENT",
    45: "INTERFACE_FAILED", 47: "TOO_MANY_REDIRECTS", 48: "UNKNOWN_OPTION",
    49: "SETOPT_OPTION_SYNTAX", 52: "GOT_NOTHING", 53: "SSL_ENGINE_NOTFOUND",
    54: "SSL_ENGINE_SETFAILED", 55: "SEND_ERROR", 56: "RECV_ERROR", 58: "SSL_CERTPROBLEM",
    59: "SSL_CIPHER", 60: "PEER_FAILED_VERIFICATION", 61: "BAD_CONTENT_ENCODING",
    63: "FILESIZE_EXCEEDED", 64: "USE_SSL_FAILED", 65: "SEND_FAIL_REWIND",
    66: "SSL_ENGINE_INITFAILED", 67: "LOGIN_DENIED", 68: "TFTP_NOTFOUND", 69: "TFTP_PERM",
    70: "REMOTE_DISK_FULL", 71: "TFTP_ILLEGAL", 72: "TFTP_UNKNOWNID", 73: "REMOTE_FILE_EXISTS",
    74: "TFTP_NOSUCHUSER", 77: "SSL_CACERT_BADFILE", 78: "REMOTE_FILE_NOT_FOUND", 79: "SSH",
    80: "SSL_SHUTDOWN_FAILED", 81: "AGAIN", 82: "SSL_CRL_BADFILE", 83: "SSL_ISSUER_ERROR",
    84: "FTP_PRET_FAILED", 85: "RTSP_CSEQ_ERROR", 86: "RTSP_SESSION_ERROR",
    87: "FTP_BAD_FILE_LIST", 88: "CHUNK_FAILED", 89: "NO_CONNECTION_AVAILABLE",
    90: "SSL_PINNEDPUBKEYNOTMATCH", 91: "SSL_INVALIDCERTSTATUS", 92: "HTTP2_STREAM",
    93: "RECURSIVE_API_CALL", 94: "AUTH_ERROR", 95: "HTTP3", 96: "QUIC_CONNECT_ERROR",
    97: "PROXY", 98: "SSL_CLIENTCERT", 99: "UNRECOVERABLE_POLL", 100: "TOO_LARGE",
    101: "ECH_REQUIRED",
}  # fmt: skip

CURLM_NAMES: dict[int, str] = {
    -1: "CALL_MULTI_PERFORM", 1: "BAD_HANDLE", 2: "BAD_EASY_HANDLE", 3: "OUT_OF_MEMORY",
    4: "INTERNAL_ERROR", 5: "BAD_SOCKET", 6: "UNKNOWN_OPTION", 7: "ADDED_ALREADY",
    8: "RECURSIVE_API_CALL", 9: "WAKEUP_FAILURE", 10: "BAD_FUNCTION_ARGUMENT",
    11: "ABORTED_BY_CALLBACK", 12: "UNRECOVERABLE_POLL",
}  # fmt: skip


class FetchError(Exception):
    """Base of every error this library raises for a fetch."""


class CurlError(FetchError):
    """A transfer failed inside libcurl; ``code``/``name`` are curl's CURLE_* values."""

    codes: ClassVar[frozenset[int]] = frozenset()

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.name = CURLE_NAMES.get(code, f"CURLE_{code}")
        # libcurl leaves the message empty for some errors (TOO_LARGE on one huge header).
        self.message = message or f"libcurl reported {self.name} without a message"
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return f"curl error {self.code} ({self.name}): {self.message}"

    @staticmethod
    def from_code(code: int, message: str) -> CurlError:
        """Build the most specific subclass for ``code``."""
        if code == 1 and message and not message.startswith('Protocol "'):
            # curl also says UNSUPPORTED_PROTOCOL for a reply it cannot parse as HTTP/1.x
            # (HTTP/0.9, a bad version or status code): the peer broke HTTP. A refused
            # URL or redirect scheme always reads 'Protocol "x" is disabled/not supported'.
            return ProtocolError(code, message)
        return _BY_CODE.get(code, CurlError)(code, message)


class ConnectError(CurlError):
    """The host could not be resolved or connected to."""

    codes = frozenset({5, 6, 7, 45, 89, 96})


class CurlTimeoutError(CurlError, TimeoutError):
    """A connect, total or low-speed limit expired (CURLE_OPERATION_TIMEDOUT)."""

    codes = frozenset({28})


class TLSError(CurlError):
    """TLS handshake or certificate verification failed."""

    codes = frozenset({35, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98, 101})


class ProtocolError(CurlError):
    """The peer broke HTTP: a bad status line, bad framing, a reset mid-body..."""

    codes = frozenset({8, 16, 18, 52, 55, 56, 61, 92, 95, 100})


class TooManyRedirectsError(CurlError):
    """More redirects than ``max_redirects``."""

    codes = frozenset({47})


class BodyTooLargeError(CurlError):
    """The (decoded) body passed ``max_body_bytes``; the transfer was stopped there."""

    codes = frozenset({63})


class UnsupportedProtocolError(CurlError):
    """A URL or redirect used a scheme other than http or https."""

    codes = frozenset({1})


_BY_CODE: dict[int, type[CurlError]] = {
    code: cls
    for cls in (
        ConnectError,
        CurlTimeoutError,
        TLSError,
        ProtocolError,
        TooManyRedirectsError,
        BodyTooLargeError,
        UnsupportedProtocolError,
    )
    for code in cls.codes
}


class CurlMultiError(FetchError):
    """The multi handle itself failed (CURLM_*); every transfer in flight was failed with it."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.name = CURLM_NAMES.get(code, f"CURLM_{code}")
        self.message = message
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"curl multi error {self.code} ({self.name}): {self.message}"


class ClientClosedError(FetchError):
    """The client was closed before (or while) this fetch ran."""


class WrongThreadError(RuntimeError):
    """A client method was called from a thread other than the reactor's."""


class HeadersTooLargeError(CurlError):
    """The response headers (all redirects included) passed ``max_header_bytes``; the
    transfer was stopped there. Code 100 (TOO_LARGE), as libcurl's own cap says."""

    codes = frozenset()  # raised by the client only; libcurl's 100 stays a ProtocolError


class EgressDeniedError(FetchError):
    """The request's ``connect_check`` refused every address a connection could use, or
    its ``host_check`` refused the URL's host or a redirect's.

    ``address`` is the IP (or, for a host check, the host name), ``port`` the port (None
    for a host), ``reason`` what the check returned (the rule that refused it).
    """

    def __init__(self, address: str, port: int | None, reason: str, *, others: int = 0) -> None:
        self.address = address
        self.port = port
        self.reason = reason
        self.others = others
        """How many more addresses of the same host were refused too."""
        if port is None:
            what = f"host {address}"
        else:
            what = (
                f"connection to [{address}]:{port}"
                if ":" in address
                else (f"connection to {address}:{port}")
            )
        more = f" (and {others} more address{'es' if others > 1 else ''})" if others else ""
        self.message = f"{what} denied by egress policy: {reason}{more}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message
