"""``curlfetch.tap`` in process: options (command line, environment, errors), the twistd
plugin, JSON logging, and the service tree's start, stop and retention purge."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel, eventFromJSON
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions

from curlfetch import tap
from curlfetch.bodies import DirectoryBodyStore
from curlfetch.jobs import JobState
from curlfetch.logs import json_line
from curlfetch.options import DEFAULTS, ENV_PREFIX, Config, parse_duration
from curlfetch.process import GC_THRESHOLDS
from curlfetch.scheduler import Scheduler
from curlfetch.segments import SegmentBodyStore
from curlfetch.services import CurlfetchService, RetentionService
from curlfetch.store import StoreClosedError
from curlfetch.store.sqlite import SQLiteJobStore

from .conftest import make_job, reactor, within


@pytest.fixture(autouse=True)
def _no_curlfetch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that go through twistd read os.environ: keep the developer's out."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def parse(args: list[str], environ: dict[str, str] | None = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


# -- options -----------------------------------------------------------------------------


def test_defaults() -> None:
    """With no options and no environment, every setting has its documented default and
    the data directory is made absolute."""
    config = parse([]).config
    assert config == Config(data_dir=os.path.abspath("curlfetch-data"))
    assert config.listen == "tcp:8080:interface=127.0.0.1"
    assert config.retention == 7 * 86400
    assert config.drain_timeout == 20
    assert config.log_format == "text"
    assert (config.idle_timeout, config.header_timeout, config.max_connections) == (10, 10, 0)


def test_every_option_on_the_command_line(tmp_path: Path) -> None:
    """Each option is parsed and converted: counts to int, durations to seconds."""
    options = parse(
        [
            r"--listen=tcp:9999:interface=\:\:1",
            f"--data-dir={tmp_path}/d",
            "--max-concurrency=64",
            "--max-per-host=2",
            "--per-host-interval=250ms",
            "--max-queued=10",
            "--retention=12h",
            "--drain-timeout=1.5",
            "--log-format=JSON",
            "--idle-timeout=30s",
            "--header-timeout=2.5",
            "--max-connections=500",
        ]
    )
    assert options.config == Config(
        listen=r"tcp:9999:interface=\:\:1",
        data_dir=f"{tmp_path}/d",
        max_concurrency=64,
        max_per_host=2,
        per_host_interval=0.25,
        max_queued=10,
        retention=12 * 3600,
        drain_timeout=1.5,
        log_format="json",
        idle_timeout=30.0,
        header_timeout=2.5,
        max_connections=500,
    )
    assert options["max-concurrency"] == 64


def test_environment_variables(tmp_path: Path) -> None:
    """Every option can come from CURLFETCH_<NAME>."""
    config = parse(
        [],
        {
            "CURLFETCH_LISTEN": "tcp:0:interface=127.0.0.1",
            "CURLFETCH_DATA_DIR": str(tmp_path),
            "CURLFETCH_MAX_CONCURRENCY": "5",
            "CURLFETCH_MAX_PER_HOST": "3",
            "CURLFETCH_PER_HOST_INTERVAL": "2s",
            "CURLFETCH_MAX_QUEUED": "7",
            "CURLFETCH_RETENTION": "30m",
            "CURLFETCH_DRAIN_TIMEOUT": "0",
            "CURLFETCH_LOG_FORMAT": "json",
            "CURLFETCH_IDLE_TIMEOUT": "5s",
            "CURLFETCH_HEADER_TIMEOUT": "500ms",
            "CURLFETCH_MAX_CONNECTIONS": "0",
            "CURLFETCH_EXTRAS": "dev",  # scripts/bootstrap's: not an option, ignored
        },
    ).config
    assert config == Config(
        listen="tcp:0:interface=127.0.0.1",
        data_dir=str(tmp_path),
        max_concurrency=5,
        max_per_host=3,
        per_host_interval=2.0,
        max_queued=7,
        retention=1800.0,
        drain_timeout=0.0,
        log_format="json",
        idle_timeout=5.0,
        header_timeout=0.5,
        max_connections=0,
    )


def test_command_line_beats_environment() -> None:
    """An option given on the command line overrides its environment variable; the
    others still come from the environment."""
    config = parse(
        ["--max-concurrency", "9"],
        {"CURLFETCH_MAX_CONCURRENCY": "5", "CURLFETCH_MAX_PER_HOST": "4"},
    ).config
    assert config.max_concurrency == 9
    assert config.max_per_host == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-concurrency=0"], "--max-concurrency: must be at least 1"),
        (["--max-concurrency=lots"], "--max-concurrency: must be a whole number"),
        (["--max-per-host=-2"], "--max-per-host: must be at least 1"),
        (["--max-queued=1.5"], "--max-queued: must be a whole number"),
        (["--per-host-interval=soon"], "--per-host-interval: must be seconds"),
        (["--retention=0"], "--retention: must be more than 0"),
        (["--retention=7w"], "--retention: must be seconds or a number with"),
        (["--drain-timeout=-1"], "--drain-timeout: must be seconds"),
        (["--log-format=xml"], "--log-format: must be text or json"),
        (["--idle-timeout=0"], "--idle-timeout: must be more than 0"),
        (["--header-timeout=soon"], "--header-timeout: must be seconds"),
        (["--max-connections=-1"], "--max-connections: must be 0 (no limit) or more"),
        (["--listen=nonsense:1"], "--listen: is not a strports description"),
        (["--listen=tcp:http"], "--listen: is not a strports description"),
    ],
)
def test_bad_values_name_the_option(args: list[str], message: str) -> None:
    """A bad value is a UsageError whose message starts with the option's name."""
    with pytest.raises(usage.UsageError) as raised:
        parse(args)
    assert str(raised.value).startswith(message), str(raised.value)


