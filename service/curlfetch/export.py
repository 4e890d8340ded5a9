"""Exports: a client's selected jobs as one WARC file, or as NDJSON job views.

A WARC export is a ``warcinfo`` record, then for each job with a body its ``response``
record, then one ``metadata`` record with the counts and ``export-complete: true``: a
reader that does not find that last record knows the export was cut short.

The records are the stored ones, copied byte for byte from the segments (not rebuilt):
what an archive holds is exactly what the service stored. Only the compression is
converted when the export's differs from the segment's (``.warc.gz`` from a plain
segment: the record becomes one gzip member; ``.warc`` from a gzip segment: the member
is inflated). Every payload is checked against its stored sha256 on the way. A body of
the earlier file-per-body store has no record: one is built from the job's result
(status line, headers, address) around the stored bytes, and counted apart. A body whose
record is gone or damaged becomes a ``metadata`` record naming the job and the reason,
so the export goes on and says what it lacks.

Records up to ``BUFFER_LIMIT`` are read and checked whole before any byte is sent, so
damage found in one costs only that record. A larger one is streamed: damage found
midway raises ``BodyLostError`` after part of it was sent, and the caller must then
break the export off (the API closes the connection before the final chunk).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterable, Iterator
from http.client import responses
from typing import BinaryIO

import attrs

from . import warc
from .bodies import BodyLostError, open_stored
from .jobs import BodyInfo, Job, JobResult
from .segments import SegmentBodyStore, check_record

BUFFER_LIMIT = 1024 * 1024
"""Records up to this size (as stored) are checked whole before they are sent."""
CHUNK = 1024 * 1024


@attrs.define
class ExportCounts:
    """What an export held, for its closing record."""

    jobs: int = 0
    responses: int = 0
    """Records copied from segments."""
    built: int = 0
    """Records built around bodies of the file-per-body store."""
    skipped: int = 0
    """Bodies whose record was gone or damaged (a metadata record says which)."""
    no_body: int = 0
    """Selected jobs without a stored body (not finished, failed, or no content)."""
    not_modified: int = 0
    """Jobs answered 304: a metadata record names the job whose body it is (copying that
    record again would repeat its WARC-Record-ID)."""


class WarcExport:
    """The records of one WARC export, as byte chunks: ``head()``, ``job()`` for each
    selected job, then ``tail()``. ``gzip``: each record its own gzip member."""

    def __init__(
        self,
        bodies: SegmentBodyStore,
        *,
        gzip: bool,
        filename: str,
        now: float,
        fields: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.bodies = bodies
        self.gzip = gzip
        self.filename = filename
        self.now = now
        self.fields = tuple(fields)
        self.warcinfo_id = warc.record_id()
        self.counts = ExportCounts()

    def head(self) -> bytes:
        return self._out(
            warc.warcinfo(self.filename, self.warcinfo_id, self.now, self.fields),
        )

    def job(self, job: Job) -> Iterator[bytes]:
        """The job's record (nothing for a job without a body)."""
        self.counts.jobs += 1
        result = job.result
        info = result.body if result is not None else None
        if result is not None and result.not_modified:
            self.counts.not_modified += 1
            yield self._metadata(
                job.spec.url,
                [
                    ("curlfetch-job-id", job.id),
                    ("curlfetch-not-modified", "true"),
                    ("curlfetch-body-of", result.body_of or ""),
                ],
            )
            return
        if result is None or info is None:
            self.counts.no_body += 1
            return
        try:
            if info.segment is None:
                chunks = self._built(job, result, info)
            else:
                chunks = self._copied(job, info)
            if info.length <= BUFFER_LIMIT and info.size <= BUFFER_LIMIT:
                chunks = iter(list(chunks))  # checked whole before a byte goes out
        except BodyLostError as e:
            self.counts.skipped += 1
            yield self._lost(job, e.reason)
            return
        if info.segment is None:
            self.counts.built += 1
        else:
            self.counts.responses += 1
        yield from chunks

    def tail(self) -> bytes:
        c = self.counts
        return self._metadata(
            None,
            [
                ("export-jobs", str(c.jobs)),
                ("export-responses", str(c.responses)),
                ("export-responses-built", str(c.built)),
                ("export-skipped", str(c.skipped)),
                ("export-no-body", str(c.no_body)),
                ("export-not-modified", str(c.not_modified)),
                ("export-complete", "true"),
            ],
        )

    # -- records ---------------------------------------------------------------------------

    def _copied(self, job: Job, info: BodyInfo) -> Iterator[bytes]:
        """The stored record, opened and its framing checked now (``BodyLostError``)."""
        opened = self.bodies.read_record(info)
        if opened is None:
            raise BodyLostError(job.id, f"its segment {info.segment} is missing")
        f, offset, length = opened
        source_gzip = str(info.segment).endswith(".gz")
        try:
            check_record(f, info, source_gzip, job.id)
        except BaseException:
            f.close()
            raise
        return self._copy(f, offset, length, source_gzip=source_gzip, job=job, info=info)

    def _copy(
        self, f: BinaryIO, offset: int, length: int, *, source_gzip: bool, job: Job, info: BodyInfo
    ) -> Iterator[bytes]:
        check = _PayloadCheck(job.id, info)
        inflate = zlib.decompressobj(31) if source_gzip else None
        deflate = _deflater() if self.gzip and not source_gzip else None
        with f:
            at, end = offset, offset + length
            while at < end:
                raw = os.pread(f.fileno(), min(CHUNK, end - at), at)
                if not raw:
                    raise BodyLostError(job.id, "its record ends early")
                at += len(raw)
                plain = raw
                if inflate is not None:
                    try:
                        plain = inflate.decompress(raw)
                    except zlib.error as e:
                        raise BodyLostError(job.id, f"its record is damaged ({e})") from None
                check.feed(plain)
                if self.gzip == source_gzip:
                    yield raw
                elif deflate is not None:
                    if out := deflate.compress(plain):
                        yield out
                elif plain:
                    yield plain
        if inflate is not None and (not inflate.eof or inflate.unused_data):
            raise BodyLostError(job.id, "its record's gzip member is damaged")
        check.done()
        if deflate is not None:
            yield deflate.flush()

    def _built(self, job: Job, result: JobResult, info: BodyInfo) -> Iterator[bytes]:
        """A record around a body of the file-per-body store (opened now)."""
        legacy = self.bodies.legacy
        if legacy is None:
            raise BodyLostError(job.id, "it was stored by a file body store that is gone")
        f = open_stored(legacy, job.id, info.size)
        meta = warc.ResponseMeta(
            target_uri=result.effective_url or job.spec.url,
            ip_address=result.primary_ip,
            date=job.started_at or job.finished_at or job.created_at,
            head=_head(result),
        )
        header = warc.response_header(meta, info.size, bytes.fromhex(info.sha256), self.warcinfo_id)
        return self._build(f, header + meta.head, job, info)

    def _build(self, f: BinaryIO, head: bytes, job: Job, info: BodyInfo) -> Iterator[bytes]:
        digest = hashlib.sha256()
        deflate = _deflater() if self.gzip else None

        def out(data: bytes) -> bytes:
            return data if deflate is None else deflate.compress(data)

        with f:
            yield out(head)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                yield out(chunk)
        if digest.hexdigest() != info.sha256:
            raise BodyLostError(job.id, "its stored bytes do not match its sha256")
        yield out(warc.TRAILER)
        if deflate is not None:
            yield deflate.flush()

    def _lost(self, job: Job, reason: str) -> bytes:
        return self._metadata(
            job.spec.url,
            [("curlfetch-job-id", job.id), ("curlfetch-body-lost", reason)],
        )

    def _metadata(self, target_uri: str | None, fields: list[tuple[str, str]]) -> bytes:
        return self._out(
            warc.metadata(target_uri, warc.record_id(), self.now, self.warcinfo_id, fields)
        )

    def _out(self, record: bytes) -> bytes:
        return warc.gzip_member(record) if self.gzip else record


