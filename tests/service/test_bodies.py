"""``DirectoryBodyStore``: sharded, atomic, hashed body files committed in batches off the
reactor thread; and its ``IConsumer``."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web import resource, server
from zope.interface import implementer
from zope.interface.verify import verifyObject

from curlfetch import bodies as bodies_module
from curlfetch.bodies import (
    SHARDS,
    BodyConsumer,
    BodyLostError,
    BodyStore,
    BodyStoreClosedError,
    BodyWriter,
    DirectoryBodyStore,
    open_stored,
)
from curlfetch.engine import CurlClient
from curlfetch.jobs import new_job_id

from .conftest import reactor, within

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def files_under(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    )


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories fsynced from now on, in order."""
    synced: list[str] = []
    real = bodies_module._fsync_dir

    def fsync_dir(directory: str) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(bodies_module, "_fsync_dir", fsync_dir)
    return synced


def make_store(root: Path, **options: int) -> DirectoryBodyStore:
    return DirectoryBodyStore(reactor(), root, **options)


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path) -> AsyncIterator[DirectoryBodyStore]:
    s = make_store(tmp_path)
    try:
        yield s
    finally:
        await within(s.close())


def test_implements_the_body_store_protocols(tmp_path: Path) -> None:
    """DirectoryBodyStore is a BodyStore and its writers are BodyWriters (mypy checks the
    assignments)."""
    files = make_store(tmp_path)
    store: BodyStore = files
    writer: BodyWriter = store.open_writer("abcd1234")
    writer.abort()
    assert not files.exists("abcd1234")


def test_a_new_store_creates_its_256_shards_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root (and missing parents) and all 256 shard directories exist from the start,
    and the parent of every directory created is fsynced, so that the new entries
    survive a power loss; an existing store creates and fsyncs nothing."""
    synced = record_fsyncs(monkeypatch)
    root = tmp_path / "data" / "bodies"
    make_store(root)
    assert sorted(os.listdir(root)) == list(SHARDS)
    assert synced == [str(tmp_path), str(tmp_path / "data"), str(root)]
    synced.clear()
    make_store(root)
    assert synced == []


@pytest_twisted.ensureDeferred
async def test_commit_publishes_a_sharded_file_with_its_size_and_sha256(
    store: DirectoryBodyStore, tmp_path: Path
) -> None:
    """A committed body is at ``root/<id[-2:]>/<id>``, and commit() fires with its exact
    size and sha256 once the file is there."""
    job_id = new_job_id()
    chunks = [b"hello ", b"", b"world" * 1000, os.urandom(70_000)]
    writer = store.open_writer(job_id)
    for chunk in chunks:
        writer.write(chunk)
    d = writer.commit()
    info = await within(d)

    data = b"".join(chunks)
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    path = store.path(job_id)
    assert path == os.path.join(tmp_path, job_id[-2:], job_id)
    assert Path(path).read_bytes() == data  # noqa: ASYNC240 - a local file
    assert store.exists(job_id)
    assert files_under(tmp_path) == [os.path.relpath(path, tmp_path)]  # noqa: ASYNC240
    assert await within(writer.commit()) == info  # idempotent
    writer.abort()  # a no-op once committed
    assert store.exists(job_id)


def test_ids_that_are_not_hex_go_to_a_shard_by_crc(tmp_path: Path) -> None:
    """Any valid id maps to one of the 256 shards, always the same one."""
    store = make_store(tmp_path)
    for job_id in ("abcd1234", "ABCD-_zz", "x" * 128):
        shard = os.path.basename(os.path.dirname(store.path(job_id)))
        assert shard in SHARDS
        assert store.path(job_id) == store.path(job_id)


@pytest_twisted.ensureDeferred
async def test_an_empty_body_is_a_file_too(store: DirectoryBodyStore) -> None:
    """A body with no bytes commits as an empty file with the empty string's hash."""
    info = await within(store.open_writer("0123abcd").commit())
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert os.path.getsize(store.path("0123abcd")) == 0  # noqa: ASYNC240


