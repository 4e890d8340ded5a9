"""``DirectoryBodyStore``: sharded, atomic, hashed body files; and its ``IConsumer``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web import resource, server
from zope.interface import implementer
from zope.interface.verify import verifyObject

from service.bodies import BodyConsumer, BodyStore, BodyWriter, DirectoryBodyStore
from service.engine import CurlClient
from service.jobs import new_job_id

from .conftest import reactor, within

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def files_under(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    )


def test_implements_the_body_store_protocols(tmp_path: Path) -> None:
    """DirectoryBodyStore is a BodyStore and its writers are BodyWriters (mypy checks the
    assignments)."""
    store: BodyStore = DirectoryBodyStore(tmp_path)
    writer: BodyWriter = store.open_writer("abcd1234")
    writer.abort()
    assert not store.exists("abcd1234")


def test_commit_publishes_a_sharded_file_with_its_size_and_sha256(tmp_path: Path) -> None:
    """A committed body is at ``root/<id[-4:-2]>/<id[-2:]>/<id>``, and commit() reports
    its exact size and sha256."""
    store = DirectoryBodyStore(tmp_path)
    job_id = new_job_id()
    chunks = [b"hello ", b"", b"world" * 1000, os.urandom(70_000)]
    writer = store.open_writer(job_id)
    for chunk in chunks:
        writer.write(chunk)
    info = writer.commit()

    data = b"".join(chunks)
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    path = store.path(job_id)
    assert path == os.path.join(tmp_path, job_id[-4:-2], job_id[-2:], job_id)
    assert Path(path).read_bytes() == data
    assert store.exists(job_id)
    assert files_under(tmp_path) == [os.path.relpath(path, tmp_path)]
    assert writer.commit() == info  # idempotent


def test_an_empty_body_is_a_file_too(tmp_path: Path) -> None:
    """A body with no bytes commits as an empty file with the empty string's hash."""
    store = DirectoryBodyStore(tmp_path)
    info = store.open_writer("0123abcd").commit()
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert os.path.getsize(store.path("0123abcd")) == 0


def test_nothing_is_visible_under_the_final_name_before_commit(tmp_path: Path) -> None:
    """While a body is written only a hidden temporary file exists, in the final
    directory (so the rename is atomic)."""
    store = DirectoryBodyStore(tmp_path)
    job_id = new_job_id()
    writer = store.open_writer(job_id)
    writer.write(b"x" * 10_000)
    assert not store.exists(job_id)
    assert not os.path.exists(store.path(job_id))
    (temp,) = os.listdir(os.path.dirname(store.path(job_id)))
    assert temp.startswith(f".{job_id}.")
    assert temp.endswith(".tmp")
    assert writer.size == 10_000
    writer.commit()
    assert os.listdir(os.path.dirname(store.path(job_id))) == [job_id]


def test_abort_leaves_nothing_and_keeps_an_earlier_body(tmp_path: Path) -> None:
    """abort() removes the temporary file and never touches a body already committed
    under that id; a later commit replaces it whole."""
    store = DirectoryBodyStore(tmp_path)
    job_id = new_job_id()
    first = store.open_writer(job_id)
    first.write(b"first")
    first.commit()

    second = store.open_writer(job_id)
    second.write(b"second, longer")
    second.abort()
    second.abort()  # idempotent
    assert Path(store.path(job_id)).read_bytes() == b"first"
    assert len(files_under(tmp_path)) == 1
    with pytest.raises(ValueError, match="committed or aborted"):
        second.write(b"more")
    with pytest.raises(ValueError, match="aborted"):
        second.commit()

    third = store.open_writer(job_id)
    third.write(b"third")
    third.commit()
    assert Path(store.path(job_id)).read_bytes() == b"third"


def test_leaving_a_with_block_early_aborts(tmp_path: Path) -> None:
    """A writer used as a context manager publishes nothing if the block raises."""
    store = DirectoryBodyStore(tmp_path)
    job_id = new_job_id()

    def write_and_fail() -> None:
        with store.open_writer(job_id) as writer:
            writer.write(b"partial")
            raise OSError("boom")

    with pytest.raises(OSError, match="boom"):
        write_and_fail()
    assert files_under(tmp_path) == []


def test_a_crash_mid_write_leaves_no_body(tmp_path: Path) -> None:
    """A process that dies while writing leaves only a temporary file, never a partial
    body; remove_stale_temp_files() cleans it up."""
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
    store = DirectoryBodyStore(tmp_path)
    assert not store.exists(job_id)
    assert os.path.exists(temp)
    assert store.remove_stale_temp_files(older_than=3600) == 0  # too recent
    assert store.remove_stale_temp_files() == 1
    assert files_under(tmp_path) == []


def test_delete_removes_bodies_and_skips_missing_ones(tmp_path: Path) -> None:
    """delete() unlinks the given bodies, ignores ids without one, and counts."""
    store = DirectoryBodyStore(tmp_path)
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        with store.open_writer(job_id) as writer:
            writer.write(job_id.encode())
            writer.commit()
    assert store.delete([ids[0], ids[2], new_job_id()]) == 2
    assert [store.exists(i) for i in ids] == [False, True, False]
    assert store.delete([]) == 0


@pytest.mark.parametrize("bad", ["", "abc", "../../etc/passwd", "a/bcdef", ".hidden", "ab\0cd"])
def test_ids_that_are_not_plain_names_are_refused(tmp_path: Path, bad: str) -> None:
    """An id that could escape the root (or is too short to shard) is refused."""
    store = DirectoryBodyStore(tmp_path)
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


def test_body_consumer_writes_through_to_the_writer(tmp_path: Path) -> None:
    """BodyConsumer is an IConsumer whose writes land in the body writer; it keeps the
    producer while registered and never commits by itself."""
    store = DirectoryBodyStore(tmp_path)
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
    assert writer.commit().size == 6
    assert Path(store.path("abcd1234")).read_bytes() == b"abcdef"


def test_body_consumer_refuses_pull_producers(tmp_path: Path) -> None:
    """Only push producers are taken: a pull producer would wait forever to be asked."""
    with DirectoryBodyStore(tmp_path).open_writer("abcd1234") as writer:
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
async def test_engine_streams_a_body_straight_to_disk(tmp_path: Path) -> None:
    """The engine's IConsumer sink accepts a BodyConsumer: a fetched body goes to disk
    chunk by chunk and commits with the right size and hash."""
    body = os.urandom(3 * 1024 * 1024)
    port = reactor().listenTCP(0, server.Site(_Big(body)), interface="127.0.0.1")
    client = CurlClient(reactor())
    store = DirectoryBodyStore(tmp_path)
    job_id = new_job_id()
    try:
        writer = store.open_writer(job_id)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        response = await within(client.fetch(url, sink=BodyConsumer(writer)), 10)
        info = writer.commit()
    finally:
        client.close()
        await port.stopListening()
    assert response.status == 200
    assert (info.size, info.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert Path(store.path(job_id)).read_bytes() == body  # noqa: ASYNC240 - a local file
