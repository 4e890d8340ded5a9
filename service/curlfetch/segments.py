"""The body store: response bodies appended to WARC segments, made durable in groups.

One file and one fsync per body cost more than fetching a small body does (two thirds
of the service's time went there). Here every body becomes a WARC/1.1 ``response``
record (``warc.py``) appended to the instance's current segment, and one thread makes
records durable in groups: one ``pwrite`` and one ``fdatasync`` for every body that
finished while the previous group was being synced (group commit, as a database's
log does). A job says ``succeeded`` only after its group is synced, and its row records
where the record is (``BodyInfo``: segment, offset, length, where the payload starts).

Bounds. A group holds at most ``GROUP_BYTES`` (8 MiB) of records, and a record waits
at most for the group being synced when it arrived, then for its own: nothing waits
on a timer. A body is kept in memory up to ``memory_limit`` (256 KiB); past it, it
streams to a spill file under ``spool/`` while it transfers, hashed on the way, and at
commit the writer thread copies it into the segment in the kernel
(``copy_file_range``), so no body is ever whole in memory.

Segments are named ``curlfetch-<UTC time>-<instance>-<n>.warc[.gz]``; while written
they carry a ``.open`` suffix (as Heritrix's do), removed when the segment is sealed:
at ``max_segment_bytes`` (1 GiB), at ``max_segment_age`` (1 h, even when idle), or at
close. A row names the sealed name; readers look for either. Each begins with a
``warcinfo`` record. Each instance writes its own segments, so several instances share
one volume.

After a crash, ``recover`` truncates an ``.open`` segment to its last whole record (a
torn group: no job row points into it, since rows are saved after the sync) and seals
it. Retention deletes a sealed segment once it is older than the retention: every job
whose body it holds finished before its last write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import socket
import threading
import time
import uuid
import zlib
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import warc
from .bodies import (
    RESERVE,
    BodyLostError,
    BodyStoreClosedError,
    BodyWriter,
    DirectoryBodyStore,
    SpillingWriter,
    _ensure_room,
    _fsync_dir,
    _make_dirs,
    is_disk_full,
    open_stored,
    still_full,
)
from .jobs import BodyInfo

log = Logger()

MEMORY_LIMIT = 256 * 1024
GROUP_BYTES = 8 * 1024 * 1024
MAX_SEGMENT_BYTES = 1024 * 1024 * 1024
MAX_SEGMENT_AGE = 3600.0
SPOOL = "spool"
OPEN_SUFFIX = ".open"
_COPY_CHUNK = 8 * 1024 * 1024
_SEGMENT = re.compile(r"curlfetch-\d{8}T\d{12}Z-[0-9A-Za-z._-]+-\d{5}\.warc(\.gz)?\Z")
_INSTANCE_UNSAFE = re.compile(r"[^0-9A-Za-z._-]+")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_CREATE_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_spill_numbers = itertools.count()


def default_instance() -> str:
    """``host-pid-random``: a segment name never collides with another process's."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SegmentBodyStore:
    """Bodies as WARC records in segment files under ``root`` (see the module's text).

    ``legacy``: the file-per-body store of earlier versions, still read (bodies whose
    ``BodyInfo`` names no segment) and purged; written only with ``write_files`` (the
    ``--body-store files`` of this release, for comparison). ``compression``: "none",
    or "gzip" for ``.warc.gz`` segments, each record its own gzip member.
    """

    def __init__(
        self,
        reactor: Any,
        root: str | os.PathLike[str],
        *,
        instance: str = "",
        compression: str = "none",
        memory_limit: int = MEMORY_LIMIT,
        max_segment_bytes: int = MAX_SEGMENT_BYTES,
        max_segment_age: float = MAX_SEGMENT_AGE,
        group_bytes: int = GROUP_BYTES,
        legacy: DirectoryBodyStore | None = None,
        write_files: bool = False,
    ) -> None:
        if write_files and legacy is None:
            raise ValueError("write_files needs the file store (legacy)")
        if compression not in ("none", "gzip"):
            raise ValueError(f"compression must be none or gzip, not {compression!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.spool = os.path.join(self.root, SPOOL)
        self.instance = _INSTANCE_UNSAFE.sub("_", instance or default_instance())[:64]
        self.gzip = compression == "gzip"
        self.memory_limit = memory_limit
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age = max_segment_age
        self.group_bytes = group_bytes
        self.legacy = legacy
        self.write_files = write_files
        self.groups = 0  # groups synced (tests and metrics see the grouping)
        self.records = 0
        self.bytes_written = 0
        self._reactor = reactor
        self._lock = threading.Condition()
        self._pending: list[SegmentWriter] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._ended = False
        self._trigger: Any = None
        self._full_error: OSError | None = None
        self._segment: _Segment | None = None  # the writer thread's alone
        self._serial = itertools.count(1)
        _make_dirs(self.root, (SPOOL,))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent; the first commit also does)."""
        if self._closing:
            raise BodyStoreClosedError(f"{self.root}: the body store is closed")
        if self.legacy is not None and self.write_files:
            self.legacy.start()
        else:
            self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="bodies-writer", daemon=True)
        self._thread.start()
        # A reactor that stops without close() still seals the segment and joins.
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._join)

    def close(self) -> Deferred[None]:
        """Write every body handed over, seal the segment, stop the thread."""
        if self.legacy is not None and self.write_files:
            return self.legacy.close()
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is None or self._ended:
            return succeed(None)
        if self._stopped is None:
            self._stopped = Deferred()
        return self._stopped

    def _join(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        thread = self._thread
        if thread is not None:
            thread.join(60)

    def _thread_ended(self) -> None:
        self._ended = True
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    # -- writing -------------------------------------------------------------------------

    def open_writer(self, job_id: str) -> BodyWriter:
        """No I/O: the body stays in memory until it grows past ``memory_limit``."""
        if self.legacy is not None and self.write_files:
            return self.legacy.open_writer(job_id)
        if not _JOB_ID.match(job_id):
            raise ValueError(f"invalid job id for a body: {job_id!r}")
        return SegmentWriter(self, job_id)

    def _enqueue(self, writer: SegmentWriter) -> None:
        with self._lock:
            if self._closing:
                raise BodyStoreClosedError(f"{self.root}: the body store is closed")
            self._pending.append(writer)
            if len(self._pending) == 1:
                self._lock.notify()
        self._start_thread()

    def _run(self) -> None:
        """The writer thread: take what is pending, append it, sync it, report it."""
        try:
            while True:
                with self._lock:
                    while not self._pending and not self._closing:
                        wait = self._seal_due()
                        if wait is not None and wait <= 0:
                            break
                        self._lock.wait(wait)
                    batch = self._take()
                    closing = self._closing
                if batch:
                    try:
                        results = self._write_group(batch)
                    except Exception as e:  # a bug: fail the group, keep the thread
                        log.failure("writing a group of bodies failed")
                        results = [e] * len(batch)
                    self._reactor.callFromThread(self._done, batch, results)
                elif closing:
                    break
                else:
                    self._seal_quietly()  # idle past the segment's age
        finally:
            self._seal_quietly()
            self._reactor.callFromThread(self._thread_ended)

    def _seal_quietly(self) -> None:
        """Seal, logging a failure: the thread must outlive any one segment's trouble
        (the next group opens a new segment)."""
        try:
            self._seal()
        except OSError:
            log.failure("sealing a segment failed")

    def _take(self) -> list[SegmentWriter]:
        pending = self._pending
        total = 0
        for i, writer in enumerate(pending):
            total += writer.size + 1024
            if total > self.group_bytes and i:
                self._pending = pending[i:]
                return pending[:i]
        self._pending = []
        return pending

    def _seal_due(self) -> float | None:
        segment = self._segment
        if segment is None:
            return None
        return segment.created + self.max_segment_age - time.time()

    def _write_group(self, batch: list[SegmentWriter]) -> list[BodyInfo | Exception]:
        """In the writer thread: append every record, then one fdatasync for them all;
        once more in a new segment if the file was removed under us."""
        results = self._try_group(batch)
        if any(isinstance(r, _SegmentGoneError) for r in results):
            results = self._try_group(batch)
        for writer in batch:
            writer._discard()
        return results

    def _try_group(self, batch: list[SegmentWriter]) -> list[BodyInfo | Exception]:
        try:
            _ensure_room(self.root, sum(w.size for w in batch) + 4096 * len(batch))
            segment = self._current()
        except Exception as e:
            return [e] * len(batch)
        start = segment.size
        results: list[BodyInfo | Exception] = []
        try:
            buffer: list[bytes] = []
            buffered_at = pos = start  # where the buffered records go; the next record
            for writer in batch:
                if writer.spill_path is None:
                    record, info = self._record(writer, segment, pos)
                    buffer.append(record)
                else:
                    segment.write(b"".join(buffer), buffered_at)
                    buffer = []
                    info = self._copy_spilled(writer, segment, pos)
                    buffered_at = pos + info.length
                pos += info.length
                results.append(info)
            segment.write(b"".join(buffer), buffered_at)
            segment.sync()
            segment.check_linked()
        except Exception as e:
            # Nothing of this group is durable: cut it off so that the segment ends on a
            # whole record, and roll over if the file itself is in doubt (a failed sync).
            segment.abandon_from(start)
            if segment.broken:
                with contextlib.suppress(OSError):
                    self._seal()
                self._segment = None
            return [e] * len(batch)
        self.groups += 1
        self.records += len(batch)
        self.bytes_written += segment.size - start
        if segment.size >= self.max_segment_bytes:
            self._seal()
        return results

    def _record(self, writer: SegmentWriter, segment: _Segment, pos: int) -> tuple[bytes, BodyInfo]:
        payload = b"".join(writer._chunks)
        digest = hashlib.sha256(payload).digest()
        meta = writer.meta
        assert meta is not None
        header = warc.response_header(meta, len(payload), digest, segment.warcinfo_id)
        record = b"".join((header, meta.head, payload, warc.TRAILER))
        if self.gzip:
            record = warc.gzip_member(record)
        info = BodyInfo(
            size=len(payload),
            sha256=digest.hex(),
            segment=segment.name,
            offset=pos,
            length=len(record),
            payload_at=len(header) + len(meta.head),
        )
        return record, info

    def _copy_spilled(self, writer: SegmentWriter, segment: _Segment, pos: int) -> BodyInfo:
        """A spilled body: its header, then the spill file copied in (in the kernel when
        uncompressed; through one gzip member otherwise), then the trailer."""
        meta, spill = writer.meta, writer._file
        assert meta is not None
        assert spill is not None
        spill.flush()
        digest = writer._hash.digest()
        size = writer.size
        header = warc.response_header(meta, size, digest, segment.warcinfo_id)
        src = spill.fileno()
        if not self.gzip:
            at = segment.write(header + meta.head, pos)
            copied = 0
            while copied < size:
                n = _copy_range(src, segment.fd, size - copied, copied, at)
                if n <= 0:
                    raise OSError(errno.EIO, f"{writer.spill_path}: short copy")
                copied += n
                at += n
            end = segment.write(warc.TRAILER, at)
        else:
            c = zlib.compressobj(warc.GZIP_LEVEL, zlib.DEFLATED, 31)
            at = segment.write(c.compress(header + meta.head), pos)
            offset = 0
            while offset < size:
                chunk = os.pread(src, min(_COPY_CHUNK, size - offset), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"{writer.spill_path}: short read")
                offset += len(chunk)
                at = segment.write(c.compress(chunk), at)
            end = segment.write(c.compress(warc.TRAILER) + c.flush(), at)
        return BodyInfo(
            size=size,
            sha256=digest.hex(),
            segment=segment.name,
            offset=pos,
            length=end - pos,
            payload_at=len(header) + len(meta.head),
        )

    def _current(self) -> _Segment:
        segment = self._segment
        if segment is not None and (
            segment.size >= self.max_segment_bytes
            or time.time() - segment.created >= self.max_segment_age
        ):
            self._seal()
            segment = None
        if segment is None:
            segment = self._segment = _Segment.create(self, next(self._serial))
        return segment

    def _seal(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.seal()

    def _done(self, batch: list[SegmentWriter], results: list[BodyInfo | Exception]) -> None:
        """In the reactor thread: the group is durable (or failed as a whole)."""
        for writer, result in zip(batch, results, strict=True):
            if isinstance(result, BodyInfo):
                self._full_error = None
                writer._done(result)
            else:
                if is_disk_full(result):
                    self._full_error = result
                writer._done(Failure(result))

    # -- health --------------------------------------------------------------------------

    def note_disk_full(self, error: BaseException) -> None:
        """A spill file could not grow for lack of space: remembered for readiness."""
        if self.legacy is not None and self.write_files:
            self.legacy.note_disk_full(error)
        elif is_disk_full(error):
            self._full_error = error

    def storage_full(self, min_free: int = RESERVE + GROUP_BYTES) -> str | None:
        """Why bodies cannot be stored now, or None (for readiness); clears itself once
        ``min_free`` bytes are free again, so readiness recovers with no job running."""
        if self.legacy is not None and self.write_files:
            return self.legacy.storage_full()
        if self._full_error is None:
            return None
        reason = still_full(self.root, self._full_error, min_free)
        if reason is None:
            self._full_error = None
        return reason

    # -- reading -------------------------------------------------------------------------

    def segment_path(self, name: str) -> str | None:
        """Where segment ``name`` is now (sealed, or still open), or None."""
        if not _SEGMENT.match(name):
            return None
        path = os.path.join(self.root, name)
        for candidate in (path, path + OPEN_SUFFIX, path):
            if os.path.exists(candidate):
                return candidate
        return None

    def open_payload(self, job_id: str, info: BodyInfo) -> PayloadReader:
        """The payload of a committed body, for reading; ``BodyLostError`` if its record is
        gone or is not what was recorded. Bodies up to ``memory_limit`` are checked
        against their sha256 here (a read of a few KiB); larger ones are checked for their
        framing, and a damaged gzip member stops the read with ``BodyLostError``."""
        if info.segment is None:
            if self.legacy is None:
                raise BodyLostError(job_id, "it was stored by a file body store that is gone")
            file = open_stored(self.legacy, job_id, info.size)
            return PayloadReader(
                file, gzipped=False, start=0, size=info.size, job_id=job_id, sha256=info.sha256
            )
        path = self.segment_path(info.segment)
        if path is None:
            raise BodyLostError(job_id, f"its segment {info.segment} is missing")
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to the reader
        except FileNotFoundError:
            raise BodyLostError(job_id, f"its segment {info.segment} is missing") from None
        try:
            gzipped = info.segment.endswith(".gz")
            check_record(f, info, gzipped, job_id)
            reader = PayloadReader(
                f,
                gzipped=gzipped,
                start=info.offset,
                size=info.size,
                job_id=job_id,
                payload_at=info.payload_at,
                length=info.length,
                sha256=info.sha256,
            )
            if info.size <= self.memory_limit:
                reader.verify()
            return reader
        except BaseException:
            f.close()
            raise

    def read_record(self, info: BodyInfo) -> tuple[BinaryIO, int, int] | None:
        """The stored record's bytes as they are in the segment: an open file, offset and
        length (for exports, which copy records rather than rebuild them); None if the
        segment is gone."""
        if info.segment is None:
            return None
        path = self.segment_path(info.segment)
        if path is None:
            return None
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            return None
        return f, info.offset, info.length

    # -- recovery and retention ------------------------------------------------------------

    def recover(self, stale_after: float | None = None) -> tuple[int, int, int]:
        """At start-up, before writing: truncate each ``.open`` segment to its last whole
        record and seal it; remove spill files. ``stale_after`` (seconds) when the volume
        is shared: only files not written to for that long are another instance's dead
        ones, unless named with this instance's id (a restart with a fixed
        ``--instance-id``: its predecessor's, dead). Returns (segments repaired, bytes
        cut, spill files removed)."""
        cutoff = time.time() - (stale_after or 0.0)
        repaired = cut = 0
        mine = f"-{self.instance}-"  # a fixed --instance-id's own: never another's live one
        for name in sorted(os.listdir(self.root)):
            if not name.endswith(OPEN_SUFFIX) or not _SEGMENT.match(name[: -len(OPEN_SUFFIX)]):
                continue
            path = os.path.join(self.root, name)
            try:
                stale = stale_after is None or mine in name or os.stat(path).st_mtime <= cutoff
                if not stale:
                    continue
                cut += _repair(path, gzipped=name.endswith(".gz" + OPEN_SUFFIX))
            except FileNotFoundError:
                continue
            repaired += 1
        if repaired:
            _fsync_dir(self.root)
        spilled = 0
        mine_spilled = f"~{self.instance}~"  # <job>~<instance>~<pid>-<n>.spill
        for name in os.listdir(self.spool):
            path = os.path.join(self.spool, name)
            with contextlib.suppress(FileNotFoundError):
                if stale_after is None or mine_spilled in name or os.stat(path).st_mtime <= cutoff:
                    os.unlink(path)
                    spilled += 1
        return repaired, cut, spilled

    def delete_expired(self, written_before: float) -> int:
        """Delete sealed segments last written before ``written_before``: each job whose
        body one holds finished after its record was synced, so before that too."""
        removed = 0
        for name in os.listdir(self.root):
            if not _SEGMENT.match(name):
                continue  # open segments, the spool, anything else: not ours to delete
            path = os.path.join(self.root, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < written_before:
                    os.unlink(path)
                    removed += 1
        return removed

    def delete(self, job_ids: list[str]) -> int:
        """Bodies of the legacy store for these purged jobs (segments go by age)."""
        return 0 if self.legacy is None else self.legacy.delete(job_ids)


class _SegmentGoneError(OSError):
    """The open segment's file was deleted (by hand?): its group is written again."""


