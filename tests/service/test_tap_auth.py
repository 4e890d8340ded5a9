"""``curlfetch.tap``'s authentication and quota options: parsing (command line and
environment), errors that name the option, the refusal to listen beyond loopback without
tokens, and the wiring into the API and the scheduler."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import usage

from curlfetch import tap
from curlfetch.options import ENV_PREFIX, listens_on_loopback_only
from curlfetch.quotas import ClientQuotas
from curlfetch.services import CurlfetchService

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
LOOPBACK = "--listen=tcp:0:interface=127.0.0.1"


@pytest.fixture(autouse=True)
def _no_curlfetch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's CURLFETCH_* variables out."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def parse(args: list[str], environ: dict[str, str] | None = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


def logged_while(call: Callable[[], CurlfetchService]) -> tuple[Any, list[dict[str, Any]]]:
    """``call()``'s result and the log events emitted meanwhile."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        return call(), events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        f"# clients\nalice:{ALICE}\n\nbob:sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n"
    )
    return path


# -- options -------------------------------------------------------------------------------


def test_defaults_are_no_tokens_protected_metrics_and_no_quotas() -> None:
    """By default: no tokens, /metrics protected (once tokens exist), not insecure, and
    every per-client quota 0 (no limit)."""
    config = parse([]).config
    assert not config.tokens
    assert config.tokens_file == ""
    assert config.metrics_auth == "token"
    assert config.insecure_no_auth is False
    assert config.quotas == ClientQuotas()


def test_tokens_file_and_quota_options(tokens_file: Path) -> None:
    """--tokens-file loads both entry forms; --metrics-auth and the --client-* quotas are
    parsed and converted."""
    config = parse(
        [
            f"--tokens-file={tokens_file}",
            "--metrics-auth=OPEN",
            "--client-max-queued=100",
            "--client-max-in-flight=4",
            "--client-rate=2.5",
            "--client-burst=10",
        ]
    ).config
    assert config.tokens_file == str(tokens_file)
    assert config.tokens.clients == {"alice", "bob"}
    assert config.tokens.client_for(BOB) == "bob"
    assert config.metrics_auth == "open"
    assert config.quotas == ClientQuotas(max_queued=100, max_in_flight=4, rate=2.5, burst=10)


def test_options_from_the_environment(tokens_file: Path) -> None:
    """Every new option comes from CURLFETCH_<NAME> too, and tokens also straight from
    CURLFETCH_TOKENS (merged with the file's)."""
    config = parse(
        [],
        {
            "CURLFETCH_TOKENS_FILE": str(tokens_file),
            "CURLFETCH_TOKENS": "carol:carol-token-0123456789",
            "CURLFETCH_METRICS_AUTH": "open",
            "CURLFETCH_CLIENT_MAX_QUEUED": "5",
            "CURLFETCH_CLIENT_MAX_IN_FLIGHT": "2",
            "CURLFETCH_CLIENT_RATE": "0.5",
            "CURLFETCH_CLIENT_BURST": "3",
            "CURLFETCH_INSECURE_NO_AUTH": "true",
        },
    ).config
    assert config.tokens.clients == {"alice", "bob", "carol"}
    assert config.metrics_auth == "open"
    assert config.quotas == ClientQuotas(max_queued=5, max_in_flight=2, rate=0.5, burst=3)
    assert config.insecure_no_auth is True


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (
            ["--tokens-file=/nonexistent/tokens"],
            {},
            "--tokens-file: /nonexistent/tokens is not a file",
        ),
        (["--metrics-auth=maybe"], {}, "--metrics-auth: must be token or open"),
        (["--client-max-queued=-1"], {}, "--client-max-queued: must be 0 (no limit) or more"),
        (["--client-max-in-flight=x"], {}, "--client-max-in-flight: must be a whole number"),
        (["--client-rate=fast"], {}, "--client-rate: must be a number of jobs per second"),
        (["--client-rate=inf"], {}, "--client-rate: must be 0 (no limit) or more"),
        (["--client-burst=1.5"], {}, "--client-burst: must be a whole number"),
        ([], {"CURLFETCH_TOKENS": "alice:short"}, "CURLFETCH_TOKENS entry 1: the token is shorter"),
        (
            [],
            {"CURLFETCH_INSECURE_NO_AUTH": "please"},
            "--insecure-no-auth (from CURLFETCH_INSECURE",
        ),
    ],
)
def test_bad_values_name_the_option(args: list[str], environ: dict[str, str], message: str) -> None:
    """A bad value is a UsageError starting with the option (or variable) it came from."""
    with pytest.raises(usage.UsageError) as raised:
        parse(args, environ)
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_bad_tokens_file_names_the_option_and_line(tmp_path: Path) -> None:
    """A bad line is a usage error naming --tokens-file, the file and the line; a token
    given twice (file and environment) is refused, naming both places."""
    path = tmp_path / "tokens"
    path.write_text(f"alice:{ALICE}\nbob\n")
    with pytest.raises(usage.UsageError, match=rf"^--tokens-file: {path} line 2: expected"):
        parse([f"--tokens-file={path}"])
    path.write_text(f"alice:{ALICE}\n")
    with pytest.raises(usage.UsageError) as raised:
        parse([f"--tokens-file={path}"], {"CURLFETCH_TOKENS": f"bob:{ALICE}"})
    assert "CURLFETCH_TOKENS entry 1: the same token is already given at" in str(raised.value)
    assert ALICE not in str(raised.value)


