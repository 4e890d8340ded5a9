"""The engine's egress hooks through real fetches: ``connect_check`` (decided on the address
libcurl is about to connect to, in OPENSOCKETFUNCTION, and again on a reused connection),
``host_check`` (the URL's host and every redirect's) and ``max_header_bytes``.

Only loopback is ever dialled (127.0.0.0/8 and ::1): private, link-local and metadata
addresses are covered by the pure table test in ``tests/service/test_egress.py``, never
here, not even expecting a block. The checks are the service's real ``EgressPolicy``
where the point is the policy, and plain lambdas where it is the hook.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycurl
import pytest
import pytest_twisted

from curlfetch.egress import EgressPolicy, parse_cidr
from curlfetch.engine import (
    ConnectError,
    EgressDeniedError,
    HeadersTooLargeError,
    UnsupportedProtocolError,
)

from .conftest import Engine, _reactor, open_fds
from .faults import canned, refused_port
from .servers import LoopbackSite, pattern_bytes


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_V6 = _has_ipv6_loopback()
ANY_PORT = ((1, 65535),)
LOOPBACK_OPEN = EgressPolicy(
    allow_cidrs=[parse_cidr(c) for c in ("127.0.0.0/8", "::1/128", "0.0.0.0/32")],
    allow_ports=ANY_PORT,
)
"""What a test deployment opens: loopback (and 0.0.0.0, which Linux connects to loopback)
on any port. The mapped form ::ffff:127.0.0.1 is opened by 127.0.0.0/8."""
DEFAULT_ANY_PORT = EgressPolicy(allow_ports=ANY_PORT)
"""The default address denials, every port: isolates the address rules."""


class Seen:
    """A connect_check that records what it was asked, then defers to ``policy``."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.calls: list[tuple[str, int]] = []

    def __call__(self, ip: str, port: int) -> str | None:
        self.calls.append((ip, port))
        return self.policy.connect_check(ip, port)


async def failure_of(d: Any) -> BaseException:
    try:
        result = await d
    except BaseException as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest.fixture(scope="module")
def target2() -> Iterator[LoopbackSite]:
    """A second target on 127.0.0.2: another loopback address, same port space."""
    site = LoopbackSite(_reactor(), interface="127.0.0.2")
    yield site
    site.stop()


@pytest.fixture(scope="module")
def target6() -> Iterator[LoopbackSite | None]:
    """A target on [::1], or None where this host has no IPv6 loopback."""
    if not HAS_V6:
        yield None
        return
    site = LoopbackSite(_reactor(), interface="::1")
    yield site
    site.stop()