def test_bad_environment_value_names_option_and_variable() -> None:
    """A bad value from the environment names both the option and the variable."""
    with pytest.raises(usage.UsageError) as raised:
        parse([], {"CURLFETCH_MAX_PER_HOST": "many"})
    assert str(raised.value).startswith("--max-per-host (from CURLFETCH_MAX_PER_HOST): ")


def test_data_dir_must_be_a_directory(tmp_path: Path) -> None:
    """A data dir that exists as a file is refused at parse time."""
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(usage.UsageError, match=r"--data-dir: .* is not a directory"):
        parse([f"--data-dir={path}"])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        (" 2 H ", 7200.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations are seconds, optionally with a unit (ms, s, m, h, d)."""
    assert parse_duration(text) == pytest.approx(seconds)


# -- twistd ------------------------------------------------------------------------------


def test_plugin_is_found_by_twistd() -> None:
    """getPlugins(IServiceMaker) finds twisted/plugins/curlfetch_plugin.py, and it points
    at curlfetch.tap."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "curlfetch" in makers
    assert makers["curlfetch"].options is tap.Options


def test_json_log_format_sets_twistds_logger() -> None:
    """--log-format=json under `twistd -n` selects json_log_observer through twistd's own
    --logger option; text leaves twistd's logging alone."""
    config = ServerOptions()
    config.parseOptions(["-n", "--pidfile=", "curlfetch", "--log-format=json"])
    assert config["logger"] is tap.json_log_observer
    config = ServerOptions()
    config.parseOptions(["-n", "--pidfile=", "curlfetch"])
    assert config["logger"] is None


def test_explicit_logger_wins_over_json_log_format() -> None:
    """An explicit --logger is kept; --log-format=json does not replace it."""
    config = ServerOptions()
    config.parseOptions(
        ["-n", "--logger=twisted.logger.globalLogPublisher", "curlfetch", "--log-format=json"]
    )
    assert config["logger"] is not tap.json_log_observer


@pytest.mark.parametrize(
    ("twistd_args", "message"),
    [([], "use twistd -n"), (["-n", "--logfile=x.log"], "drop --logfile")],
)
def test_json_log_format_needs_stdout(twistd_args: list[str], message: str) -> None:
    """JSON goes to stdout: a daemon (no -n) or a --logfile is a usage error."""
    with pytest.raises(usage.UsageError, match=message):
        ServerOptions().parseOptions([*twistd_args, "curlfetch", "--log-format=json"])


def test_json_line_is_one_json_object_per_event() -> None:
    """json_line writes one line that eventFromJSON reads back, with the rendered message,
    the level name and a failure's traceback."""
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {
        "log_format": "job {job_id} failed",
        "job_id": "abc",
        "log_level": LogLevel.error,
        "log_namespace": "test",
        "log_time": 1_700_000_000.0,
        "log_failure": failure,
    }
    line = json_line(event)
    assert line.endswith("\n")
    assert line.count("\n") == 1
    data = json.loads(line)
    assert data["message"] == "job abc failed"
    assert data["level"] == "error"
    assert "ZeroDivisionError" in data["traceback"]
    assert eventFromJSON(line)["job_id"] == "abc"


# -- the service tree --------------------------------------------------------------------


def test_make_service_builds_the_tree_in_start_order(tmp_path: Path) -> None:
    """makeService creates the data directory and returns the root with its children in
    start order (store, engine, metrics, scheduler, webhooks, retention, http), none
    started."""
    options = parse(
        [f"--data-dir={tmp_path}/data", "--listen=tcp:0:interface=127.0.0.1", "--retention=1h"]
    )
    root = tap.makeService(options)
    try:
        assert isinstance(root, CurlfetchService)
        assert [child.name for child in root] == [
            "store",
            "engine",
            "metrics",
            "scheduler",
            "webhooks",
            "retention",
            "http",
        ]
        assert isinstance(root.getServiceNamed("scheduler"), Scheduler)
        assert root.getServiceNamed("scheduler") is root.scheduler
        assert root.scheduler.config.max_concurrency == DEFAULTS.max_concurrency
        retention = root.getServiceNamed("retention")
        assert isinstance(retention, TimerService)
        assert retention.step == 360.0  # a tenth of the retention
        assert isinstance(root.getServiceNamed("http"), StreamServerEndpointService)
        assert not root.running
        assert not any(child.running for child in root)
        assert (tmp_path / "data" / "segments").is_dir()
        assert root.drain_timeout == 20
    finally:
        root.getServiceNamed("engine").stopService()  # closes the client


def test_make_service_tunes_the_garbage_collector(tmp_path: Path) -> None:
    """makeService raises the collector's thresholds (see ``tune_gc``)."""
    before = gc.get_threshold()
    options = parse([f"--data-dir={tmp_path}/data", "--listen=tcp:0:interface=127.0.0.1"])
    root = tap.makeService(options)
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
        root.getServiceNamed("engine").stopService()


def _config(tmp_path: Path, **changes: Any) -> Config:
    return attrs.evolve(
        Config(data_dir=str(tmp_path / "data"), listen="tcp:0:interface=127.0.0.1"),
        **changes,
    )


@pytest_twisted.ensureDeferred
async def test_start_opens_the_store_before_listening_and_stop_closes_it(
    tmp_path: Path,
) -> None:
    """The root starts its children in order and waits for the store to open; stopping
    drains, then stops every child and closes the store and the engine."""
    root = tap.build_service(reactor(), _config(tmp_path))
    root.startService()
    await within(root.when_started())
    assert all(child.running for child in root)
    store: Any = root.scheduler._store
    await within(store.ping())
    await within(root.stopService())
    assert not any(child.running for child in root)
    assert root.api.draining
    assert root.scheduler._client.closed
    bodies: Any = root.scheduler._bodies
    assert bodies._thread is not None
    assert not bodies._thread.is_alive()  # sealed its segment and stopped
    with pytest.raises(StoreClosedError):
        await store.ping()


@pytest_twisted.ensureDeferred
async def test_start_up_failure_is_reported_and_stop_closes_what_opened(
    tmp_path: Path,
) -> None:
    """If a child cannot start (the port is taken), when_started fails with why, and
    stopService still stops the children that started and closes the store."""
    taken = reactor().listenTCP(0, _NoFactory(), interface="127.0.0.1")
    try:
        listen = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        root = tap.build_service(reactor(), _config(tmp_path, listen=listen))
        root.startService()
        with pytest.raises(CannotListenError):
            await within(root.when_started())
        assert root.getServiceNamed("store").running
        await within(root.stopService())
        assert not root.getServiceNamed("store").running
    finally:
        await taken.stopListening()


@pytest_twisted.ensureDeferred
async def test_stop_gives_up_a_start_up_that_hangs() -> None:
    """A child that never finishes starting (a database that never answers) holds a
    stop for STARTUP_WAIT_ON_STOP only: then start-up is abandoned (when_started fails
    with StartupAbandonedError), the children that started are stopped, the ones after
    never start, and the hung child is stopped if its start ever finishes."""
    from types import SimpleNamespace

    from twisted.internet.defer import Deferred

    from curlfetch.services import LifecycleService, StartupAbandonedError

    api: Any = SimpleNamespace(start_draining=lambda: None)
    scheduler: Any = SimpleNamespace(running=False)
    root = CurlfetchService(reactor(), api=api, scheduler=scheduler, drain_timeout=0)
    hang: Deferred[None] = Deferred()
    events: list[str] = []
    for child in (
        LifecycleService("first", lambda: events.append("first"), lambda: events.append("-first")),
        LifecycleService("hung", lambda: hang, lambda: events.append("-hung")),
        LifecycleService("last", lambda: events.append("last")),
    ):
        child.setServiceParent(root)
    root.startService()
    began = reactor().seconds()
    await within(root.stopService())
    assert root.startup_abandoned
    assert reactor().seconds() - began < 3
    with pytest.raises(StartupAbandonedError):
        await within(root.when_started())
    hang.callback(None)
    assert events == ["first", "-first", "-hung"]
    assert not root.stopped_cleanly


class _NoFactory:
    """Enough of a factory to hold a port."""

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: object) -> None:
        return None


