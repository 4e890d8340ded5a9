"""WARC/1.1 records (ISO 28500), as the segment body store writes and reads them.

Written here rather than with warcio or FastWARC, both of which the tests use to read
every record back: a record is a short text header before the bytes, and the store
writes thousands a second under the GIL. Measured per 1 KiB record on this machine:
warcio's ``WARCWriter`` 98 µs, FastWARC's ``WarcRecord.write`` 20-27 µs (content in
memory only, SHA-1 digests unless set by hand), these functions 7 µs. Neither library
can write a record whose payload streamed to a spill file while it was fetched, with
the sha256 computed on the way; these can.

A ``response`` record's block is the final HTTP response head as libcurl received it,
then the payload as it was stored. libcurl removes a chunked transfer coding, so a
``Transfer-Encoding`` field is renamed ``X-Curlfetch-Transfer-Encoding``: a reader must
not de-chunk a payload that is not chunked (WARC 1.1 §6.3.2, the payload is the
entity-body after transfer decoding).
"""

from __future__ import annotations

import base64
import re
import uuid
import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import attrs

from . import __version__

WARC_VERSION = b"WARC/1.1"
TRAILER = b"\r\n\r\n"
GZIP_LEVEL = 1
"""Per-record gzip level: 1 is 3-4x faster than 6 and loses a few per cent of ratio on
HTML; the body store's bottleneck is this CPU, not the disk."""
_TE = re.compile(rb"^transfer-encoding:", re.IGNORECASE)
_FIELD_SAFE = re.compile(r"[\x00-\x1f\x7f]")


def digest_label(digest: bytes) -> str:
    """WARC's labelled digest, in base32 as Heritrix, wget and warcio write it."""
    return "sha256:" + base64.b32encode(digest).decode("ascii")


def record_id() -> str:
    return f"<urn:uuid:{uuid.uuid4()}>"


def warc_date(when: float) -> str:
    """WARC 1.1 allows fractional seconds; microseconds keep records of one second apart."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _field(value: str) -> str:
    """No control characters in a header value (a URL from a target could carry any)."""
    return _FIELD_SAFE.sub("", value)


def http_head(header_lines: Sequence[bytes]) -> bytes:
    """The final response's status line and fields as libcurl saw them (the last
    ``HTTP/`` block: redirects and 1xx interim responses before it are not part of it),
    CRLF-terminated, with the blank line."""
    start = 0
    for i, line in enumerate(header_lines):
        if line.startswith(b"HTTP/"):
            start = i
    lines = []
    for raw in header_lines[start:]:
        line = raw.rstrip(b"\r\n")
        if line:
            lines.append(b"X-Curlfetch-" + line if _TE.match(line) else line)
    if not lines:
        lines.append(b"HTTP/1.1 200 OK")  # no head at all (HTTP/0.9): say what it was
    return b"\r\n".join(lines) + b"\r\n\r\n"


@attrs.frozen
class ResponseMeta:
    """What a ``response`` record says besides its bytes."""

    target_uri: str
    ip_address: str
    date: float
    head: bytes
    """``http_head()``: the block's first part."""


def response_header(
    meta: ResponseMeta, payload_size: int, payload_sha256: bytes, warcinfo_id: str
) -> bytes:
    """The WARC header of a ``response`` record whose block is ``meta.head`` and then
    ``payload_size`` bytes of payload."""
    fields = [
        "WARC/1.1",
        "WARC-Type: response",
        f"WARC-Record-ID: {record_id()}",
        f"WARC-Date: {warc_date(meta.date)}",
        f"WARC-Target-URI: {_field(meta.target_uri)}",
    ]
    if meta.ip_address:
        fields.append(f"WARC-IP-Address: {_field(meta.ip_address)}")
    fields += [
        f"WARC-Warcinfo-ID: {warcinfo_id}",
        f"WARC-Payload-Digest: {digest_label(payload_sha256)}",
        "Content-Type: application/http;msgtype=response",
        f"Content-Length: {len(meta.head) + payload_size}",
        "",
        "",
    ]
    return "\r\n".join(fields).encode("utf-8")