_JOB_ID = re.compile(r"[0-9A-Za-z_-]{4,128}\Z")


def _copy_range(src: int, dst: int, count: int, src_at: int, dst_at: int) -> int:
    """In the kernel where it can (copy_file_range), by reading and writing if not."""
    try:
        return os.copy_file_range(src, dst, count, src_at, dst_at)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    chunk = os.pread(src, min(count, _COPY_CHUNK), src_at)
    return os.pwrite(dst, chunk, dst_at) if chunk else 0


class _Segment:
    """The writer thread's open segment: a descriptor, its size, its warcinfo's id."""

    def __init__(self, name: str, path: str, fd: int, warcinfo_id: str) -> None:
        self.name = name
        self.path = path  # with the .open suffix until sealed
        self.fd = fd
        self.warcinfo_id = warcinfo_id
        self.created = time.time()
        self.size = 0
        self.synced_entry = False
        self.broken = False

    @classmethod
    def create(cls, store: SegmentBodyStore, serial: int) -> _Segment:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        micros = f"{int(time.time() * 1e6) % 1_000_000:06d}"
        suffix = ".warc.gz" if store.gzip else ".warc"
        name = f"curlfetch-{stamp}{micros}Z-{store.instance}-{serial:05d}{suffix}"
        path = os.path.join(store.root, name + OPEN_SUFFIX)
        fd = os.open(path, _CREATE, 0o644)
        rid = warc.record_id()
        segment = cls(name, path, fd, rid)
        try:
            info = warc.warcinfo(
                name,
                rid,
                time.time(),
                (("hostname", socket.gethostname()), ("instance", store.instance)),
            )
            segment.write(warc.gzip_member(info) if store.gzip else info, 0)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return segment

    def write(self, data: bytes, pos: int) -> int:
        """Write ``data`` at ``pos``; returns the offset after it."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        self.size = max(self.size, pos)
        return pos

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
            if not self.synced_entry:
                _fsync_dir(os.path.dirname(self.path))  # the new file's entry, once
                self.synced_entry = True
        except OSError:
            self.broken = True  # after a failed fsync, what the file holds is unknown
            raise

    def check_linked(self) -> None:
        """Raise ``_SegmentGoneError`` if the file was deleted while open: what was
        written to it is gone with it."""
        if os.fstat(self.fd).st_nlink == 0:
            self.broken = True
            raise _SegmentGoneError(errno.ENOENT, f"{self.path} was removed")

    def abandon_from(self, start: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, start)
            self.size = start

    def seal(self) -> None:
        """Closed for good, renamed to its name without ``.open`` (durably)."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if not self.broken:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if self.broken and not os.path.exists(self.path):
            return  # removed under us: nothing to rename
        final = self.path[: -len(OPEN_SUFFIX)]
        os.replace(self.path, final)
        self.path = final
        _fsync_dir(os.path.dirname(final))


