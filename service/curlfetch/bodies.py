"""The file-per-body store of earlier versions, and what every body store shares.

``segments.py`` is the body store now (WARC records in segments, synced in groups). This
one stays for one release: bodies it wrote stay readable (``open_stored``) and are
purged by retention, and ``--body-store files`` still writes with it so that the
benchmark can show both side by side. The protocols (``BodyWriter``), ``BodyConsumer``,
``BodyLostError`` and the free-space reserve are shared by both.

A body is written to a temporary file beside its final name, hashed, fsynced, and renamed
into place, and the directory is fsynced, so a body path either does not exist or holds a
complete, durable body: a crash or an abort mid-write never leaves a partial file under
the final name. The job row records the ``BodyInfo`` (size, sha256) that ``commit()``
fires with, and is saved only after that.

Where the work runs: creating, fsyncing and renaming a file costs far more than fetching
a small body (hundreds of microseconds each, measured on ext4), so none of it runs in
the reactor thread. A
body is buffered in memory while its transfer runs (up to ``memory_limit``, 1 MiB;
beyond that it spills to its temporary file, whose writes are short page-cache copies);
``commit()`` hands it to a small dedicated thread pool that writes, fsyncs and renames
whole batches, fsyncing each directory once per batch (group commit). The pool starts
with the store (``start``, or the first commit) and stops with ``close``.

"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import time
import zlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any, BinaryIO, Protocol, Self, TypeGuard

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .jobs import BodyInfo
from .warc import ResponseMeta

_ID = re.compile(r"[0-9A-Za-z_-]{4,128}\Z")
_TEMP_SUFFIX = ".tmp"
SHARDS = tuple(f"{i:02x}" for i in range(256))
_SHARD_SET = frozenset(SHARDS)
MEMORY_LIMIT = 1024 * 1024
RESERVE = 8 * 1024 * 1024
"""Bytes of the data directory's filesystem that bodies leave free, for the job database
(SQLite shares it) and its WAL: on a filling disk the bodies fail with ``storage_full``
first, and the database can still record that, and everything else, to the last job."""
_ROOM_CHECK_EVERY = 1024 * 1024
"""A spilling body checks the free space again after this many bytes (one ``statvfs``)."""
"""Bytes of one body kept in memory before it spills to its temporary file."""
MAX_BATCH = 64
"""Bodies one commit thread writes, fsyncs and renames together, at most."""
MIN_SPLIT = 8
"""A batch is split over several threads only beyond this many bodies per thread: each
hand-off to a thread costs the reactor too."""
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_temp_numbers = itertools.count()


class BodyStoreClosedError(RuntimeError):
    """A commit after ``close()``: the store's threads are gone."""


class BodyWriter(Protocol):
    """One body being written: ``write`` chunks, then exactly one of ``commit``/``abort``."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def write(self, data: bytes) -> None: ...

    def commit(self, meta: ResponseMeta | None = None) -> Deferred[BodyInfo]:
        """Make the body durable; fires with its size, hash and place once it is (never
        earlier). ``meta``: what a WARC record says of the response (the segment store
        needs it). On failure nothing may claim the body, and nothing is left behind."""

    def abort(self) -> None:
        """Discard what was written; the final name is left as it was. Idempotent; a
        no-op once ``commit`` was called."""


class BodyStore(Protocol):
    def open_writer(self, job_id: str) -> BodyWriter:
        """Start writing ``job_id``'s body; nothing is visible until ``commit``."""


