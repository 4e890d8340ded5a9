"""What came back: status, headers, redirect chain, body, and curl's full per-transfer record."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pycurl

_HTTP_VERSION_NAMES = {
    pycurl.CURL_HTTP_VERSION_1_0: "1.0",
    pycurl.CURL_HTTP_VERSION_1_1: "1.1",
    pycurl.CURL_HTTP_VERSION_2_0: "2",
    pycurl.CURL_HTTP_VERSION_3: "3",
}


class Headers:
    """Response headers in arrival order, multi-valued, looked up case-insensitively."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``."""
        wanted = name.lower()
        for key, value in self._items:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self._items if key.lower() == wanted]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other._items == self._items

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@attrs.frozen
class Redirect:
    """One hop of the redirect chain."""

    status: int
    location: str | None


@attrs.frozen
class Timings:
    """Seconds, each measured from the start like curl's ``-w`` variables.

    ``queue`` is the time spent waiting for a transfer slot (the client's FIFO plus
    libcurl's own connection-limit queue) before the transfer started.
    """

    queue: float
    namelookup: float
    connect: float
    appconnect: float
    pretransfer: float
    starttransfer: float
    redirect: float
    total: float


def _parse_block(lines: list[bytes]) -> tuple[int, list[tuple[str, str]]]:
    status_line = lines[0].decode("latin-1")
    parts = status_line.split(None, 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        line = raw.decode("latin-1").rstrip("\r\n")
        if not line:
            continue
        if line[0] in " \t" and headers:
            # obs-fold (RFC 9112 5.2): a continuation of the previous value.
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return status, headers


def _split_blocks(lines: list[bytes]) -> list[list[bytes]]:
    """One block per response curl saw: redirects, 1xx, proxy CONNECT, and the final one."""
    blocks: list[list[bytes]] = []
    for line in lines:
        if line.startswith(b"HTTP/"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return blocks


class Response:
    """The result of one successful transfer (any HTTP status counts as success).

    Headers and the redirect chain are parsed on first access: a crawler that only
    wants status and body never pays for them.
    """

    __slots__ = (
        "_header_lines",
        "_headers",
        "_redirects",
        "body",
        "body_path",
        "effective_url",
        "header_size",
        "http_version",
        "local_ip",
        "local_port",
        "method",
        "new_connections",
        "primary_ip",
        "primary_port",
        "redirect_count",
        "request_size",
        "size_download",
        "size_upload",
        "speed_download",
        "speed_upload",
        "status",
        "timings",
        "tls_verify_result",
        "truncated",
        "url",
    )

    def __init__(
        self,
        *,
        url: str,
        method: str,
        header_lines: list[bytes],
        body: bytes | None,
        body_path: str | None,
        status: int,
        http_version: str,
        effective_url: str,
        primary_ip: str,
        primary_port: int,
        local_ip: str,
        local_port: int,
        redirect_count: int,
        new_connections: int,
        size_download: int,
        size_upload: int,
        speed_download: int,
        speed_upload: int,
        header_size: int,
        request_size: int,
        tls_verify_result: int,
        timings: Timings,
        truncated: bool = False,
    ) -> None:
        self.url = url
        self.method = method
        self._header_lines = header_lines
        self._headers: Headers | None = None
        self._redirects: list[Redirect] | None = None
        self.body = body
        self.body_path = body_path
        self.status = status
        self.http_version = http_version
        self.effective_url = effective_url
        self.primary_ip = primary_ip
        self.primary_port = primary_port
        self.local_ip = local_ip
        self.local_port = local_port
        self.redirect_count = redirect_count
        self.new_connections = new_connections
        self.size_download = size_download
        self.size_upload = size_upload
        self.speed_download = speed_download
        self.speed_upload = speed_upload
        self.header_size = header_size
        self.request_size = request_size
        self.tls_verify_result = tls_verify_result
        self.timings = timings
        self.truncated = truncated
        """The body was cut at ``max_body_bytes`` (``Request.truncate_body``)."""

    @property
    def header_lines(self) -> list[bytes]:
        """Every header line libcurl received, as received (status lines, redirects'
        blocks and line ends included): for a faithful record of the response."""
        return self._header_lines

    @property
    def headers(self) -> Headers:
        """Headers of the final response (after redirects and 1xx), in arrival order."""
        if self._headers is None:
            self._parse()
        assert self._headers is not None
        return self._headers

    @property
    def redirects(self) -> list[Redirect]:
        """Each redirect response followed, in order, with its status and Location."""
        if self._redirects is None:
            self._parse()
        assert self._redirects is not None
        return list(self._redirects)

    def _parse(self) -> None:
        parsed = [_parse_block(block) for block in _split_blocks(self._header_lines)]
        final = parsed[-1][1] if parsed else []
        chain: list[Redirect] = []
        for status, headers in parsed[:-1]:
            if 300 <= status < 400:
                location = next((v for k, v in headers if k.lower() == "location"), None)
                chain.append(Redirect(status, location))
        self._headers = Headers(final)
        self._redirects = chain

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.method} {self.effective_url}>"


def build_response(
    curl: pycurl.Curl,
    *,
    url: str,
    method: str,
    header_lines: list[bytes],
    body: bytes | None,
    body_path: str | None,
    queue_wait: float,
    truncated: bool = False,
) -> Response:
    """Read curl's per-transfer record off a finished handle, before it is reset."""
    info = curl.getinfo
    us = 1e-6
    return Response(
        url=url,
        method=method,
        header_lines=header_lines,
        body=body,
        body_path=body_path,
        status=info(pycurl.RESPONSE_CODE),
        http_version=_HTTP_VERSION_NAMES.get(info(pycurl.INFO_HTTP_VERSION), "?"),
        effective_url=info(pycurl.EFFECTIVE_URL),
        primary_ip=info(pycurl.PRIMARY_IP),
        primary_port=info(pycurl.PRIMARY_PORT),
        local_ip=info(pycurl.LOCAL_IP),
        local_port=info(pycurl.LOCAL_PORT),
        redirect_count=info(pycurl.REDIRECT_COUNT),
        new_connections=info(pycurl.NUM_CONNECTS),
        size_download=info(pycurl.SIZE_DOWNLOAD_T),
        size_upload=info(pycurl.SIZE_UPLOAD_T),
        speed_download=info(pycurl.SPEED_DOWNLOAD_T),
        speed_upload=info(pycurl.SPEED_UPLOAD_T),
        header_size=info(pycurl.HEADER_SIZE),
        request_size=info(pycurl.REQUEST_SIZE),
        tls_verify_result=info(pycurl.SSL_VERIFYRESULT),
        timings=Timings(
            queue=queue_wait + info(pycurl.QUEUE_TIME_T) * us,
            namelookup=info(pycurl.NAMELOOKUP_TIME_T) * us,
            connect=info(pycurl.CONNECT_TIME_T) * us,
            appconnect=info(pycurl.APPCONNECT_TIME_T) * us,
            pretransfer=info(pycurl.PRETRANSFER_TIME_T) * us,
            starttransfer=info(pycurl.STARTTRANSFER_TIME_T) * us,
            redirect=info(pycurl.REDIRECT_TIME_T) * us,
            total=info(pycurl.TOTAL_TIME_T) * us,
        ),
        truncated=truncated,
    )