class _PayloadCheck:
    """The sha256 of the payload part of a record's (uncompressed) bytes, fed in order."""

    def __init__(self, job_id: str, info: BodyInfo) -> None:
        self.job_id = job_id
        self.info = info
        self.at = 0  # offset in the record of the next byte fed
        self.first = info.payload_at
        self.end = info.payload_at + info.size
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        start, stop = self.at, self.at + len(data)
        lo, hi = max(start, self.first), min(stop, self.end)
        if lo < hi:
            self.digest.update(memoryview(data)[lo - start : hi - start])
        self.at = stop

    def done(self) -> None:
        if self.at < self.end or self.digest.hexdigest() != self.info.sha256:
            raise BodyLostError(self.job_id, "its stored bytes do not match its sha256")


def _deflater() -> zlib._Compress:
    return zlib.compressobj(warc.GZIP_LEVEL, zlib.DEFLATED, 31)


def _head(result: JobResult) -> bytes:
    """The response head a record built for a file-store body carries: the stored
    status and headers (the original reason phrase was not kept: the standard one)."""
    reason = responses.get(result.status, "")
    version = result.http_version or "1.1"
    lines = [f"HTTP/{version} {result.status} {reason}".rstrip().encode("latin-1")]
    lines += [f"{name}: {value}".encode("utf-8", "replace") for name, value in result.headers]
    return warc.http_head(lines)
