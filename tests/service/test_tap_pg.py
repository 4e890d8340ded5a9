"""``twistd curlfetch`` with PostgreSQL: the ``--database`` (``CURLFETCH_DATABASE_URL``),
``--instance-id`` and ``--lease`` options, and the service tree built and run on a
throwaway schema of the local server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.python import usage

from curlfetch import tap
from curlfetch.options import DB_NAME, ENV_PREFIX, Config
from curlfetch.store import StoreClosedError
from curlfetch.store.postgres import DEFAULT_LEASE, PostgresJobStore
from curlfetch.store.sqlite import SQLiteJobStore

from .backends import PostgresSchema, require_postgres
from .conftest import make_job, reactor, within

URL = "postgresql://curlfetch:s3cret@db.internal:5432/jobs"


@pytest.fixture(autouse=True)
def _no_curlfetch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's CURLFETCH_* variables out."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def schema() -> Iterator[PostgresSchema]:
    require_postgres()
    pg = PostgresSchema()
    try:
        yield pg
    finally:
        pg.drop()


def parse(args: list[str], environ: dict[str, str] | None = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


def test_without_a_database_sqlite_applies() -> None:
    """No --database and no CURLFETCH_DATABASE_URL: SQLite in the data directory, with
    the default lease and an instance id chosen at start."""
    config = parse([]).config
    assert (config.database, config.instance_id, config.lease) == ("", "", DEFAULT_LEASE)


def test_database_from_the_option_or_the_environment() -> None:
    """--database takes a postgresql:// URL; so does CURLFETCH_DATABASE_URL, and the
    command line wins. --instance-id and --lease come along."""
    config = parse([f"--database={URL}", "--instance-id=web-1", "--lease=5s"]).config
    assert (config.database, config.instance_id, config.lease) == (URL, "web-1", 5.0)
    assert parse([], {"CURLFETCH_DATABASE_URL": URL}).config.database == URL
    other = "postgres://h/db"
    assert parse([f"--database={other}"], {"CURLFETCH_DATABASE_URL": URL}).config.database == (
        other
    )


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (["--database=sqlite:///x.db"], {}, "--database: must be a postgresql:// URL"),
        ([], {"CURLFETCH_DATABASE_URL": "mysql://h/db"}, "(from CURLFETCH_DATABASE_URL)"),
        (["--instance-id=a b"], {}, "--instance-id: must be 1-100 letters"),
        (["--lease=0"], {}, "--lease: must be more than 0"),
    ],
)
def test_bad_values_are_usage_errors(
    args: list[str], environ: dict[str, str], message: str
) -> None:
    """A URL of another database, a malformed instance id or a zero lease is a usage
    error that names the option (and the variable it came from)."""
    with pytest.raises(usage.UsageError) as caught:
        parse(args, environ)
    assert message in str(caught.value)


def test_a_refused_url_does_not_echo_its_password() -> None:
    """The usage error for a wrong URL shows it without its password."""
    with pytest.raises(usage.UsageError) as caught:
        parse(["--database=mysql://u:hunter2@h/db"])
    assert "hunter2" not in str(caught.value)


def _config(tmp_path: Path, **changes: Any) -> Config:
    return attrs.evolve(
        Config(data_dir=str(tmp_path / "data"), listen="tcp:0:interface=127.0.0.1"),
        **changes,
    )


def test_build_service_picks_the_store(tmp_path: Path) -> None:
    """With a database URL the tree gets a PostgresJobStore (instance id and lease as
    given, NOTIFY wired to the scheduler); without, a SQLiteJobStore."""
    root = tap.build_service(
        reactor(), _config(tmp_path, database=URL, instance_id="web-1", lease=6.0)
    )
    store: Any = root.scheduler._store
    try:
        assert isinstance(store, PostgresJobStore)
        assert (store.instance_id, store.lease_seconds) == ("web-1", 6.0)
        assert store.on_wakeup == root.scheduler.wake
        assert store.on_cancelled == root.scheduler.abort
        assert (tmp_path / "data" / "segments").is_dir()
    finally:
        root.getServiceNamed("engine").stopService()
    root = tap.build_service(reactor(), _config(tmp_path))
    try:
        assert isinstance(root.scheduler._store, SQLiteJobStore)
    finally:
        root.getServiceNamed("engine").stopService()
    anonymous = tap.build_service(reactor(), _config(tmp_path, database=URL))
    try:
        assert str(os.getpid()) in anonymous.scheduler._store.instance_id  # type: ignore[attr-defined]
    finally:
        anonymous.getServiceNamed("engine").stopService()


@pytest_twisted.ensureDeferred
async def test_the_tree_runs_on_postgresql(tmp_path: Path, schema: PostgresSchema) -> None:
    """Started with --database, the root migrates the schema, serves from it and, on
    stop, closes the store; nothing is written to a SQLite file."""
    config = _config(tmp_path, database=schema.url, instance_id="tree")
    root = tap.build_service(reactor(), config)
    root.startService()
    await within(root.when_started(), 20)
    store: Any = root.scheduler._store
    assert isinstance(store, PostgresJobStore)
    job = make_job(url="http://example.invalid/", not_before=4e9)  # never runs
    await within(store.add([job]))
    assert await within(store.get("alice", job.id)) == job
    await within(root.stopService(), 20)
    with pytest.raises(StoreClosedError):
        await store.ping()
    assert schema.execute("SELECT id FROM jobs") == [(job.id,)]
    assert not (tmp_path / "data" / DB_NAME).exists()