def notations(
    target: LoopbackSite, target2: LoopbackSite, target6: LoopbackSite | None
) -> list[tuple[str, str, str]]:
    """(url, the address libcurl connects to, the default rule that denies it) for every
    way to write a loopback address. Each URL reaches a live target when allowed."""
    p = target.port_number
    rows = [
        (f"http://127.0.0.1:{p}/bytes?n=10", "127.0.0.1", "loopback (127.0.0.0/8)"),
        (f"http://127.0.0.2:{target2.port_number}/bytes?n=10", "127.0.0.2", "loopback"),
        (f"http://0.0.0.0:{p}/bytes?n=10", "0.0.0.0", "unspecified/this network (0.0.0.0/8)"),
        (f"http://2130706433:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (f"http://0x7f.1:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (f"http://017700000001:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (f"http://0177.0.0.1:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (f"http://127.1:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (f"http://0x7f000001:{p}/bytes?n=10", "127.0.0.1", "loopback"),
        (
            f"http://[::ffff:127.0.0.1]:{p}/bytes?n=10",
            "::ffff:127.0.0.1",
            "loopback (127.0.0.0/8) embedded in IPv4-mapped (::ffff:0:0/96)",
        ),
        (
            f"http://[::ffff:7f00:1]:{p}/bytes?n=10",
            "::ffff:127.0.0.1",
            "embedded in IPv4-mapped",
        ),
    ]
    if target6 is not None:
        rows.append((f"http://[::1]:{target6.port_number}/bytes?n=10", "::1", "loopback (::1/128)"))
    return rows


@pytest_twisted.ensureDeferred
async def test_every_loopback_notation_is_denied_by_default(
    target: LoopbackSite,
    target2: LoopbackSite,
    target6: LoopbackSite | None,
    engine: Engine,
) -> None:
    """Decimal, hex, octal, short and IPv6-mapped spellings of loopback, 127.0.0.2, [::1]
    and 0.0.0.0 all reach the check as the address itself, and the default policy
    refuses each with EgressDeniedError naming that address, the port and the rule. The
    target sees no request."""
    client = engine.client()
    before = dict(target.root.hits)
    for url, address, rule in notations(target, target2, target6):
        seen = Seen(DEFAULT_ANY_PORT)
        error = await failure_of(engine.within(client.fetch(url, connect_check=seen)))
        assert isinstance(error, EgressDeniedError), (url, error)
        assert error.address == address, url
        assert error.port == seen.calls[0][1]
        assert rule in error.reason, (url, error.reason)
        assert error.reason.startswith("default deny: ")
        assert address in str(error)
        assert seen.calls == [(address, seen.calls[0][1])], url
    assert target.root.hits == before


@pytest_twisted.ensureDeferred
async def test_every_loopback_notation_is_allowed_when_allow_listed(
    target: LoopbackSite,
    target2: LoopbackSite,
    target6: LoopbackSite | None,
    engine: Engine,
) -> None:
    """With loopback allow-listed (as --allow-cidr does), the same URLs fetch normally:
    the check passes and libcurl connects to a socket the guard opened."""
    client = engine.client()
    for url, address, _ in notations(target, target2, target6):
        seen = Seen(LOOPBACK_OPEN)
        r = await engine.fetch(client, url, connect_check=seen)
        assert (r.status, r.body) == (200, pattern_bytes(10)), url
        assert r.primary_ip == address
        assert (address, r.primary_port) in seen.calls


@pytest_twisted.ensureDeferred
async def test_localhost_is_denied_on_every_address(target: LoopbackSite, engine: Engine) -> None:
    """localhost resolves (inside libcurl) to ::1 and 127.0.0.1: each address is
    refused, and the error names the first and counts the others."""
    client = engine.client()
    seen = Seen(DEFAULT_ANY_PORT)
    error = await failure_of(
        engine.within(
            client.fetch(f"http://localhost:{target.port_number}/bytes", connect_check=seen)
        )
    )
    assert isinstance(error, EgressDeniedError)
    addresses = {ip for ip, _ in seen.calls}
    assert "127.0.0.1" in addresses
    assert addresses <= {"127.0.0.1", "::1"}
    assert error.others == len(seen.calls) - 1
    assert "loopback" in error.reason


@pytest_twisted.ensureDeferred
async def test_one_refused_address_falls_through_to_the_next(
    target: LoopbackSite, engine: Engine
) -> None:
    """A host with a refused and an allowed address (localhost: ::1 refused, 127.0.0.1
    allowed) connects to the allowed one; the refusal does not fail the fetch."""
    client = engine.client()

    def v4_only(ip: str, port: int) -> str | None:
        return None if ip == "127.0.0.1" else "IPv6 refused here"

    r = await engine.fetch(
        client, f"http://localhost:{target.port_number}/bytes?n=10", connect_check=v4_only
    )
    assert (r.status, r.primary_ip) == (200, "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_refused_connection_to_an_allowed_address_stays_a_connect_error(
    engine: Engine,
) -> None:
    """An allowed address that refuses the connection fails as ConnectError (retryable),
    not as an egress denial."""
    client = engine.client()
    error = await failure_of(
        engine.within(
            client.fetch(
                f"http://127.0.0.1:{refused_port()}/", connect_check=LOOPBACK_OPEN.connect_check
            )
        )
    )
    assert isinstance(error, ConnectError)
    assert error.code == 7


@pytest_twisted.ensureDeferred
async def test_resolve_pin_to_loopback_is_denied(target: LoopbackSite, engine: Engine) -> None:
    """A name pinned to 127.0.0.1 with RESOLVE (the library's ``resolve``, as a DNS
    answer would) is judged by the address: refused by default, allowed when listed."""
    client = engine.client()
    port = target.port_number
    url = f"http://evil.test:{port}/bytes?n=10"
    pin = (f"evil.test:{port}:127.0.0.1",)
    error = await failure_of(
        engine.within(client.fetch(url, resolve=pin, connect_check=DEFAULT_ANY_PORT.connect_check))
    )
    assert isinstance(error, EgressDeniedError)
    assert (error.address, error.port) == ("127.0.0.1", port)
    r = await engine.fetch(client, url, resolve=pin, connect_check=LOOPBACK_OPEN.connect_check)
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_redirect_to_a_denied_port_or_address_is_denied(
    target: LoopbackSite, target2: LoopbackSite, engine: Engine
) -> None:
    """A 302 from an allowed loopback port to a port (or a loopback address) that is not
    allowed is checked when libcurl connects for it, and refused; the second target sees
    nothing. Allow-listing the second port lets the same redirect through."""
    client = engine.client()
    allowed = EgressPolicy(
        allow_cidrs=[parse_cidr("127.0.0.1/32")], allow_ports=[(target.port_number,) * 2]
    )
    other = LoopbackSite(_reactor())
    try:
        to_port = target.url(f"/redirect?to=http://127.0.0.1:{other.port_number}/count/x")
        error = await failure_of(
            engine.within(client.fetch(to_port, connect_check=allowed.connect_check))
        )
        assert isinstance(error, EgressDeniedError)
        assert (error.address, error.port) == ("127.0.0.1", other.port_number)
        assert error.reason == f"port {other.port_number} not in --allow-port {target.port_number}"
        assert other.root.hits == {}

        to_address = target.url(f"/redirect?to={target2.url('/count/y')}")
        error = await failure_of(
            engine.within(
                client.fetch(
                    to_address,
                    connect_check=EgressPolicy(
                        allow_cidrs=[parse_cidr("127.0.0.1/32")], allow_ports=ANY_PORT
                    ).connect_check,
                )
            )
        )
        assert isinstance(error, EgressDeniedError)
        assert error.address == "127.0.0.2"
        assert "loopback" in error.reason
        assert target2.root.hits == {}

        both = EgressPolicy(
            allow_cidrs=[parse_cidr("127.0.0.1/32")],
            allow_ports=[(target.port_number,) * 2, (other.port_number,) * 2],
        )
        r = await engine.fetch(client, to_port, connect_check=both.connect_check)
        assert (r.status, len(r.redirects)) == (200, 1)
        assert other.root.hits == {"/count/x": 1}
    finally:
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_redirect_to_file_is_refused_as_a_protocol(
    target: LoopbackSite, engine: Engine
) -> None:
    """With every check on, a redirect to file: still ends as libcurl's refusal of the
    scheme (UnsupportedProtocolError 1), and nothing is read."""
    client = engine.client()
    error = await failure_of(
        engine.within(
            client.fetch(
                target.url("/redirect?to=file:///etc/hostname"),
                connect_check=LOOPBACK_OPEN.connect_check,
                host_check=EgressPolicy(allow_hosts=["127.0.0.1"]).host_check,
            )
        )
    )
    assert isinstance(error, UnsupportedProtocolError)
    assert error.code == 1


@pytest_twisted.ensureDeferred
async def test_pooled_connection_is_checked_again(target: LoopbackSite, engine: Engine) -> None:
    """A connection pooled by an unchecked fetch is not a way around a later fetch's
    check: reuse is checked before the request is sent (PREREQFUNCTION)."""
    client = engine.client()
    url = target.url("/count/pooled")
    r = await engine.fetch(client, url)
    assert r.status == 200
    hits = target.root.hits.get("/count/pooled")
    error = await failure_of(
        engine.within(client.fetch(url, connect_check=DEFAULT_ANY_PORT.connect_check))
    )
    assert isinstance(error, EgressDeniedError)
    assert "loopback" in error.reason
    assert target.root.hits.get("/count/pooled") == hits
    r = await engine.fetch(client, url, connect_check=LOOPBACK_OPEN.connect_check)
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_a_failing_check_fails_closed(target: LoopbackSite, engine: Engine) -> None:
    """A connect_check or host_check that raises refuses (the fetch fails with
    EgressDeniedError naming the exception); nothing reaches the target."""
    client = engine.client()

    def broken(*args: object) -> str | None:
        raise RuntimeError("policy store down")

    for options in ({"connect_check": broken}, {"host_check": broken}):
        error = await failure_of(
            engine.within(client.fetch(target.url("/count/broken"), **options))  # type: ignore[arg-type]
        )
        assert isinstance(error, EgressDeniedError)
        assert "RuntimeError: policy store down" in error.reason
    assert "/count/broken" not in target.root.hits


@pytest_twisted.ensureDeferred
async def test_host_check_on_the_url_and_on_every_redirect(
    target: LoopbackSite, engine: Engine
) -> None:
    """host_check sees the URL's host as libcurl parses it and refuses before anything is
    sent; a redirect to a refused host (absolute, or scheme-relative) is refused before
    it is followed; relative redirects keep the allowed host."""
    client = engine.client()
    port = target.port_number
    pin = tuple(f"{name}:{port}:127.0.0.1" for name in ("good.test", "bad.test"))
    policy = EgressPolicy(deny_hosts=["bad.*"])
    asked: list[str] = []

    def hosts(host: str) -> str | None:
        asked.append(host)
        return policy.host_check(host)

    opts: Any = {"resolve": pin, "host_check": hosts}
    error = await failure_of(
        engine.within(client.fetch(f"http://BAD.test.:{port}/count/a", **opts))
    )
    assert isinstance(error, EgressDeniedError)
    # The host as libcurl parsed it; the policy compares it lower-case, without the dot.
    assert (error.address, error.port, error.reason) == ("BAD.test.", None, "--deny-host bad.*")
    assert str(error) == "host BAD.test. denied by egress policy: --deny-host bad.*"
    for location in (f"http://bad.test:{port}/count/b", f"//bad.test:{port}/count/b"):
        url = f"http://good.test:{port}/redirect?to={location}"
        error = await failure_of(engine.within(client.fetch(url, **opts)))
        assert isinstance(error, EgressDeniedError), location
        assert error.address == "bad.test"
    r = await engine.fetch(client, f"http://good.test:{port}/redirect?n=2", **opts)
    assert (r.status, len(r.redirects)) == (200, 2)
    assert "/count/a" not in target.root.hits
    assert "/count/b" not in target.root.hits
    assert set(asked) == {"BAD.test.", "good.test", "bad.test"}


@pytest_twisted.ensureDeferred
async def test_allow_hosts_is_an_allow_list(target: LoopbackSite, engine: Engine) -> None:
    """With allow_hosts, a host outside the list (an IP literal included) is refused."""
    client = engine.client()
    policy = EgressPolicy(allow_hosts=["*.good.test"])
    pin = (f"www.good.test:{target.port_number}:127.0.0.1",)
    r = await engine.fetch(
        client,
        f"http://www.good.test:{target.port_number}/bytes?n=1",
        resolve=pin,
        host_check=policy.host_check,
    )
    assert r.status == 200
    error = await failure_of(
        engine.within(client.fetch(target.url("/bytes"), host_check=policy.host_check))
    )
    assert isinstance(error, EgressDeniedError)
    assert error.reason == "host not in --allow-host *.good.test"


def _many_headers(count: int, size: int) -> bytes:
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * size) for i in range(count))
    return b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok"