def warcinfo(filename: str, rid: str, when: float, fields: Iterable[tuple[str, str]]) -> bytes:
    """A whole ``warcinfo`` record: the first of every segment and of every export."""
    body = "".join(
        f"{name}: {_field(value)}\r\n"
        for name, value in (
            ("software", f"curlfetch/{__version__}"),
            ("format", "WARC File Format 1.1"),
            (
                "conformsTo",
                "http://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/",
            ),
            *fields,
        )
    ).encode("utf-8")
    head = (
        "WARC/1.1\r\n"
        "WARC-Type: warcinfo\r\n"
        f"WARC-Record-ID: {rid}\r\n"
        f"WARC-Date: {warc_date(when)}\r\n"
        f"WARC-Filename: {_field(filename)}\r\n"
        "Content-Type: application/warc-fields\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body + TRAILER


def metadata(
    target_uri: str | None,
    rid: str,
    when: float,
    warcinfo_id: str,
    fields: Iterable[tuple[str, str]],
) -> bytes:
    """A whole ``metadata`` record of ``application/warc-fields``: what an export says
    about a job whose body it could not copy, and about itself at its end."""
    body = "".join(f"{name}: {_field(value)}\r\n" for name, value in fields).encode("utf-8")
    head = ["WARC/1.1", "WARC-Type: metadata", f"WARC-Record-ID: {rid}"]
    head.append(f"WARC-Date: {warc_date(when)}")
    if target_uri is not None:
        head.append(f"WARC-Target-URI: {_field(target_uri)}")
    head += [
        f"WARC-Warcinfo-ID: {warcinfo_id}",
        "Content-Type: application/warc-fields",
        f"Content-Length: {len(body)}",
        "",
        "",
    ]
    return "\r\n".join(head).encode("utf-8") + body + TRAILER


def gzip_member(data: bytes) -> bytes:
    """One whole gzip member: a record compressed alone can be read from its offset."""
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


class RecordError(ValueError):
    """Bytes that are not a whole WARC record where one was expected."""


def parse_header(data: bytes) -> tuple[int, int]:
    """``(header_length, content_length)`` of the record ``data`` starts with; raises
    ``RecordError`` if ``data`` does not hold a whole, well-formed WARC header."""
    if not data.startswith(b"WARC/"):
        raise RecordError("no WARC version line")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise RecordError("the header does not end")
    length = -1
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise RecordError("Content-Length is not a number") from None
    if length < 0:
        raise RecordError("no Content-Length")
    return end + 4, length


def scan_end(f: object, *, gzipped: bool, chunk: int = 1 << 20) -> int:
    """The offset just past the last whole record of a segment file (opened for binary
    reading at 0): what a torn tail is truncated to after a crash."""
    read = f.read  # type: ignore[attr-defined]
    if gzipped:
        return _scan_gzip(read, chunk)
    return _scan_plain(f, chunk)


def _scan_plain(f: object, chunk: int) -> int:
    seek, read = f.seek, f.read  # type: ignore[attr-defined]
    good = 0
    while True:
        seek(good)
        head = read(64 * 1024)
        if not head:
            return good
        try:
            header_len, content_len = parse_header(head)
        except RecordError:
            return good
        end = good + header_len + content_len
        seek(end)
        if read(4) != TRAILER:
            return good
        good = end + 4


def _scan_gzip(read: object, chunk: int) -> int:
    """Member by member: each must decompress to exactly one whole record."""
    good = pos = 0  # the end of the last good member; compressed bytes consumed so far
    member = _Member()
    while True:
        data = read(chunk)  # type: ignore[operator]
        if not data:
            return good
        while data:
            try:
                member.feed(data)
            except zlib.error:
                return good
            if not member.d.eof:
                pos += len(data)
                break
            rest = member.d.unused_data
            pos += len(data) - len(rest)
            if not member.whole():
                return good
            good, data, member = pos, rest, _Member()


class _Member:
    """One gzip member being decompressed: its first 64 KiB (the header), its last 4
    bytes and its length are enough to check the record's framing."""

    def __init__(self) -> None:
        self.d = zlib.decompressobj(31)
        self.head = b""
        self.tail = b""
        self.size = 0

    def feed(self, data: bytes) -> None:
        plain = self.d.decompress(data)
        if len(self.head) < 65536:
            self.head += plain[: 65536 - len(self.head)]
        self.tail = (self.tail + plain[-4:])[-4:]
        self.size += len(plain)

    def whole(self) -> bool:
        try:
            header_len, content_len = parse_header(self.head)
        except RecordError:
            return False
        return self.tail == TRAILER and self.size == header_len + content_len + 4