@pytest_twisted.ensureDeferred
async def test_a_small_body_touches_no_file_until_commit(
    store: DirectoryBodyStore, tmp_path: Path
) -> None:
    """Below the memory limit a body is only in memory while it is written: no file at
    all, and nothing under the final name."""
    job_id = new_job_id()
    writer = store.open_writer(job_id)
    writer.write(b"x" * 10_000)
    assert writer.size == 10_000
    assert files_under(tmp_path) == []
    assert not store.exists(job_id)
    await within(writer.commit())
    assert os.listdir(os.path.dirname(store.path(job_id))) == [job_id]


@pytest_twisted.ensureDeferred
async def test_a_large_body_spills_to_a_hidden_temporary_file(tmp_path: Path) -> None:
    """Past the memory limit the body goes to a hidden temporary file in the final
    directory (so the rename is atomic); nothing is under the final name until the
    commit has fired, and the hash covers every byte."""
    store = make_store(tmp_path, memory_limit=1000)
    try:
        job_id = new_job_id()
        writer = store.open_writer(job_id)
        data = os.urandom(600) + os.urandom(600) + os.urandom(50_000)
        writer.write(data[:600])
        assert files_under(tmp_path) == []
        writer.write(data[600:1200])
        writer.write(data[1200:])
        (temp,) = os.listdir(os.path.dirname(store.path(job_id)))
        assert temp.startswith(f".{job_id}.")
        assert temp.endswith(".tmp")
        assert not store.exists(job_id)
        info = await within(writer.commit())
        assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert os.listdir(os.path.dirname(store.path(job_id))) == [job_id]
        assert Path(store.path(job_id)).read_bytes() == data  # noqa: ASYNC240 - local
    finally:
        await within(store.close())


@pytest_twisted.ensureDeferred
async def test_commits_of_one_turn_share_a_batch_and_directory_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies committed in the same reactor turn are written by one batch per thread,
    and each directory is fsynced once per batch, after its renames: group commit."""
    store = make_store(tmp_path, threads=1)
    synced = record_fsyncs(monkeypatch)
    try:
        ids = [new_job_id()[:-2] + shard for shard in ("0a", "ff") for _ in range(20)]
        writers = [store.open_writer(job_id) for job_id in ids]
        for job_id, writer in zip(ids, writers, strict=True):
            writer.write(job_id.encode())
        infos = await within(gatherResults([w.commit() for w in writers]))
        assert [i.size for i in infos] == [len(job_id) for job_id in ids]
        assert store.batches == 1
        assert sorted(synced) == [str(tmp_path / "0a"), str(tmp_path / "ff")]
        assert all(store.exists(job_id) for job_id in ids)
    finally:
        await within(store.close())


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_leaves_no_file_and_fails_its_deferred(
    store: DirectoryBodyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename fails, commit() fails, the temporary file is gone, nothing is under
    the final name, and the other bodies of the batch are committed all the same."""
    real_replace = os.replace
    bad = new_job_id()

    def replace(src: str, dst: str) -> None:
        if dst.endswith(bad):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    good = new_job_id()
    failing, fine = store.open_writer(bad), store.open_writer(good)
    failing.write(b"lost")
    fine.write(b"kept")
    failed, committed = failing.commit(), fine.commit()
    with pytest.raises(OSError, match="No space"):
        await within(failed)
    assert (await within(committed)).size == 4
    assert files_under(tmp_path) == [os.path.relpath(store.path(good), tmp_path)]  # noqa: ASYNC240
    with pytest.raises(ValueError, match="aborted"):
        failing.commit()


@pytest_twisted.ensureDeferred
async def test_abort_leaves_nothing_and_keeps_an_earlier_body(
    tmp_path: Path,
) -> None:
    """abort() removes what was written (in memory or spilled) and never touches a body
    already committed under that id; a later commit replaces it whole."""
    store = make_store(tmp_path, memory_limit=8)
    try:
        job_id = new_job_id()
        first = store.open_writer(job_id)
        first.write(b"first")
        await within(first.commit())

        second = store.open_writer(job_id)
        second.write(b"second, longer")  # spilled
        second.abort()
        second.abort()  # idempotent
        assert Path(store.path(job_id)).read_bytes() == b"first"  # noqa: ASYNC240
        assert len(files_under(tmp_path)) == 1
        with pytest.raises(ValueError, match="committed or aborted"):
            second.write(b"more")
        with pytest.raises(ValueError, match="aborted"):
            second.commit()

        third = store.open_writer(job_id)
        third.write(b"third")
        await within(third.commit())
        assert Path(store.path(job_id)).read_bytes() == b"third"  # noqa: ASYNC240
    finally:
        await within(store.close())


