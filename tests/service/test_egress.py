"""The egress policy: the pure address classifier as a table (every default-denied range,
its boundaries, Smokescreen's ``TestClassifyAddr`` and Advocate's IPv6 cases), operator
rules and their order, ports, host patterns, the ``twistd`` options that build it, and
the scheduler's mapping of a refusal to ``egress_denied``.

The table is pure: nothing here resolves or dials a private, link-local or metadata
address. The scheduler tests fetch from loopback only.
"""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted
from twisted.python import usage

from curlfetch.egress import (
    DEFAULT_DENY_V4,
    DEFAULT_DENY_V6,
    Denial,
    EgressPolicy,
    default_denial,
    embedded_ipv4,
    parse_address,
    parse_cidr,
    parse_host_pattern,
    parse_ports,
)
from curlfetch.jobs import JobSpec, JobState, Limits, SpecError
from curlfetch.options import Options
from tests.engine.faults import canned

from .apiserver import Service, services, svc
from .conftest import reactor, within
from .test_scheduler import Env, env

__all__ = ["env", "services", "svc"]  # fixtures

# (address, the default rule that denies it, or None: global unicast, allowed)
TABLE: list[tuple[str, str | None]] = [
    # unspecified, "this network"
    ("0.0.0.0", "unspecified/this network (0.0.0.0/8)"),
    ("0.255.255.255", "unspecified/this network (0.0.0.0/8)"),
    ("1.0.0.0", None),
    # RFC 1918 (Smokescreen: 10.0.0.1, 172.16.0.1, 192.168.0.1)
    ("9.255.255.255", None),
    ("10.0.0.0", "private (10.0.0.0/8)"),
    ("10.0.0.1", "private (10.0.0.0/8)"),
    ("10.255.255.255", "private (10.0.0.0/8)"),
    ("11.0.0.0", None),
    ("172.15.255.255", None),
    ("172.16.0.0", "private (172.16.0.0/12)"),
    ("172.16.0.1", "private (172.16.0.0/12)"),
    ("172.31.255.255", "private (172.16.0.0/12)"),
    ("172.32.0.0", None),
    ("192.167.255.255", None),
    ("192.168.0.1", "private (192.168.0.0/16)"),
    ("192.168.255.255", "private (192.168.0.0/16)"),
    ("192.169.0.0", None),
    # CGNAT, with Smokescreen's edges and the issue's
    ("100.63.255.254", None),
    ("100.63.255.255", None),
    ("100.64.0.0", "CGNAT shared address space (100.64.0.0/10)"),
    ("100.64.0.1", "CGNAT shared address space (100.64.0.0/10)"),
    ("100.127.255.255", "CGNAT shared address space (100.64.0.0/10)"),
    ("100.128.0.0", None),
    # loopback
    ("127.0.0.0", "loopback (127.0.0.0/8)"),
    ("127.0.0.1", "loopback (127.0.0.0/8)"),
    ("127.0.0.2", "loopback (127.0.0.0/8)"),
    ("127.255.255.255", "loopback (127.0.0.0/8)"),
    ("126.255.255.255", None),
    ("128.0.0.0", None),
    # link-local, metadata
    ("169.253.255.255", None),
    ("169.254.0.0", "link-local (169.254.0.0/16)"),
    ("169.254.169.254", "link-local (169.254.0.0/16)"),
    ("169.254.255.255", "link-local (169.254.0.0/16)"),
    ("169.255.0.0", None),
    # special purpose
    ("192.0.0.0", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.0.255", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.1.0", None),
    ("192.0.2.1", "documentation (192.0.2.0/24)"),
    ("192.88.99.1", "6to4 relay anycast (192.88.99.0/24)"),
    ("198.17.255.255", None),
    ("198.18.0.0", "benchmarking (198.18.0.0/15)"),
    ("198.19.255.255", "benchmarking (198.18.0.0/15)"),
    ("198.20.0.0", None),
    ("198.51.100.7", "documentation (198.51.100.0/24)"),
    ("203.0.113.9", "documentation (203.0.113.0/24)"),
    # multicast, reserved, broadcast
    ("223.255.255.255", None),
    ("224.0.0.0", "multicast (224.0.0.0/4)"),
    ("224.0.0.1", "multicast (224.0.0.0/4)"),
    ("239.255.255.250", "multicast (224.0.0.0/4)"),
    ("240.0.0.0", "reserved (240.0.0.0/4)"),
    ("255.255.255.254", "reserved (240.0.0.0/4)"),
    ("255.255.255.255", "broadcast (255.255.255.255/32)"),
    # global unicast
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.216.34", None),
    # IPv6: unspecified, loopback
    ("::", "unspecified (::/128)"),
    ("::1", "loopback (::1/128)"),
    # IPv4-mapped: unwrapped, and denied as a form even around a global address
    ("::ffff:127.0.0.1", "loopback (127.0.0.0/8) embedded in IPv4-mapped (::ffff:0:0/96)"),
    ("::ffff:7f00:1", "loopback (127.0.0.0/8) embedded in IPv4-mapped (::ffff:0:0/96)"),
    ("::ffff:10.0.0.1", "private (10.0.0.0/8) embedded in IPv4-mapped (::ffff:0:0/96)"),
    ("::ffff:192.168.1.1", "private (192.168.0.0/16) embedded in IPv4-mapped (::ffff:0:0/96)"),
    (
        "::ffff:169.254.169.254",
        "link-local (169.254.0.0/16) embedded in IPv4-mapped (::ffff:0:0/96)",
    ),
    (
        "::ffff:0.0.0.0",
        "unspecified/this network (0.0.0.0/8) embedded in IPv4-mapped (::ffff:0:0/96)",
    ),
    ("::ffff:8.8.8.8", "IPv4-mapped (::ffff:0:0/96)"),
    # IPv4-compatible ::/96 (deprecated)
    ("::127.0.0.1", "loopback (127.0.0.0/8) embedded in IPv4-compatible (::/96)"),
    ("::2", "unspecified/this network (0.0.0.0/8) embedded in IPv4-compatible (::/96)"),
    ("::8.8.8.8", "IPv4-compatible (::/96)"),
    # NAT64 (RFC 6052 well-known prefix, and RFC 8215 local use)
    ("64:ff9b::7f00:1", "loopback (127.0.0.0/8) embedded in NAT64 (64:ff9b::/96)"),
    ("64:ff9b::a00:1", "private (10.0.0.0/8) embedded in NAT64 (64:ff9b::/96)"),
    ("64:ff9b::169.254.169.254", "link-local (169.254.0.0/16) embedded in NAT64 (64:ff9b::/96)"),
    ("64:ff9b::808:808", "NAT64 (64:ff9b::/96)"),
    ("64:ff9b:1::a00:1", "local-use NAT64 (64:ff9b:1::/48)"),
    ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "local-use NAT64 (64:ff9b:1::/48)"),
    # 6to4
    ("2002:7f00:1::1", "loopback (127.0.0.0/8) embedded in 6to4 (2002::/16)"),
    ("2002:a00:1::1", "private (10.0.0.0/8) embedded in 6to4 (2002::/16)"),
    ("2002:c0a8:101::", "private (192.168.0.0/16) embedded in 6to4 (2002::/16)"),
    ("2002:808:808::1", "6to4 (2002::/16)"),
    # Teredo: the client address is the last 32 bits, inverted (RFC 4380's example is
    # client 192.0.2.45 behind server 65.54.227.120)
    (
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "documentation (192.0.2.0/24) embedded in Teredo (2001::/32)",
    ),
    ("2001:0:1:2:3:4:80ff:fffe", "loopback (127.0.0.0/8) embedded in Teredo (2001::/32)"),
    ("2001::f5ff:fffe", "private (10.0.0.0/8) embedded in Teredo (2001::/32)"),
    ("2001::f7f7:f7f7", "Teredo (2001::/32)"),
    # other special IPv6
    ("100::1", "discard-only (100::/64)"),
    ("2001:db8::1", "documentation (2001:db8::/32)"),
    ("2001:2::1", "IETF protocol assignments (2001::/23)"),
    ("2001:10::1", "IETF protocol assignments (2001::/23)"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "IETF protocol assignments (2001::/23)"),
    ("2001:200::", None),
    ("3fff::1", "documentation (3fff::/20)"),
    ("fc00::1", "unique local (fc00::/7)"),
    ("fd00::1", "unique local (fc00::/7)"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "unique local (fc00::/7)"),
    ("fe80::", "link-local (fe80::/10)"),
    ("fe80::1", "link-local (fe80::/10)"),
    ("fe80::1%eth0", "link-local (fe80::/10)"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link-local (fe80::/10)"),
    ("fec0::1", "site-local (fec0::/10)"),
    ("ff02::2", "multicast (ff00::/8)"),
    ("ff05::1:3", "multicast (ff00::/8)"),
    ("1::1", "not global unicast (outside 2000::/3)"),
    ("4000::1", "not global unicast (outside 2000::/3)"),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "not global unicast (outside 2000::/3)"),
    ("2000::", None),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation (3fff::/20)"),
    ("3fff:1000::", None),
    ("3ffe:ffff::1", None),
    ("2606:4700:4700::1111", None),
    ("2001:4860:4860::8888", None),
    ("2a00:1450:4001::1", None),
]


