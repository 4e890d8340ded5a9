"""JobSpec validation of what reaches libcurl: URLs that the service and libcurl must read
alike, credentials in URLs, and header values and names libcurl would send as given."""

from __future__ import annotations

import pytest

from curlfetch.jobs import SPEC, JobSpec, Limits, SpecError

LIMITS = Limits()


def refused(raw: dict[str, object]) -> SpecError:
    with pytest.raises(SpecError) as info:
        JobSpec.from_json(raw, LIMITS)
    return info.value


@pytest.mark.parametrize(
    "url",
    [
        "http://example.test/",
        "https://Example.TEST:8443/a/b?q=%0d%0a#frag",
        "http://127.0.0.1:80/",
        "http://[::1]:8080/x",
        "http://[::ffff:127.0.0.1]:8/",
        "HTTP://host./",
        "http://host:/",
    ],
)
def test_urls_both_parsers_read_alike_are_accepted(url: str) -> None:
    """A URL whose host and port urlsplit and libcurl (CurlUrl) read alike is accepted
    and kept exactly as submitted (the job fetches the real URL)."""
    assert JobSpec.from_json({"url": url}, LIMITS).url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://exa\u0000mple.com/", "control characters"),
        ("http://exa%00mple.com/", "percent-encoded"),
        ("http://%31%32%37.0.0.1/", "percent-encoded"),
        ("http://[fe80::1%25eth0]/", "zone id"),
        ("http://exämple.com/", "ASCII"),
        ("http://example.com/pä", "ASCII"),
        ("http://0x7f.1/", "libcurl reads its host as 127.0.0.1"),
        ("http://2130706433/", "libcurl reads its host as 127.0.0.1"),
        ("http://127.1:81/", "libcurl reads its host as 127.0.0.1:81"),
        ("http://host;x/", "libcurl cannot parse it"),
        ("http://[::1/", "not a valid URL"),
        ("http://h:99999/", "not a valid URL"),
        ("http:/x", "has no host"),
        ("http://h:0/", "port 0"),
        ("gopher://h/", "scheme"),
    ],
)
def test_urls_libcurl_would_read_otherwise_are_refused(url: str, message: str) -> None:
    """NUL (raw or %00) in the host, percent-encoded hosts, zone ids, non-ASCII, and any
    host or port libcurl reads differently from urlsplit (alternative IPv4 notations)
    are 400 on ``url``: what the service decides about a URL is about what is fetched."""
    error = refused({"url": url})
    assert error.field == "url"
    assert message in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@127.0.0.1/",
        "http://token@example.test/",
        "http://@example.test/",
        "http://a@b@c/",
        "https://127.0.0.1:80;@evil.test/",
        "http://127.0.0.1\\@evil.test/",
    ],
)
def test_userinfo_in_urls_is_refused(url: str) -> None:
    """Credentials in a URL are refused (send an Authorization header instead): they
    would show in job views and listings, and "user@host" is where URL parsers disagree.
    The message never echoes them."""
    error = refused({"url": url})
    assert error.field == "url"
    assert "Authorization header" in error.message
    assert "secret" not in error.message
    assert "token" not in error.message


@pytest.mark.parametrize(
    "name", ["Content-Length", "transfer-encoding", "Connection", "Upgrade", "TE", "Trailer"]
)
def test_framing_and_hop_by_hop_headers_are_refused(name: str) -> None:
    """Message framing and connection headers are libcurl's: a job's ``Content-Length: 0``
    with a body would smuggle a second request onto a connection another job reuses."""
    error = refused({"url": "http://h/", "method": "POST", "body": "x", "headers": [[name, "0"]]})
    assert error.field == "headers[0]"


@pytest.mark.parametrize("value", ["a\x0bb", "a\x7fb", "caf\u00e9", "a\x1bb"])
def test_header_values_must_be_visible_ascii(value: str) -> None:
    """Control characters other than HTAB and non-ASCII are refused on the pair: pycurl
    cannot send non-ASCII str, and other controls are no field value."""
    error = refused({"url": "http://h/", "headers": [["X-Ok", "fine"], ["X-A", value]]})
    assert error.field == "headers[1]"


def test_tabs_and_empty_values_are_fine() -> None:
    """HTAB and SP are valid inside a field value; an empty value is allowed."""
    spec = JobSpec.from_json(
        {"url": "http://h/", "headers": [["X-A", "a\tb c"], ["X-B", ""]]}, LIMITS
    )
    assert spec.headers == (("X-A", "a\tb c"), ("X-B", ""))


def test_the_schema_and_the_validator_are_one_declaration() -> None:
    """``SPEC`` gives both: the JobSpec schema lists exactly the keys the validator takes,
    with the bounds of the limits it validates with (a field the schema allows at its
    bound is accepted; past it, refused, naming the field)."""
    limits = Limits(max_timeout=50.0, max_redirects=3)
    schema = SPEC.schema(limits)
    assert set(schema["properties"]) == SPEC.names
    assert schema["required"] == ["url"]
    timeout = schema["properties"]["timeout"]
    assert (timeout["exclusiveMinimum"], timeout["maximum"]) == (0, 50.0)
    assert schema["properties"]["max_redirects"]["maximum"] == 3
    assert JobSpec.from_json({"url": "http://h/", "timeout": 50}, limits).timeout == 50.0
    for name, value in (("timeout", 50.5), ("max_redirects", 4), ("bogus", 1)):
        with pytest.raises(SpecError) as info:
            JobSpec.from_json({"url": "http://h/", name: value}, limits)
        assert info.value.field == name
    request = SPEC.view(limits)
    assert set(JobSpec.from_json({"url": "http://h/"}, limits).to_json()) == set(
        request["required"]
    )
