"""The body store: response bodies as files under the data directory, never database blobs.

A body is written to a temporary file beside its final name, hashed as it is written,
fsynced, and renamed into place, so a body path either does not exist or holds a complete,
durable body: a crash or an abort mid-write never leaves a partial file under the final
name. The job row records the ``BodyInfo`` (size, sha256) that ``commit()`` returns.

Disk I/O here runs in the calling (reactor) thread, like the engine's file sink: writes to
a local disk are short and bounded by the fetch's own buffer size, and a thread hop per
chunk would cost more than it saves. A remote backend (S3) would implement ``BodyStore``
with Deferreds instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable
from types import TracebackType
from typing import BinaryIO, Protocol

from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from .jobs import BodyInfo

_ID = re.compile(r"[0-9A-Za-z_-]{4,128}\Z")
_TEMP_SUFFIX = ".tmp"


class BodyWriter(Protocol):
    """One body being written: ``write`` chunks, then exactly one of ``commit``/``abort``."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> BodyInfo:
        """Make the body durable and visible under its final name; return size and hash."""

    def abort(self) -> None:
        """Discard what was written; the final name is left as it was. Idempotent."""


class BodyStore(Protocol):
    def open_writer(self, job_id: str) -> BodyWriter:
        """Start writing ``job_id``'s body; nothing is visible until ``commit``."""

    def path(self, job_id: str) -> str:
        """Where ``job_id``'s committed body is (or would be)."""

    def exists(self, job_id: str) -> bool: ...

    def delete(self, job_ids: Iterable[str]) -> int:
        """Remove these bodies (missing ones are skipped); return how many were removed."""


class DirectoryBodyStore:
    """Bodies as files ``root/ab/cd/<id>``, sharded on the id's last four characters.

    The last characters, not the first: a job id starts with its creation time
    (``new_job_id``), so its head changes only every few weeks, while its tail is random
    and spreads bodies evenly over 65,536 directories.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)

    def path(self, job_id: str) -> str:
        if not _ID.match(job_id):
            # Ids become path components: refuse anything that could leave the root.
            raise ValueError(f"invalid job id for a body path: {job_id!r}")
        return os.path.join(self.root, job_id[-4:-2], job_id[-2:], job_id)

    def open_writer(self, job_id: str) -> FileBodyWriter:
        return FileBodyWriter(self.path(job_id))

    def exists(self, job_id: str) -> bool:
        return os.path.isfile(self.path(job_id))

    def delete(self, job_ids: Iterable[str]) -> int:
        removed = 0
        for job_id in job_ids:
            try:
                os.unlink(self.path(job_id))
            except FileNotFoundError:
                continue
            removed += 1
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


class FileBodyWriter:
    """Writes one body to ``.<id>.<random>.tmp`` in its final directory (same filesystem,
    so the rename is atomic), hashing as it goes."""

    def __init__(self, final_path: str) -> None:
        self.final_path = final_path
        directory, name = os.path.split(final_path)
        os.makedirs(directory, exist_ok=True)
        fd, self.temp_path = tempfile.mkstemp(
            prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=directory
        )
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._info: BodyInfo | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("write to a body writer that was committed or aborted")
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def commit(self) -> BodyInfo:
        if self._info is not None:
            return self._info
        f = self._file
        if f is None:
            raise ValueError("commit of an aborted body writer")
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            os.replace(self.temp_path, self.final_path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(os.path.dirname(self.final_path))
        self._info = BodyInfo(size=self._size, sha256=self._hash.hexdigest())
        return self._info

    def abort(self) -> None:
        if self._info is not None:
            return
        f, self._file = self._file, None
        if f is not None:
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def __enter__(self) -> FileBodyWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Abort unless committed: leaving the block early never publishes a body."""
        self.abort()


def _fsync_dir(directory: str) -> None:
    """Make a rename durable: the new directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IConsumer)
class BodyConsumer:
    """An ``IConsumer`` over a ``BodyWriter``: the engine's streaming sink writes straight
    to disk (``client.fetch(url, sink=BodyConsumer(writer))``).

    It never commits or aborts by itself: ``unregisterProducer`` comes at the end of a
    transfer whether it succeeded or failed, so the owner of the fetch decides. Disk writes
    are synchronous, so it never needs to pause its producer; it accepts push producers
    only, which is what the engine registers.
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