@pytest.mark.parametrize(("ip", "rule"), TABLE, ids=[ip for ip, _ in TABLE])
def test_classifier_table(ip: str, rule: str | None) -> None:
    """Each row: the default classifier denies the address with exactly this rule, or
    allows it (global unicast); the default policy agrees on port 443."""
    assert default_denial(parse_address(ip)) == rule
    denial = EgressPolicy().check_address(ip, 443)
    if rule is None:
        assert denial is None
    else:
        assert denial == Denial(ip, 443, f"default deny: {rule}")


@pytest.mark.parametrize("row", [*DEFAULT_DENY_V4, *DEFAULT_DENY_V6], ids=lambda r: r[2])
def test_every_default_range_holds_from_first_to_last_address(row: tuple[int, int, str]) -> None:
    """For every default-denied range: its first and last address are denied with its own
    rule (or a narrower one listed before it), and the addresses just outside it are not
    denied by it."""
    _, _, rule = row
    cidr = rule[rule.rindex("(") + 1 : -1]
    net = ipaddress.ip_network(cidr)
    for address in (net.network_address, net.broadcast_address):
        denial = default_denial(address)
        assert denial is not None, address
    assert rule in {default_denial(net.network_address), default_denial(net.broadcast_address)}
    for outside in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
        if 0 <= outside < 2**net.max_prefixlen:
            neighbour = ipaddress.ip_address(outside) if net.version == 6 else None
            address = neighbour or ipaddress.IPv4Address(outside)
            assert default_denial(address) != rule, address