@pytest_twisted.ensureDeferred
async def test_max_header_bytes(engine: Engine) -> None:
    """Response headers past max_header_bytes stop the transfer at once with
    HeadersTooLargeError (code 100, TOO_LARGE), whether many small lines or one large
    one; a response under the cap, and any response without one, comes through."""
    client = engine.client()
    servers = [
        canned(_reactor(), _many_headers(400, 1000)),
        canned(_reactor(), _many_headers(1, 40_000)),
        canned(_reactor(), _many_headers(10, 100)),
    ]
    try:
        for server in servers[:2]:
            error = await failure_of(
                engine.within(client.fetch(server.url, max_header_bytes=16 * 1024), 2.0)
            )
            assert isinstance(error, HeadersTooLargeError)
            assert (error.code, error.name) == (100, "TOO_LARGE")
            assert "max_header_bytes=16384" in error.message
        r = await engine.fetch(client, servers[2].url, max_header_bytes=16 * 1024)
        assert (r.status, r.body) == (200, b"ok")
        r = await engine.fetch(client, servers[1].url)
        assert len(r.headers.get("x-filler-0") or "") == 40_000
    finally:
        for server in servers:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_header_cap_counts_every_redirect(target: LoopbackSite, engine: Engine) -> None:
    """The cap is on all response headers of the fetch, redirects included, counted as
    libcurl counts them (header_size): one byte less than the chain fails."""
    client = engine.client()
    url = target.url("/redirect?n=3")
    r = await engine.fetch(client, url)
    assert len(r.redirects) == 3
    error = await failure_of(engine.within(client.fetch(url, max_header_bytes=r.header_size - 1)))
    assert isinstance(error, HeadersTooLargeError)
    r = await engine.fetch(client, url, max_header_bytes=r.header_size)
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leaks(target: LoopbackSite, engine: Engine) -> None:
    """100 allowed and 100 refused fetches leave no descriptor behind: the guard hands
    libcurl a bare fd (never a socket object pycurl would dup), and refused addresses
    open nothing."""
    client = engine.client(max_concurrent=20)
    baseline = open_fds()
    allowed = [
        client.fetch(target.url("/bytes?n=10"), connect_check=LOOPBACK_OPEN.connect_check)
        for _ in range(100)
    ]
    denied = [
        client.fetch(target.url("/bytes?n=10"), connect_check=DEFAULT_ANY_PORT.connect_check)
        for _ in range(100)
    ]
    for d in allowed:
        assert (await engine.within(d)).status == 200
    for d in denied:
        assert isinstance(await failure_of(engine.within(d)), EgressDeniedError)
    client.close()
    for _ in range(100):
        if not open_fds() - baseline:
            break
        await engine.sleep(0.02)
    assert not open_fds() - baseline