@pytest_twisted.ensureDeferred
async def test_retention_purges_old_finished_jobs_and_their_bodies(tmp_path: Path) -> None:
    """A purge pass deletes finished jobs older than the retention and their body files
    (of the file store, still purged after an upgrade); newer and unfinished jobs stay."""
    store = SQLiteJobStore(reactor(), tmp_path / "jobs.sqlite3")
    await within(store.open())
    bodies = DirectoryBodyStore(reactor(), tmp_path / "bodies")
    segments = SegmentBodyStore(reactor(), tmp_path / "segments", legacy=bodies)
    try:
        now = reactor().seconds()
        old, recent, queued = make_job(), make_job(), make_job()
        await within(store.add([old, recent, queued]))
        claimed = {job.id: job for job in await within(store.claim(2, now, []))}
        await within(
            store.save(
                [
                    attrs.evolve(claimed[old.id], state=JobState.SUCCEEDED, finished_at=now - 7200),
                    attrs.evolve(claimed[recent.id], state=JobState.FAILED, finished_at=now - 60),
                ]
            )
        )
        for job in (old, recent):
            writer = bodies.open_writer(job.id)
            writer.write(b"body")
            await within(writer.commit())
        retention = RetentionService(reactor(), store=store, bodies=segments, retention=3600)
        await within(retention.purge())
        assert await within(store.get("alice", old.id)) is None
        assert not bodies.exists(old.id)
        assert await within(store.get("alice", recent.id)) is not None
        assert bodies.exists(recent.id)
        assert await within(store.get("alice", queued.id)) is not None
    finally:
        await within(bodies.close())
        await within(store.close())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=1024"),
        ("unix:/run/curlfetch.sock", "unix:/run/curlfetch.sock:backlog=1024"),
        ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listen_gets_a_larger_backlog_unless_it_sets_one(listen: str, expected: str) -> None:
    """Twisted's default accept queue (50) drops SYNs in a burst of connections."""
    assert tap.with_backlog(listen) == expected


def test_max_connections_defaults_to_the_file_limit_less_a_reserve() -> None:
    """0 (the default): the open-files limit less one per transfer and 256."""
    import resource

    from curlfetch.api.connections import default_max_connections

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_connections(100) == max(64, soft - 100 - 256)
