"""The egress policy: which addresses, ports and hosts a fetch may connect to.

Decisions are made on the address libcurl is about to connect to (the engine's
``connect_check``, from ``CURLOPT_OPENSOCKETFUNCTION``), never on the URL string: every
IPv4 notation (``2130706433``, ``0x7f.1``, ``127.1``) and every DNS answer, rebinding
included, arrives here as the address itself. Redirects connect again, so they are
checked again.

Order, for an address: ``--deny-cidr`` -> ``--allow-cidr`` (which opens even a range
denied by default) -> the default denials, on the address and on the IPv4 address an
IPv6 form embeds -> what is left is global unicast and allowed. The port allow-list
applies to every connection, allow-listed ranges included.

Host patterns (``--allow-host``/``--deny-host``) are checked on the URL's host, on the
first request and on every redirect. They only ever deny: a name never opens an address
the address rules deny, because whoever controls the name's DNS would choose the address.

Pure functions and frozen values: nothing here resolves or dials anything. Python's
``ipaddress.is_global``/``is_private`` changed across versions (CVE-2024-4032), so the
ranges are spelled out here and pinned by a table test.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TypeAlias

import attrs

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = 4
_V6 = 6
_LOW32 = 0xFFFFFFFF


def _table(
    rows: Iterable[tuple[str, str]],
) -> tuple[tuple[int, int, str], ...]:
    """(network, name) rows as (network int, mask int, "name (network)"): a match is one
    AND and one compare."""
    out = []
    for cidr, name in rows:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask), f"{name} ({net})"))
    return tuple(out)


# Denied by default. First match names the rule, so narrower ranges come first.
DEFAULT_DENY_V4 = _table(
    [
        ("0.0.0.0/8", "unspecified/this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT shared address space"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    ]
)

DEFAULT_DENY_V6 = _table(
    [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "discard-only"),
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "IETF protocol assignments"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
        ("64:ff9b:1::/48", "local-use NAT64"),
    ]
)

GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


def _net(cidr: str) -> tuple[int, int, str]:
    net = ipaddress.ip_network(cidr)
    return int(net.network_address), int(net.netmask), str(net)


def _low32(a: int) -> int:
    return a & _LOW32


# (range, name, how to get the IPv4 address out, same host?), in the order checked.
_EMBEDDINGS: tuple[tuple[tuple[int, int, str], str, Callable[[int], int], bool], ...] = (
    (_net("::ffff:0:0/96"), "IPv4-mapped", _low32, True),
    (_net("::/96"), "IPv4-compatible", _low32, False),
    (_net("64:ff9b::/96"), "NAT64", _low32, False),
    (_net("2002::/16"), "6to4", lambda a: (a >> 80) & _LOW32, False),
    (_net("2001::/32"), "Teredo", lambda a: ~a & _LOW32, False),
)


@attrs.frozen
class Embedded:
    """An IPv4 address carried inside an IPv6 one."""

    form: str
    """``IPv4-mapped (::ffff:0:0/96)``, ``NAT64 (64:ff9b::/96)``..."""
    ipv4: ipaddress.IPv4Address
    same_host: bool
    """True for IPv4-mapped: a dual-stack socket reaches that very IPv4 host. The other
    forms reach a translator or relay, which passes the traffic on to it."""


def embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Embedded | None:
    """The IPv4 address inside ``address``: IPv4-mapped, IPv4-compatible (``::/96``),
    NAT64 (``64:ff9b::/96``), 6to4 (``2002::/16``), Teredo (``2001::/32``, the client
    address: the last 32 bits inverted). None for an IPv4 address or any other IPv6 one."""
    if address.version != _V6:
        return None
    a = int(address)
    if a <= 1:  # :: and ::1 are themselves, not IPv4-compatible 0.0.0.0 and 0.0.0.1
        return None
    for (net, mask, cidr), name, extract, same_host in _EMBEDDINGS:
        if a & mask == net:
            return Embedded(f"{name} ({cidr})", ipaddress.IPv4Address(extract(a)), same_host)
    return None


def _v4_rule(value: int) -> str | None:
    for net, mask, name in DEFAULT_DENY_V4:
        if value & mask == net:
            return name
    return None


def default_denial(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is denied by default (``loopback (127.0.0.0/8)``), or None if it is
    global unicast. The pure classifier: no operator rules, no ports."""
    if address.version == _V4:
        return _v4_rule(int(address))
    assert isinstance(address, ipaddress.IPv6Address)
    # Embedded forms first: Teredo lies inside 2001::/23 and should be named as itself.
    embedded = embedded_ipv4(address)
    if embedded is not None:
        inner = _v4_rule(int(embedded.ipv4))
        if inner is not None:
            return f"{inner} embedded in {embedded.form}"
        return embedded.form
    value = int(address)
    for net, mask, name in DEFAULT_DENY_V6:
        if value & mask == net:
            return name
    if address not in GLOBAL_UNICAST_V6:
        return f"not global unicast (outside {GLOBAL_UNICAST_V6})"
    return None


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A strict IP address; an IPv6 zone (``fe80::1%eth0``) is dropped. ValueError if
    ``text`` is not one (IPv4 only as a dotted quad: that is what libcurl reports)."""
    return ipaddress.ip_address(text.partition("%")[0])


def parse_cidr(text: str) -> Network:
    """``10.0.0.0/8``, ``::1/128``, or a bare address (one host). Host bits set is an
    error, not a silent widening: ``10.1.2.3/8`` is probably a typo."""
    text = text.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        try:
            wider = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network ({e})") from None
        raise ValueError(f"{text!r} has host bits set (did you mean {wider}?)") from None


PortRange: TypeAlias = tuple[int, int]
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def parse_ports(text: str) -> PortRange:
    """``443`` or ``1024-65535`` (inclusive)."""
    match = _PORTS.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a port or a port range like 1024-65535")
    low = int(match[1])
    high = int(match[2]) if match[2] else low
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port or range within 1-65535")
    return low, high


def normalize_host(host: str) -> str:
    """How hosts are compared: lower-case, no IPv6 brackets, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".") if host != "." else host