class DirectoryBodyStore:
    """Bodies as files ``root/ab/<id>``, in 256 shard directories created up front.

    The shard is the id's last two characters (hex for ``new_job_id``: random, so bodies
    spread evenly); other ids go by a CRC of the id. 256 directories, not 65,536: each
    receives enough renames per batch for a shared directory fsync, and a fresh store
    does not create a directory per body. Bodies of the earlier ``root/ab/cd/<id>``
    layout are still found by ``path``, ``exists`` and ``delete``.

    ``reactor`` fires the commits' Deferreds; ``threads`` is the size of the commit pool.
    Construction creates the directories (blocking, once, at start-up).
    """

    def __init__(
        self,
        reactor: Any,
        root: str | os.PathLike[str],
        *,
        threads: int = 8,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.memory_limit = memory_limit
        self.threads = threads
        self.batches = 0  # commit batches run (tests use it to see the grouping)
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger: Any = None
        self._closed = False
        self._pending: list[FileBodyWriter] = []
        self._flush_call: IDelayedCall | None = None
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._full_error: OSError | None = None  # the last ENOSPC, until a body commits
        _make_dirs(self.root, SHARDS)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the commit threads (idempotent; the first commit also does)."""
        if self._closed:
            raise BodyStoreClosedError(f"{self.root}: the body store is closed")
        self._start_pool()

    def _start_pool(self) -> ThreadPool:
        if self._pool is not None:
            return self._pool
        pool = ThreadPool(0, self.threads, name="bodies")
        pool.start()
        self._pool = pool
        # As adbapi does: a reactor that stops without close() still joins the threads.
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)
        return pool

    def close(self) -> Deferred[None]:
        """Let every commit handed over finish, then stop the threads."""
        self._closed = True
        if self._pending or self._in_flight:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            return waiter.addCallback(lambda _: self._close_now())
        self._close_now()
        return succeed(None)

    def _close_now(self) -> None:
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._stop()

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    # -- health --------------------------------------------------------------------------

    def note_disk_full(self, error: BaseException) -> None:
        """A body could not be written for lack of space outside a commit (spilling to
        its temporary file mid-transfer): remembered as a commit's ENOSPC is."""
        if is_disk_full(error):
            self._full_error = error

    def storage_full(self, min_free: int = RESERVE + MEMORY_LIMIT * 4) -> str | None:
        """Why bodies cannot be stored now, or None (for readiness).

        Set by a body that failed with ENOSPC or EDQUOT; cleared by the next body that
        commits, or once the filesystem has ``min_free`` bytes free again (checked with
        ``statvfs``, a cheap local call, only while set), so readiness recovers by itself
        when space is freed even though no job is running."""
        if self._full_error is None:
            return None
        reason = still_full(self.root, self._full_error, min_free)
        if reason is None:
            self._full_error = None
        return reason

    # -- paths ---------------------------------------------------------------------------

    def _final_path(self, job_id: str) -> str:
        if not _ID.match(job_id):
            # Ids become path components: refuse anything that could leave the root.
            raise ValueError(f"invalid job id for a body path: {job_id!r}")
        shard = job_id[-2:]
        if shard not in _SHARD_SET:
            shard = SHARDS[zlib.crc32(job_id.encode("ascii")) & 0xFF]
        return os.path.join(self.root, shard, job_id)

    def _legacy_path(self, job_id: str) -> str:
        return os.path.join(self.root, job_id[-4:-2], job_id[-2:], job_id)

    def path(self, job_id: str) -> str:
        final = self._final_path(job_id)
        if not os.path.exists(final):
            legacy = self._legacy_path(job_id)
            if os.path.isfile(legacy):
                return legacy
        return final

    def open_writer(self, job_id: str) -> FileBodyWriter:
        """No I/O: the body stays in memory until it grows past ``memory_limit``."""
        return FileBodyWriter(self, self._final_path(job_id), self.memory_limit)

    def exists(self, job_id: str) -> bool:
        return os.path.isfile(self.path(job_id))

    def delete(self, job_ids: Iterable[str]) -> int:
        removed = 0
        for job_id in job_ids:
            for path in (self._final_path(job_id), self._legacy_path(job_id)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed += 1
                break
        return removed

    def remove_stale_temp_files(self, older_than: float = 0.0) -> int:
        """Delete temporary files a crashed writer left behind, if older than the given
        number of seconds (0 removes all: call it at start-up, before any writer opens)."""
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                    continue
                full = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(full).st_mtime <= cutoff:
                        os.unlink(full)
                        removed += 1
        return removed

    # -- group commit --------------------------------------------------------------------

    def _enqueue(self, writer: FileBodyWriter) -> None:
        if self._closed:
            raise BodyStoreClosedError(f"{self.root}: the body store is closed")
        self._pending.append(writer)
        self._schedule()

    def _schedule(self) -> None:
        if self._pending and self._in_flight < self.threads and self._flush_call is None:
            # Next turn: every body whose transfer ended in this one joins the batch.
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        free = self.threads - self._in_flight
        if free <= 0 or not self._pending:
            return
        # A batch holds a descriptor per body: at most MAX_BATCH; the rest waits.
        taken = free * MAX_BATCH
        pending, self._pending = self._pending[:taken], self._pending[taken:]
        pool = self._start_pool()  # also after close(): it waits for these
        # One batch per free thread, split along shards so that each directory is
        # fsynced by one batch only.
        pending.sort(key=lambda w: w.final_path)
        size = max(MIN_SPLIT, -(-len(pending) // free))
        for i in range(0, len(pending), size):
            batch = pending[i : i + size]
            self._in_flight += 1
            self.batches += 1
            d = deferToThreadPool(self._reactor, pool, _commit_batch, batch)
            d.addBoth(self._committed, batch)

    def _committed(
        self, results: list[BodyInfo | Exception] | Failure, batch: list[FileBodyWriter]
    ) -> None:
        self._in_flight -= 1
        if isinstance(results, Failure):
            for writer in batch:
                writer._done(results)
        else:
            for writer, result in zip(batch, results, strict=True):
                if isinstance(result, BodyInfo):
                    self._full_error = None
                elif is_disk_full(result):
                    self._full_error = result
                writer._done(result if isinstance(result, BodyInfo) else Failure(result))
        self._schedule()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._pending or self._in_flight or not self._idle_waiters:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def still_full(root: str, error: OSError, min_free: int) -> str | None:
    """Why ``root`` still cannot take bodies after ``error``, or None once ``min_free``
    bytes are free again (``statvfs`` is a cheap local call, made only while full)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return f"{root}: {error.strerror or error}"
    if st.f_bavail * st.f_frsize >= min_free:
        return None
    return f"{root}: {error.strerror or error}"


def is_disk_full(error: object) -> TypeGuard[OSError]:
    """An OSError saying the filesystem (or the quota) has no room left."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL


class BodyLostError(Exception):
    """A finished job's body is gone from the store, or is not what was recorded (deleted
    or truncated under it): the API answers 410 ``body_lost`` rather than serve short or
    wrong bytes."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"the body of job {job_id} is lost: {reason}")
        self.job_id = job_id
        self.reason = reason


def open_stored(store: DirectoryBodyStore, job_id: str, size: int) -> BinaryIO:
    """Open a committed body for reading, checking it is still there and still ``size``
    bytes (its recorded size; a cheap check, unlike its sha256, that catches deletion and
    truncation). Raises ``BodyLostError`` otherwise; the caller closes the file."""
    try:
        f = open(store.path(job_id), "rb")  # noqa: SIM115 - handed to the caller
    except FileNotFoundError:
        raise BodyLostError(job_id, "its file is missing") from None
    try:
        actual = os.fstat(f.fileno()).st_size
    except OSError:
        f.close()
        raise
    if actual != size:
        f.close()
        raise BodyLostError(job_id, f"its file has {actual} bytes, {size} were stored")
    return f


_OPEN, _COMMITTING, _COMMITTED, _ABORTED = "open", "committing", "committed", "aborted"


class SpillingWriter:
    """What both stores' writers share: a body in memory up to ``memory_limit``, then in a
    spill file (its sha256 taken as it is written, its free space checked every MiB), and
    the commit state machine. ``commit`` hands the writer to its store's thread, which owns
    it until ``_done`` runs in the reactor thread."""

    needs_meta = False  # a store that keeps the HTTP head wants the response's metadata

    def __init__(self, root: str, memory_limit: int) -> None:
        self.meta: ResponseMeta | None = None
        self._root = root
        self._limit = memory_limit
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None
        self._unchecked = 0  # bytes spilled since the last free-space check
        self._hash: Any = None  # hashlib's sha256 object, once spilled
        self._size = 0
        self._state = _OPEN
        self._info: BodyInfo | None = None
        self._waiters: list[Deferred[BodyInfo]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._state != _OPEN

    def write(self, data: bytes) -> None:
        if self._state != _OPEN:
            raise ValueError("write to a body writer that was committed or aborted")
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a caller's buffer may be reused after write() returns
        self._size += len(data)
        if self._file is None:
            if self._size <= self._limit:
                self._chunks.append(data)
                return
            self._spill()
        assert self._file is not None
        self._unchecked += len(data)
        if self._unchecked >= _ROOM_CHECK_EVERY:
            _ensure_room(self._root, self._unchecked)
            self._unchecked = 0
        self._file.write(data)
        self._hash.update(data)

    def _spill(self) -> None:
        """Past the memory limit: from here on the body goes to its spill file."""
        _ensure_room(self._root, self._size)
        self._unchecked = 0
        self._file = self._open_spill()
        self._hash = hashlib.sha256()
        for chunk in self._chunks:
            self._file.write(chunk)
            self._hash.update(chunk)
        self._chunks = []

    def _open_spill(self) -> BinaryIO:
        raise NotImplementedError

    def _enqueue(self) -> None:
        """Hand the writer to the store's thread (raises BodyStoreClosedError)."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Drop the spill file (any thread: the writer is not shared)."""
        raise NotImplementedError

    def commit(self, meta: ResponseMeta | None = None) -> Deferred[BodyInfo]:
        """Fires with where the body is once it is durable, never earlier."""
        if self._state == _COMMITTED:
            assert self._info is not None
            return succeed(self._info)
        if self._state == _ABORTED:
            raise ValueError("commit of an aborted body writer")
        if self._state == _OPEN and self.needs_meta and meta is None:
            raise ValueError("this store keeps the response's head: commit(meta) needs it")
        d: Deferred[BodyInfo] = Deferred()
        self._waiters.append(d)
        if self._state == _OPEN:
            self.meta = meta
            self._state = _COMMITTING
            try:
                self._enqueue()
            except BodyStoreClosedError:
                self._done(Failure())
        return d

    def abort(self) -> None:
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        self._chunks = []
        self._discard()

    def _done(self, result: BodyInfo | Failure) -> None:
        """In the reactor thread: the group is durable (or this body failed)."""
        if isinstance(result, BodyInfo):
            self._state, self._info = _COMMITTED, result
        else:
            self._state = _ABORTED
            self._chunks = []
            self._discard()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, BodyInfo):
                waiter.callback(result)
            else:
                waiter.errback(result)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Abort unless committed: leaving the block early never publishes a body."""
        self.abort()


class FileBodyWriter(SpillingWriter):
    """One body, spilled past the limit to ``.<id>.<pid>-<n>.tmp`` in its final directory
    (same filesystem, so the rename is atomic)."""

    def __init__(self, store: DirectoryBodyStore, final_path: str, memory_limit: int) -> None:
        super().__init__(store.root, memory_limit)
        self.final_path = final_path
        self.temp_path: str | None = None
        self._store = store
        self._fd = -1  # the temporary file's descriptor, in a commit thread

    def _open_spill(self) -> BinaryIO:
        fd, self.temp_path = _create_temp(self.final_path)
        return os.fdopen(fd, "wb")

    def _enqueue(self) -> None:
        self._store._enqueue(self)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._close_temp()
        if self.temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)

    # In a commit thread, in three steps that _commit_batch runs for a whole batch at
    # a time (each step for every body, then the next step): fsyncs issued once all the
    # files exist share journal commits, which create-write-fsync-rename per body in
    # turn does not (half the time per body, measured on ext4). A step that raises
    # leaves no file behind.

    def _write_temp(self) -> str:
        """Step 1: the whole body in its temporary file (not yet fsynced); its sha256."""
        try:
            f = self._file
            if f is not None:
                f.flush()
                digest: str = self._hash.hexdigest()
                self._fd = f.fileno()
                return digest
            data = b"".join(self._chunks)
            self._chunks = []
            self._fd, self.temp_path = _create_temp(self.final_path)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            return hashlib.sha256(data).hexdigest()
        except BaseException:
            self._discard()
            raise

    def _sync_temp(self) -> None:
        """Step 2: its data and inode durable, the file closed."""
        try:
            os.fsync(self._fd)
        except BaseException:
            self._discard()
            raise
        finally:
            self._close_temp()

    def _publish(self) -> None:
        """Step 3: renamed to its final name (durable once the directory is fsynced)."""
        assert self.temp_path is not None
        try:
            os.replace(self.temp_path, self.final_path)
        except BaseException:
            self._discard()
            raise

    def _close_temp(self) -> None:
        f, self._file = self._file, None
        fd, self._fd = self._fd, -1
        if f is not None:
            f.close()
        elif fd >= 0:
            os.close(fd)


def _commit_batch(writers: list[FileBodyWriter]) -> list[BodyInfo | Exception]:
    """In a commit thread: write every body, fsync every file, rename them all, then fsync
    each directory once, which makes all the batch's renames in it durable together."""
    results: list[BodyInfo | Exception] = []
    # Bodies still in memory need room for all of them: one free-space check per batch
    # (spilled bodies checked theirs while they were written).
    unspilled = [w for w in writers if w._file is None]
    full: OSError | None = None
    if unspilled:
        try:
            _ensure_room(unspilled[0]._store.root, sum(w.size for w in unspilled))
        except OSError as e:
            full = e
    for writer in writers:
        if full is not None and writer._file is None:
            writer._chunks = []
            writer._discard()
            results.append(full)
            continue
        try:
            results.append(BodyInfo(size=writer.size, sha256=writer._write_temp()))
        except Exception as e:
            results.append(e)
    for step in (FileBodyWriter._sync_temp, FileBodyWriter._publish):
        for i, writer in enumerate(writers):
            if isinstance(results[i], BodyInfo):
                try:
                    step(writer)
                except Exception as e:
                    results[i] = e
    directories: dict[str, list[int]] = {}
    for i, writer in enumerate(writers):
        if isinstance(results[i], BodyInfo):
            directories.setdefault(os.path.dirname(writer.final_path), []).append(i)
    for directory, indices in directories.items():
        try:
            _fsync_dir(directory)
        except OSError as e:
            # Renamed but perhaps not durable: the job must not say it has the body.
            for i in indices:
                results[i] = e
    return results


def _ensure_room(root: str, size: int) -> None:
    """Raise ENOSPC if writing ``size`` more bytes under ``root`` would leave less than
    ``RESERVE`` free: bodies give way before the job database has to."""
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    if free - size < RESERVE:
        raise OSError(
            errno.ENOSPC,
            f"no space left for bodies: {free} bytes free, {RESERVE} kept for the job database",
        )


def _create_temp(final_path: str) -> tuple[int, str]:
    """A new temporary file beside ``final_path`` (``O_EXCL``: never someone else's)."""
    directory, name = os.path.split(final_path)
    for attempt in range(100):
        temp = os.path.join(directory, f".{name}.{os.getpid()}-{next(_temp_numbers)}{_TEMP_SUFFIX}")
        try:
            return os.open(temp, _CREATE, 0o644), temp
        except FileExistsError:
            continue  # left by an earlier process with our pid
        except FileNotFoundError:
            if attempt:
                raise
            # The shard directory was removed under us: create it again, durably.
            _make_dirs(directory, ())
    raise FileExistsError(f"no free temporary name beside {final_path}")


def _make_dirs(root: str, children: Iterable[str]) -> None:
    """Create ``root`` (and its missing parents) and ``root/<child>`` for each child,
    fsyncing the parent of every directory created so that its entry is durable too."""
    missing: list[str] = []
    path = root
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        _fsync_dir(os.path.dirname(path))
    created = False
    for child in children:
        try:
            os.mkdir(os.path.join(root, child))
        except FileExistsError:
            continue
        created = True
    if created:
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    """Make a rename (or a new entry) durable: the directory must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IConsumer)
class BodyConsumer:
    """An ``IConsumer`` over a ``BodyWriter``: the engine's streaming sink
    (``client.fetch(url, sink=BodyConsumer(writer))``).

    It never commits or aborts by itself: ``unregisterProducer`` comes at the end of a
    transfer whether it succeeded or failed, so the owner of the fetch decides. Writes
    go to memory (or, for a large body, to the page cache), so it never needs to pause
    its producer; it accepts push producers only, which is what the engine registers.
    """

    def __init__(self, writer: BodyWriter) -> None:
        self.writer = writer
        self.producer: IProducer | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        if not streaming:
            raise ValueError("BodyConsumer takes push (streaming) producers only")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writer.write(data)