# -- loopback only without tokens ------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("tcp:8080:interface=127.0.0.1", True),
        ("tcp:8080:interface=127.0.0.2", True),
        (r"tcp6:8080:interface=\:\:1", True),
        (r"tcp6:8080:interface=\:\:ffff\:127.0.0.1", True),
        ("unix:/tmp/curlfetch.sock", True),
        ("tcp:8080", False),  # no interface: all of them
        ("tcp:0:interface=0.0.0.0", False),
        (r"tcp6:8080:interface=\:\:", False),
        ("tcp:8080:interface=192.0.2.10", False),
        ("tcp:8080:interface=localhost", False),  # a name: not trusted to be loopback
    ],
)
def test_listens_on_loopback_only(listen: str, loopback: bool) -> None:
    """Only a unix socket or a loopback address counts as local; no interface (all of
    them), a wildcard, another address or a host name do not. (Parsing only: nothing
    listens.)"""
    assert listens_on_loopback_only(listen) is loopback


@pytest.mark.parametrize(
    "listen", ["tcp:8080", "tcp:8080:interface=0.0.0.0", r"tcp6:8080:interface=\:\:"]
)
def test_no_tokens_refuses_a_public_listen_address(listen: str, tokens_file: Path) -> None:
    """Without tokens, a --listen reachable from other hosts is a usage error saying what
    to do; with tokens (file or environment), or with --insecure-no-auth, it is
    accepted."""
    with pytest.raises(usage.UsageError) as raised:
        parse([f"--listen={listen}"])
    message = str(raised.value)
    assert message.startswith(f"--listen: {listen} is reachable from other hosts"), message
    assert "--tokens-file" in message
    assert "--insecure-no-auth" in message
    assert parse([f"--listen={listen}", f"--tokens-file={tokens_file}"]).config.tokens
    assert parse([f"--listen={listen}"], {"CURLFETCH_TOKENS": f"alice:{ALICE}"}).config.tokens
    assert parse([f"--listen={listen}", "--insecure-no-auth"]).config.insecure_no_auth
    assert parse([f"--listen={listen}"], {"CURLFETCH_INSECURE_NO_AUTH": "1"}).config.listen


def test_loopback_needs_no_tokens() -> None:
    """The default listen address (127.0.0.1) and a unix socket start without tokens."""
    assert parse([]).config.listen == "tcp:8080:interface=127.0.0.1"
    assert parse(["--listen=unix:/tmp/curlfetch-test.sock"]).config.listen


# -- wiring --------------------------------------------------------------------------------


def test_make_service_wires_tokens_and_quotas_and_logs_no_digest(
    tmp_path: Path, tokens_file: Path
) -> None:
    """makeService hands the tokens, the metrics setting and the quotas to the API and the
    in-flight quota to the scheduler; its start-up log line counts the clients but holds
    neither tokens nor their digests."""
    options = parse(
        [
            f"--data-dir={tmp_path}/data",
            LOOPBACK,
            f"--tokens-file={tokens_file}",
            "--metrics-auth=open",
            "--client-max-queued=7",
            "--client-max-in-flight=3",
            "--client-rate=1.5",
        ]
    )
    root, events = logged_while(lambda: tap.makeService(options))
    try:
        api = root.api
        assert api.tokens == options.config.tokens
        assert api.metrics_auth is False
        assert api.quotas == ClientQuotas(max_queued=7, max_in_flight=3, rate=1.5)
        assert api.rates.rate == 1.5
        assert api.rates.burst == 2
        assert root.scheduler.config.max_per_client == 3
        started = [e for e in events if "clients=" in e.get("log_format", "")]
        assert len(started) == 1
        assert started[0]["clients"] == 2
        assert "tokens" not in started[0]
        text = repr(events)
        digest = hashlib.sha256(ALICE.encode()).digest()
        assert ALICE not in text
        assert repr(digest) not in text
        assert digest.hex() not in text
    finally:
        root.getServiceNamed("engine").stopService()


def test_make_service_warns_when_the_api_is_open(tmp_path: Path) -> None:
    """Without tokens, makeService logs a warning that the API is open."""
    options = parse([f"--data-dir={tmp_path}/data", LOOPBACK])
    root, events = logged_while(lambda: tap.makeService(options))
    try:
        assert any("no tokens configured" in e.get("log_format", "") for e in events)
    finally:
        root.getServiceNamed("engine").stopService()