def parse_host_pattern(text: str) -> str:
    """An fnmatch-style host pattern (``*.example.com``, ``metadata.*``), ASCII only:
    internationalized names in their ``xn--`` form."""
    pattern = normalize_host(text)
    if not pattern:
        raise ValueError("a host pattern must not be empty")
    if not pattern.isascii() or any(ch in pattern for ch in "/:@ \t"):
        raise ValueError(f"{text!r} is not a host pattern (ASCII, no scheme, port or path)")
    return pattern


def _ports_text(ports: tuple[PortRange, ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


@attrs.frozen
class Denial:
    """A refused connection or host: what, and the rule that refused it."""

    address: str
    port: int | None
    rule: str
    """``default deny: loopback (127.0.0.0/8)``, ``--deny-cidr 203.0.113.0/24``,
    ``port 22 not in --allow-port 80,443``, ``--deny-host *.internal``..."""

    def __str__(self) -> str:
        where = self.address if self.port is None else _address_port(self.address, self.port)
        return f"{where} denied by egress policy: {self.rule}"


def _address_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _networks(values: Iterable[Network]) -> tuple[Network, ...]:
    return tuple(values)


def _port_ranges(values: Iterable[PortRange]) -> tuple[PortRange, ...]:
    return tuple(values)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class EgressPolicy:
    """Operator rules on top of the default denials. ``EgressPolicy()`` is the default:
    global unicast addresses on ports 80 and 443, any host."""

    allow_cidrs: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    deny_cidrs: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    allow_ports: tuple[PortRange, ...] = attrs.field(
        default=((80, 80), (443, 443)), converter=_port_ranges
    )
    allow_hosts: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    """If any, every host (first request and redirects) must match one of them."""
    deny_hosts: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    @property
    def checks_hosts(self) -> bool:
        return bool(self.allow_hosts or self.deny_hosts)

    def check_address(self, ip: str, port: int) -> Denial | None:
        """None if connecting to ``ip`` on ``port`` is allowed, else the Denial."""
        try:
            address = parse_address(ip)
        except ValueError:
            return Denial(ip, port, "not an IP address")
        embedded = embedded_ipv4(address)
        inner = embedded.ipv4 if embedded is not None else None
        for net in self.deny_cidrs:
            if address in net or (inner is not None and inner in net):
                via = f" (embedded in {embedded.form})" if embedded and inner in net else ""
                return Denial(ip, port, f"--deny-cidr {net}{via}")
        allowed = any(
            address in net or (embedded is not None and embedded.same_host and embedded.ipv4 in net)
            for net in self.allow_cidrs
        )
        if not allowed:
            rule = default_denial(address)
            if rule is not None:
                return Denial(ip, port, f"default deny: {rule}")
        if not any(lo <= port <= hi for lo, hi in self.allow_ports):
            return Denial(
                ip, port, f"port {port} not in --allow-port {_ports_text(self.allow_ports)}"
            )
        return None

    def check_host(self, host: str) -> Denial | None:
        """None if the URL host ``host`` is allowed by the host patterns, else the Denial."""
        name = normalize_host(host)
        if not name.isascii():
            return Denial(host, None, "host is not ASCII (patterns match xn-- names)")
        for pattern in self.deny_hosts:
            if fnmatch.fnmatchcase(name, pattern):
                return Denial(name, None, f"--deny-host {pattern}")
        if self.allow_hosts and not any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.allow_hosts
        ):
            return Denial(name, None, f"host not in --allow-host {','.join(self.allow_hosts)}")
        return None

    # The engine's hooks (``Request.connect_check`` / ``host_check``): the rule, or None.

    def connect_check(self, ip: str, port: int) -> str | None:
        denial = self.check_address(ip, port)
        return None if denial is None else denial.rule

    def host_check(self, host: str) -> str | None:
        denial = self.check_host(host)
        return None if denial is None else denial.rule

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = [f"allow-port={_ports_text(self.allow_ports)}"]
        for label, values in (
            ("allow-cidr", self.allow_cidrs),
            ("deny-cidr", self.deny_cidrs),
            ("allow-host", self.allow_hosts),
            ("deny-host", self.deny_hosts),
        ):
            if values:
                parts.append(f"{label}={','.join(str(v) for v in values)}")
        return " ".join(parts)