def test_embedded_ipv4_unwrapping() -> None:
    """Each IPv6 form that carries IPv4 gives back that address; only IPv4-mapped counts
    as the same host; :: and ::1 and ordinary addresses carry none."""
    cases = {
        "::ffff:1.2.3.4": ("IPv4-mapped (::ffff:0:0/96)", "1.2.3.4", True),
        "::1.2.3.4": ("IPv4-compatible (::/96)", "1.2.3.4", False),
        "64:ff9b::1.2.3.4": ("NAT64 (64:ff9b::/96)", "1.2.3.4", False),
        "2002:102:304::5": ("6to4 (2002::/16)", "1.2.3.4", False),
        "2001:0:4136:e378:8000:63bf:3fff:fdd2": ("Teredo (2001::/32)", "192.0.2.45", False),
    }
    for ip, (form, inner, same) in cases.items():
        embedded = embedded_ipv4(parse_address(ip))
        assert embedded is not None, ip
        assert (embedded.form, str(embedded.ipv4), embedded.same_host) == (form, inner, same)
    for ip in ("::", "::1", "2606:4700::1", "127.0.0.1"):
        assert embedded_ipv4(parse_address(ip)) is None


def test_python_agrees_where_it_is_stable() -> None:
    """Sanity check against ipaddress on rows whose meaning never changed: what we deny
    as private/loopback/link-local Python also calls non-global, and the global rows are
    global to Python too. (Rows Python gets wrong, such as 64:ff9b::a00:1 and
    2002:a00:1::1 reported global on 3.11, are exactly why the table is ours.)"""
    for ip, rule in TABLE:
        if "%" in ip or "embedded" in (rule or "") or (":" in ip and rule is None):
            continue
        address = ipaddress.ip_address(ip)
        if rule is None:
            assert address.is_global, ip
        elif rule.startswith(("private", "loopback", "link-local")):
            assert not address.is_global, ip