def _repair(path: str, *, gzipped: bool) -> int:
    """Truncate an open segment to its last whole record and seal it; bytes cut."""
    with open(path, "r+b") as f:
        end = warc.scan_end(f, gzipped=gzipped)
        size = os.fstat(f.fileno()).st_size
        if end < size:
            f.truncate(end)
        os.fsync(f.fileno())
    os.replace(path, path[: -len(OPEN_SUFFIX)])
    return size - end


def check_record(f: BinaryIO, info: BodyInfo, gzipped: bool, job_id: str) -> None:
    """The record is where the row says, whole (cheap: its size, its first and last
    bytes): what a truncated, overwritten or replaced segment fails."""
    size = os.fstat(f.fileno()).st_size
    if size < info.offset + info.length:
        raise BodyLostError(job_id, f"its segment {info.segment} is cut short")
    first = os.pread(f.fileno(), 8, info.offset)
    if gzipped:
        ok = first[:2] == b"\x1f\x8b"
    else:
        last = os.pread(f.fileno(), 4, info.offset + info.length - 4)
        ok = first == warc.WARC_VERSION and last == warc.TRAILER
    if not ok:
        raise BodyLostError(job_id, f"its record in {info.segment} is damaged")


class PayloadReader:
    """A file-like ``read``/``close`` over one stored payload, or a range of it
    (``seek_payload``): a plain slice of the segment, or decompressed from the start of
    its gzip member. Damage found while reading raises ``BodyLostError``: a whole
    payload is hashed as it is read, and the read that would return its last bytes
    raises instead if the sha256 is not the recorded one, so a reader never gets a
    complete wrong body (a server then cuts the response short)."""

    def __init__(
        self,
        f: BinaryIO,
        *,
        gzipped: bool,
        start: int,
        size: int,
        job_id: str,
        payload_at: int = 0,
        length: int = 0,
        sha256: str | None = None,
    ) -> None:
        self._f = f
        self._sha256 = sha256
        self._digest: Any = None  # the whole payload's sha256 as it is read
        self._verified = False
        self._gzipped = gzipped
        self._start = start
        self._length = length
        self._payload_at = payload_at
        self.size = size
        self.job_id = job_id
        self._left = size
        self._d: Any = None
        self._pending = b""
        self._pos = 0  # the next payload byte read returns
        self.seek_payload(0, size)

    def seek_payload(self, first: int, count: int) -> None:
        """From here, ``read`` returns payload bytes ``first`` .. ``first + count - 1``."""
        self._left = count
        self._pos = first
        whole = first == 0 and count == self.size and self._sha256 is not None
        whole = whole and not self._verified
        self._digest = hashlib.sha256() if whole else None
        if not self._gzipped:
            self._f.seek(self._start + self._payload_at + first)
            return
        self._f.seek(self._start)
        self._d = zlib.decompressobj(31)
        self._pending = b""
        self._skip(self._payload_at + first)

    def _inflate(self) -> bytes:
        remaining = self._length - (self._f.tell() - self._start)
        data = self._f.read(min(256 * 1024, max(0, remaining)))
        try:
            out: bytes = self._d.decompress(data) if data else b""
        except zlib.error as e:
            raise BodyLostError(self.job_id, f"its record is damaged ({e})") from None
        if not data and not out:
            raise BodyLostError(self.job_id, "its record ends early")
        return out

    def _skip(self, count: int) -> None:
        while count > 0:
            data = self._pending or self._inflate()
            self._pending = data[count:]
            count -= min(count, len(data))

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if n < 0 else min(n, self._left)
        if not self._gzipped:
            data = self._f.read(want)
            if len(data) < want and not data:
                raise BodyLostError(self.job_id, "its record ends early")
        else:
            data = self._pending or self._inflate()
            self._pending = data[want:]
            data = data[:want]
        self._left -= len(data)
        self._pos += len(data)
        if self._digest is not None:
            self._digest.update(data)
            if self._left <= 0 and self._digest.hexdigest() != self._sha256:
                raise BodyLostError(self.job_id, "its stored bytes do not match its sha256")
        return data

    def verify(self) -> None:
        """Read it all (``read`` hashes a whole payload and raises on a mismatch), then
        rewind; a verified payload is served without being hashed again."""
        self.seek_payload(0, self.size)
        while self.read(1 << 20):
            pass
        # An empty payload is never read, so its hash is compared here.
        if self._digest is None or self._digest.hexdigest() != self._sha256:
            raise BodyLostError(self.job_id, "its stored bytes do not match its sha256")
        self._verified = True
        self.seek_payload(0, self.size)

    def close(self) -> None:
        self._f.close()


class SegmentWriter(SpillingWriter):
    """One body: chunks in memory, or past the store's ``memory_limit`` in a spill file
    under ``spool/``, copied into its record by the writer thread."""

    needs_meta = True

    def __init__(self, store: SegmentBodyStore, job_id: str) -> None:
        super().__init__(store.root, store.memory_limit)
        self.job_id = job_id
        self.spill_path: str | None = None
        self._store = store

    def _open_spill(self) -> BinaryIO:
        # ``~`` is in neither a job id nor an instance id: recover() tells its own apart.
        name = f"{self.job_id}~{self._store.instance}~{os.getpid()}-{next(_spill_numbers)}.spill"
        path = os.path.join(self._store.spool, name)
        try:
            fd = os.open(path, _CREATE_RW, 0o600)
        except FileNotFoundError:
            _make_dirs(self._store.spool, ())  # removed under us: once more
            fd = os.open(path, _CREATE_RW, 0o600)
        self.spill_path = path
        return os.fdopen(fd, "w+b")

    def _enqueue(self) -> None:
        self._store._enqueue(self)

    def _discard(self) -> None:
        self._chunks = []
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        path, self.spill_path = self.spill_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