def test_leaving_a_with_block_early_aborts(tmp_path: Path) -> None:
    """A writer used as a context manager publishes nothing if the block raises."""
    store = make_store(tmp_path, memory_limit=4)
    job_id = new_job_id()

    def write_and_fail() -> None:
        with store.open_writer(job_id) as writer:
            writer.write(b"partial")
            raise OSError("boom")

    with pytest.raises(OSError, match="boom"):
        write_and_fail()
    assert files_under(tmp_path) == []


def test_a_crash_mid_write_leaves_no_body(tmp_path: Path) -> None:
    """A process that dies while writing a large body leaves only a temporary file,
    never a partial body; remove_stale_temp_files() cleans it up."""
    job_id = new_job_id()
    done = subprocess.run(
        [sys.executable, "-m", "tests.service.store_child", "body", str(tmp_path), job_id],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        timeout=30,
        check=True,
    )
    temp = done.stdout.decode().strip()
    store = make_store(tmp_path)
    assert not store.exists(job_id)
    assert os.path.exists(temp)
    assert store.remove_stale_temp_files(older_than=3600) == 0  # too recent
    assert store.remove_stale_temp_files() == 1
    assert files_under(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_close_waits_for_commits_then_refuses_more(tmp_path: Path) -> None:
    """close() fires once the commits handed over are durable; a commit after it fails
    with BodyStoreClosedError and leaves nothing behind."""
    store = make_store(tmp_path, memory_limit=4)
    writer = store.open_writer("abcd1234")
    writer.write(b"body")
    committed = writer.commit()
    await within(store.close())
    assert committed.called
    assert store.exists("abcd1234")
    late = store.open_writer("abcd5678")
    late.write(b"spilled body")
    with pytest.raises(BodyStoreClosedError):
        await within(late.commit())
    published = os.path.relpath(store.path("abcd1234"), tmp_path)  # noqa: ASYNC240
    assert files_under(tmp_path) == [published]


@pytest_twisted.ensureDeferred
async def test_a_shard_removed_under_the_store_is_created_again(
    store: DirectoryBodyStore, tmp_path: Path
) -> None:
    """A missing shard directory is recreated by the commit rather than failing it."""
    job_id = new_job_id()
    os.rmdir(os.path.dirname(store.path(job_id)))
    writer = store.open_writer(job_id)
    writer.write(b"ok")
    assert (await within(writer.commit())).size == 2
    assert Path(store.path(job_id)).read_bytes() == b"ok"  # noqa: ASYNC240


def test_bodies_of_the_two_level_layout_are_still_found(tmp_path: Path) -> None:
    """A body stored as ``root/ab/cd/<id>`` by an earlier version is served and deleted."""
    store = make_store(tmp_path)
    job_id = new_job_id()
    legacy = tmp_path / job_id[-4:-2] / job_id[-2:] / job_id
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"old")
    assert store.path(job_id) == str(legacy)
    assert store.exists(job_id)
    assert store.delete([job_id]) == 1
    assert not legacy.exists()
    assert store.path(job_id) == os.path.join(tmp_path, job_id[-2:], job_id)


@pytest_twisted.ensureDeferred
async def test_delete_removes_bodies_and_skips_missing_ones(store: DirectoryBodyStore) -> None:
    """delete() unlinks the given bodies, ignores ids without one, and counts."""
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        writer = store.open_writer(job_id)
        writer.write(job_id.encode())
        await within(writer.commit())
    assert store.delete([ids[0], ids[2], new_job_id()]) == 2
    assert [store.exists(i) for i in ids] == [False, True, False]
    assert store.delete([]) == 0


@pytest.mark.parametrize("bad", ["", "abc", "../../etc/passwd", "a/bcdef", ".hidden", "ab\0cd"])
def test_ids_that_are_not_plain_names_are_refused(tmp_path: Path, bad: str) -> None:
    """An id that could escape the root (or is too short to shard) is refused."""
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match="invalid job id"):
        store.path(bad)
    with pytest.raises(ValueError, match="invalid job id"):
        store.open_writer(bad)