def test_ports() -> None:
    """The default allow-list is 80 and 443; ranges are inclusive; the port is checked on
    every connection, allow-listed networks included."""
    policy = EgressPolicy()
    assert policy.check_address("8.8.8.8", 80) is None
    assert policy.check_address("8.8.8.8", 443) is None
    assert policy.check_address("8.8.8.8", 8080) == Denial(
        "8.8.8.8", 8080, "port 8080 not in --allow-port 80,443"
    )
    assert policy.check_address("8.8.8.8", 22) is not None
    ranged = EgressPolicy(allow_ports=[(443, 443), (1024, 2048)])
    assert [
        ranged.check_address("8.8.8.8", p) is None for p in (80, 443, 1023, 1024, 2048, 2049)
    ] == [
        False,
        True,
        False,
        True,
        True,
        False,
    ]
    opened = EgressPolicy(allow_cidrs=[parse_cidr("127.0.0.1/32")], allow_ports=[(18080, 18080)])
    assert opened.check_address("127.0.0.1", 18080) is None
    denial = opened.check_address("127.0.0.1", 18081)
    assert denial is not None
    assert denial.rule == "port 18081 not in --allow-port 18080"


def test_operator_rules_and_their_order() -> None:
    """--deny-cidr first, then --allow-cidr (which opens even default-denied ranges, and
    for IPv4-mapped also the IPv4 inside), then the defaults. A deny matches an embedded
    IPv4 of any form; an allow opens the other embedding forms only by their own range."""
    allow = [parse_cidr(c) for c in ("127.0.0.1/32", "::1/128", "10.1.0.0/16")]
    deny = [parse_cidr(c) for c in ("10.1.2.0/24", "8.8.8.0/24", "2606:4700::/32")]
    policy = EgressPolicy(allow_cidrs=allow, deny_cidrs=deny)

    def rule(ip: str) -> str | None:
        denial = policy.check_address(ip, 443)
        return None if denial is None else denial.rule

    assert rule("127.0.0.1") is None
    assert rule("::1") is None
    assert rule("::ffff:127.0.0.1") is None
    assert rule("127.0.0.2") == "default deny: loopback (127.0.0.0/8)"
    assert rule("10.1.9.9") is None
    assert rule("10.1.2.3") == "--deny-cidr 10.1.2.0/24"
    assert rule("10.2.0.1") == "default deny: private (10.0.0.0/8)"
    assert rule("8.8.8.8") == "--deny-cidr 8.8.8.0/24"
    assert (
        rule("::ffff:8.8.8.8") == "--deny-cidr 8.8.8.0/24 (embedded in IPv4-mapped (::ffff:0:0/96))"
    )
    assert rule("2002:808:808::1") == "--deny-cidr 8.8.8.0/24 (embedded in 6to4 (2002::/16))"
    assert rule("2606:4700::1111") == "--deny-cidr 2606:4700::/32"
    assert rule("8.8.4.4") is None
    assert rule("64:ff9b::7f00:1") == (
        "default deny: loopback (127.0.0.0/8) embedded in NAT64 (64:ff9b::/96)"
    )
    nat64 = EgressPolicy(allow_cidrs=[parse_cidr("64:ff9b::/96")])
    assert nat64.check_address("64:ff9b::808:808", 443) is None
    assert nat64.check_address("64:ff9b::7f00:1", 443) is None  # the operator opened it all
    assert (
        EgressPolicy(allow_cidrs=[parse_cidr("0.0.0.0/0"), parse_cidr("::/0")]).check_address(
            "169.254.169.254", 80
        )
        is None
    )