@pytest_twisted.ensureDeferred
async def test_no_environment_proxies_netrc_or_cookie_files_by_default(
    target: LoopbackSite, engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """By default the engine reads nothing a client or the environment could slip in:
    no ~/.netrc credentials (NETRC stays off), no cookies kept between fetches (no
    cookie engine), no proxy from http_proxy/ALL_PROXY (a refused port: going there
    would fail)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    os.chmod(home / ".netrc", 0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name in ("http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{refused_port()}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = engine.client()
    r = await engine.fetch(client, target.url("/headers"))
    assert r.headers.get_all("set-cookie") == ["a=1", "b=2"]
    r = await engine.fetch(client, target.url("/echo"))
    names = {name.lower() for name, _ in json.loads(r.body)["headers"]}
    assert "authorization" not in names
    assert "cookie" not in names
    assert "proxy-connection" not in names


def test_connect_check_is_library_only_and_typed() -> None:
    """connect_check/host_check/max_header_bytes are Request options with the documented
    shapes; a non-positive cap is refused up front."""
    from curlfetch.engine import Request

    request = Request(
        url="http://example.test/",
        connect_check=LOOPBACK_OPEN.connect_check,
        host_check=EgressPolicy().host_check,
        max_header_bytes=1024,
    )
    assert request.connect_check is not None
    assert request.connect_check("127.0.0.1", 80) is None
    assert request.connect_check("10.0.0.1", 80) == "default deny: private (10.0.0.0/8)"
    with pytest.raises(ValueError, match="max_header_bytes"):
        Request(url="http://example.test/", max_header_bytes=0)


def _guard(**options: Any) -> Any:
    from curlfetch.engine import Request
    from curlfetch.engine.guard import TransferGuard

    guard = TransferGuard(Request(url="http://good.test/a/b", **options), [])
    guard._check_first_host(options["host_check"])
    return guard


def test_redirect_tracking_reads_the_head_as_libcurl_does() -> None:
    """(Pure: fed header lines, nothing dialled.) The first Location of a 3xx head is
    resolved against the current URL with libcurl's parser when the head ends; other
    statuses and 1xx heads are ignored; a folded Location is refused, a folded other
    header is not."""
    asked: list[str] = []

    def check(host: str) -> str | None:
        asked.append(host)
        return "refused" if host.startswith("bad") else None

    guard = _guard(host_check=check)
    head = [b"HTTP/1.1 100 Continue\r\n", b"\r\n", b"HTTP/1.1 302 Found\r\n"]
    head += [b"Location: //bad.test/x\r\n", b"Location: http://good.test/\r\n"]
    assert [guard.header(line) for line in head] == [None] * 5
    assert guard.header(b"\r\n") == 0
    assert guard.error.address == "bad.test"
    assert asked == ["good.test", "bad.test"]

    guard = _guard(host_check=check)
    for line in (b"HTTP/2 200 \r\n", b"location: http://bad.test/\r\n", b"\r\n"):
        assert guard.header(line) is None
    for line in (b"HTTP/1.1 301 Moved\r\n", b"Location: ../c\r\n", b"\r\n"):
        assert guard.header(line) is None
    assert guard.url.getpart(pycurl.UPART_URL) == "http://good.test/c"

    guard = _guard(host_check=check)
    lines = [b"HTTP/1.1 302 Found\r\n", b"X-A: 1\r\n", b" more\r\n", b"Location: /d\r\n"]
    assert [guard.header(line) for line in lines] == [None] * 4
    assert guard.header(b"\t.bad.test\r\n") == 0
    assert guard.error.reason == "a folded Location header"