@implementer(IPushProducer)
class _Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_body_consumer_writes_through_to_the_writer(store: DirectoryBodyStore) -> None:
    """BodyConsumer is an IConsumer whose writes land in the body writer; it keeps the
    producer while registered and never commits by itself."""
    writer = store.open_writer("abcd1234")
    consumer = BodyConsumer(writer)
    assert verifyObject(IConsumer, consumer)
    producer = _Producer()
    consumer.registerProducer(producer, True)
    assert consumer.producer is producer
    with pytest.raises(RuntimeError, match="already registered"):
        consumer.registerProducer(_Producer(), True)
    consumer.write(b"abc")
    consumer.write(b"def")
    consumer.unregisterProducer()
    assert consumer.producer is None
    assert not store.exists("abcd1234")
    assert (await within(writer.commit())).size == 6
    assert Path(store.path("abcd1234")).read_bytes() == b"abcdef"  # noqa: ASYNC240


def test_body_consumer_refuses_pull_producers(tmp_path: Path) -> None:
    """Only push producers are taken: a pull producer would wait forever to be asked."""
    with make_store(tmp_path).open_writer("abcd1234") as writer:
        consumer = BodyConsumer(writer)
        with pytest.raises(ValueError, match="push"):
            consumer.registerProducer(_Producer(), False)


class _Big(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: server.Request) -> bytes:
        return self.body


@pytest_twisted.ensureDeferred
async def test_engine_streams_a_body_to_the_store(store: DirectoryBodyStore) -> None:
    """The engine's IConsumer sink accepts a BodyConsumer: a fetched body larger than the
    memory limit goes to its file chunk by chunk and commits with the right size and
    hash."""
    body = os.urandom(3 * 1024 * 1024)
    port = reactor().listenTCP(0, server.Site(_Big(body)), interface="127.0.0.1")
    client = CurlClient(reactor())
    job_id = new_job_id()
    try:
        writer = store.open_writer(job_id)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        response = await within(client.fetch(url, sink=BodyConsumer(writer)), 10)
        info = await within(writer.commit())
    finally:
        client.close()
        await port.stopListening()
    assert response.status == 200
    assert (info.size, info.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert Path(store.path(job_id)).read_bytes() == body  # noqa: ASYNC240 - a local file


@pytest_twisted.ensureDeferred
async def test_storage_full_is_set_by_enospc_and_cleared_by_a_commit_or_free_space(
    store: DirectoryBodyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit failing with ENOSPC marks the store full (a reason naming it, for
    readiness); the next body that commits clears it; so does free space found again by
    ``statvfs`` while no body commits. Other errors do not mark it."""
    assert store.storage_full() is None
    real_replace = os.replace
    failing: set[str] = set()

    def replace(src: str, dst: str) -> None:
        if os.path.basename(dst) in failing:
            raise OSError(errno.ENOSPC if "full" in dst else errno.EIO, "refused")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)

    async def commit(job_id: str, fail: bool) -> None:
        if fail:
            failing.add(job_id)
        writer = store.open_writer(job_id)
        writer.write(b"x")
        if fail:
            with pytest.raises(OSError):
                await within(writer.commit())
        else:
            await within(writer.commit())

    await commit("io-error-1", True)
    assert store.storage_full() is None
    await commit("disk-full-1", True)
    assert store.storage_full(min_free=1 << 62) is not None
    await commit("fine-job-1", False)
    assert store.storage_full(min_free=1 << 62) is None
    await commit("disk-full-2", True)
    assert "refused" in (store.storage_full(min_free=1 << 62) or "")
    assert store.storage_full(min_free=0) is None  # space is back
    assert store.storage_full(min_free=1 << 62) is None


@pytest_twisted.ensureDeferred
async def test_open_stored_refuses_a_missing_or_truncated_body(store: DirectoryBodyStore) -> None:
    """``open_stored`` opens a body of the recorded size; a body deleted or truncated
    under its job raises ``BodyLostError`` (the API's 410 body_lost)."""
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        writer = store.open_writer(job_id)
        writer.write(b"0123456789")
        await within(writer.commit())
    with open_stored(store, ids[0], 10) as f:
        assert f.read() == b"0123456789"
    os.truncate(store.path(ids[1]), 3)
    os.unlink(store.path(ids[2]))
    with pytest.raises(BodyLostError, match="3 bytes, 10 were stored"):
        open_stored(store, ids[1], 10)
    with pytest.raises(BodyLostError, match="missing"):
        open_stored(store, ids[2], 10)