def test_denials_name_address_and_rule() -> None:
    """A Denial says what was refused and by which rule; garbage is refused, not parsed
    leniently."""
    denial = EgressPolicy().check_address("127.0.0.1", 8080)
    assert denial is not None
    assert (
        str(denial)
        == "127.0.0.1:8080 denied by egress policy: default deny: loopback (127.0.0.0/8)"
    )
    v6 = EgressPolicy().check_address("::1", 80)
    assert str(v6) == "[::1]:80 denied by egress policy: default deny: loopback (::1/128)"
    for junk in ("", "localhost", "2130706433", "127.1", "0x7f.0.0.1", "1.2.3.4.5"):
        denial = EgressPolicy().check_address(junk, 80)
        assert denial is not None
        assert denial.rule == "not an IP address"
    assert EgressPolicy().connect_check("10.0.0.1", 80) == "default deny: private (10.0.0.0/8)"
    assert EgressPolicy().connect_check("8.8.8.8", 80) is None


def test_host_patterns() -> None:
    """--deny-host refuses matching hosts; --allow-host, when given, admits only matching
    hosts (IP literals included). Hosts compare lower-case, without brackets or a
    trailing dot; a non-ASCII host is refused (patterns match xn-- names)."""
    policy = EgressPolicy(
        allow_hosts=["*.example.com", "api.test"], deny_hosts=["*.internal.example.com"]
    )
    assert policy.checks_hosts
    assert policy.check_host("www.example.com") is None
    assert policy.check_host("WWW.Example.COM.") is None
    assert policy.check_host("api.test") is None
    denied = policy.check_host("db.internal.example.com")
    assert denied == Denial("db.internal.example.com", None, "--deny-host *.internal.example.com")
    assert str(denied) == (
        "db.internal.example.com denied by egress policy: --deny-host *.internal.example.com"
    )
    outside = policy.check_host("example.com")
    assert outside is not None
    assert outside.rule == "host not in --allow-host *.example.com,api.test"
    assert policy.check_host("127.0.0.1") is not None
    assert policy.check_host("[::1]") is not None
    assert policy.check_host("bücher.example.com") is not None
    deny_only = EgressPolicy(deny_hosts=["metadata.google.internal", "*.local"])
    assert deny_only.check_host("example.org") is None
    assert (
        deny_only.host_check("Metadata.Google.Internal.") == "--deny-host metadata.google.internal"
    )
    assert not EgressPolicy().checks_hosts
    assert EgressPolicy().host_check("anything.test") is None


def test_parsers() -> None:
    """Option values: networks (a bare address is one host; host bits set is an error
    that suggests the network), ports and ranges within 1-65535, ASCII host patterns."""
    assert parse_cidr("127.0.0.1") == ipaddress.ip_network("127.0.0.1/32")
    assert parse_cidr(" ::1/128 ") == ipaddress.ip_network("::1/128")
    with pytest.raises(ValueError, match=r"did you mean 10\.0\.0\.0/8"):
        parse_cidr("10.1.2.3/8")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_cidr("example.com")
    assert parse_ports("443") == (443, 443)
    assert parse_ports("1024-65535") == (1024, 65535)
    for bad in ("0", "65536", "2000-1000", "http", "80-", "-80", "\uff18\uff10", "+80"):
        with pytest.raises(ValueError):
            parse_ports(bad)
    assert parse_host_pattern("*.Example.COM.") == "*.example.com"
    for bad in ("", "http://x", "x:80", "a/b", "bücher.de"):
        with pytest.raises(ValueError):
            parse_host_pattern(bad)


# -- options -----------------------------------------------------------------------------


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ=environ or {})
    options.parseOptions(args)
    return options


def test_default_options_deny_by_default() -> None:
    """No egress options: the default policy (default denials, ports 80 and 443, any
    host) and a 256 KiB response-header cap."""
    config = parse([]).config
    assert config.egress == EgressPolicy()
    assert config.max_response_header_bytes == 256 * 1024


def test_egress_options_repeat_and_come_from_the_environment() -> None:
    """Each egress option repeats and takes comma-separated values; the environment
    supplies CURLFETCH_<NAME> lists, and any use on the command line replaces them."""
    config = parse(
        [
            "--allow-cidr=127.0.0.0/8",
            "--allow-cidr",
            "::1/128,10.0.0.0/8",
            "--deny-cidr=10.9.0.0/16",
            "--allow-port=80",
            "--allow-port=1024-65535",
            "--deny-host=*.internal",
            "--max-response-header-bytes=65536",
        ],
        {"CURLFETCH_ALLOW_HOST": "*.example.com,api.test", "CURLFETCH_ALLOW_PORT": "8080"},
    ).config
    assert config.egress == EgressPolicy(
        allow_cidrs=[parse_cidr(c) for c in ("127.0.0.0/8", "::1/128", "10.0.0.0/8")],
        deny_cidrs=[parse_cidr("10.9.0.0/16")],
        allow_ports=[(80, 80), (1024, 65535)],
        allow_hosts=["*.example.com", "api.test"],
        deny_hosts=["*.internal"],
    )
    assert config.max_response_header_bytes == 65536


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (["--allow-cidr=10.1.2.3/8"], {}, "--allow-cidr: '10.1.2.3/8' has host bits set"),
        ([], {"CURLFETCH_DENY_CIDR": "nope"}, "--deny-cidr (from CURLFETCH_DENY_CIDR): 'nope'"),
        (["--allow-port=0"], {}, "--allow-port: '0' is not a port"),
        ([], {"CURLFETCH_ALLOW_PORT": ""}, "--allow-port (from CURLFETCH_ALLOW_PORT): give"),
        (["--deny-host=http://x/"], {}, "--deny-host: 'http://x/' is not a host pattern"),
        (["--max-response-header-bytes=0"], {}, "--max-response-header-bytes: must be at least 1"),
    ],
)
def test_bad_egress_values_are_usage_errors(
    args: list[str], environ: dict[str, str], message: str
) -> None:
    """A bad value is a usage error naming the option (and the variable it came from)."""
    with pytest.raises(usage.UsageError) as raised:
        parse(args, environ)
    assert str(raised.value).startswith(message), str(raised.value)


# -- what a client may not set ---------------------------------------------------------


CLIENT_FORBIDDEN = [
    "proxy",
    "proxies",
    "noproxy",
    "resolve",
    "connect_to",
    "interface",
    "unix_socket_path",
    "netrc",
    "netrc_file",
    "cookie",
    "cookiefile",
    "cookie_file",
    "cookiejar",
    "prepare",
    "connect_check",
    "host_check",
    "verify",
    "ca_bundle",
]


def test_job_specs_cannot_reach_library_only_options() -> None:
    """Proxies, RESOLVE, CONNECT_TO, the interface, a unix socket, netrc, cookie files and
    the engine's hooks are library options: a job spec naming any is refused as an
    unknown field."""
    for name in CLIENT_FORBIDDEN:
        with pytest.raises(SpecError) as raised:
            JobSpec.from_json({"url": "http://example.test/", name: "x"}, Limits())
        assert raised.value.field == name


def test_jobs_may_ask_for_less_never_more() -> None:
    """Redirect and timeout caps: a job may lower them, never raise them past Limits;
    the defaults sit within the caps."""
    limits = Limits(max_timeout=30.0, max_redirects=3)
    spec = JobSpec.from_json(
        {"url": "http://example.test/", "timeout": 5, "max_redirects": 1}, limits
    )
    assert (spec.timeout, spec.max_redirects) == (5.0, 1)
    default = JobSpec.from_json({"url": "http://example.test/"}, limits)
    assert default.timeout <= 30.0
    assert default.max_redirects <= 3
    for field, value in (("timeout", 31), ("max_redirects", 4), ("connect_timeout", 31)):
        with pytest.raises(SpecError) as raised:
            JobSpec.from_json({"url": "http://example.test/", field: value}, limits)
        assert raised.value.field == field


@pytest_twisted.ensureDeferred
async def test_api_refuses_library_only_fields_with_400(svc: Service) -> None:
    """Through the API, such a spec is a 400 naming the field, and no job is created."""
    for name in ("proxy", "resolve", "connect_to", "unix_socket_path", "netrc", "cookiefile"):
        reply = await svc.submit({"url": svc.url("/"), name: "127.0.0.1"})
        assert reply.status == 400, name
        assert reply.error["field"] == name


# -- the scheduler ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_scheduler_fails_a_denied_job_at_once_without_retry(env: Env) -> None:
    """Under the default policy a job to a loopback target fails with egress_denied,
    naming the address, port and rule, after one attempt, although it allows three; the
    target sees nothing. Opening loopback and the port lets the same job through."""
    sched = env.scheduler(egress=EgressPolicy())
    job = env.job("/count/denied", retry={"max_attempts": 3, "backoff": 0})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert done.state is JobState.FAILED
    assert done.attempts == 1
    assert done.error is not None
    assert done.error.name == "egress_denied"
    assert done.error.curl_code is None
    port = env.site.port_number
    assert done.error.message == (
        f"connection to 127.0.0.1:{port} denied by egress policy: "
        "default deny: loopback (127.0.0.0/8)"
    )
    assert done.error.to_json() == {"code": "egress_denied", "message": done.error.message}
    assert env.observer.seen[job.id] == ["egress_denied"]
    assert env.site.root.hits == {}

    opened = env.scheduler(
        egress=EgressPolicy(allow_cidrs=[parse_cidr("127.0.0.1")], allow_ports=[(port, port)])
    )
    await within(sched.drain(0.0))
    job2 = env.job("/count/allowed")
    await env.add(job2)
    opened.startService()
    assert (await env.settled(job2)).state is JobState.SUCCEEDED
    assert env.site.root.hits == {"/count/allowed": 1}


@pytest_twisted.ensureDeferred
async def test_scheduler_denies_hosts_and_redirects(env: Env) -> None:
    """Host patterns apply to the job's URL and its redirects: a redirect to a denied
    port fails the job with egress_denied (the second port sees nothing)."""
    port = env.site.port_number
    other = env.other_site()
    policy = EgressPolicy(
        allow_cidrs=[parse_cidr("127.0.0.1")], allow_ports=[(port, port)], deny_hosts=["*.test"]
    )
    sched = env.scheduler(egress=policy)
    by_host = env.job(url=f"http://evil.test:{port}/")
    redirected = env.job(f"/redirect?to=http://127.0.0.1:{other.port_number}/count/x")
    await env.add(by_host, redirected)
    sched.startService()
    failed = await env.settled(by_host)
    assert failed.error is not None
    assert (failed.error.name, failed.error.message) == (
        "egress_denied",
        "host evil.test denied by egress policy: --deny-host *.test",
    )
    failed = await env.settled(redirected)
    assert failed.error is not None
    assert failed.error.name == "egress_denied"
    assert f"127.0.0.1:{other.port_number}" in failed.error.message
    assert f"port {other.port_number} not in --allow-port {port}" in failed.error.message
    assert other.root.hits == {}


@pytest_twisted.ensureDeferred
async def test_scheduler_caps_response_headers(env: Env) -> None:
    """max_response_header_bytes fails a job whose response headers pass it with curl's
    TOO_LARGE (100), not retried."""
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(100))
    server = env.fault(canned(reactor(), b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n"))
    sched = env.scheduler(max_response_header_bytes=8192)
    job = env.job(url=server.url, retry={"max_attempts": 3, "backoff": 0})
    await env.add(job)
    sched.startService()
    done = await env.settled(job)
    assert done.state is JobState.FAILED
    assert done.error is not None
    assert (done.error.name, done.error.curl_code, done.attempts) == ("TOO_LARGE", 100, 1)
    assert "max_header_bytes=8192" in done.error.message
