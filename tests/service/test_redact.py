"""Log redaction (curlfetch.redact): URLs, header pairs, free text, whole log events and
the JSON log line, which must stay valid JSON."""

from __future__ import annotations

import json

import pytest
from twisted.logger import LogLevel, eventFromJSON
from twisted.python.failure import Failure

from curlfetch.jobs import JobSpec, Limits
from curlfetch.logs import json_line
from curlfetch.redact import (
    redact_event,
    redact_headers,
    redact_text,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:secret@h:1/p", "http://user:***@h:1/p"),
        ("https://TOKEN@github.test/x", "https://***@github.test/x"),
        ("http://:pw@h/", "http://:***@h/"),
        ("http://a@b@h/", "http://***@h/"),
        ("http://h/p?a=1&access_token=xyz&b=2", "http://h/p?a=1&access_token=***&b=2"),
        ("http://h/?api_key=k;sig=s#password=p", "http://h/?api_key=***;sig=***#password=***"),
        (
            "http://h/?X-Amz-Signature=abc&X-Amz-Date=1",
            "http://h/?X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("http://h/p?q=token", "http://h/p?q=token"),
        ("http://h/user:pw@x", "http://h/user:pw@x"),
        ("http://h/", "http://h/"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """The userinfo password (a lone user name too) and secret-looking parameter values
    become ``***``; everything else is kept character for character."""
    assert redact_url(url) == expected


def test_redact_headers() -> None:
    """Authorization, Proxy-Authorization, Cookie, Set-Cookie and secret-looking names
    lose their values, whatever the case, str or bytes; others and the order are kept."""
    pairs = [
        ("Authorization", "Bearer xyz"),
        ("accept", "*/*"),
        ("proxy-authorization", "Basic abc"),
        ("COOKIE", "a=b"),
        (b"Set-Cookie", b"s=1"),
        ("X-Api-Key", "k"),
        ("X-Auth-Token", "t"),
    ]
    assert redact_headers(pairs) == [
        ("Authorization", "***"),
        ("accept", "*/*"),
        ("proxy-authorization", "***"),
        ("COOKIE", "***"),
        (b"Set-Cookie", b"***"),
        ("X-Api-Key", "***"),
        ("X-Auth-Token", "***"),
    ]
    assert redact_headers({"Cookie": "a"}) == [("Cookie", "***")]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("fetching http://user:secret@127.0.0.1:80/x failed", "secret"),
        ("GET /v1/jobs?access_token=secret HTTP/1.1", "secret"),
        ("Authorization: Bearer secret\r\nHost: h", "secret"),
        ("authorization=secret", "secret"),
        ("headers=[('Cookie', 'secret=1'), ('Accept', '*/*')]", "secret"),
        ('{"headers": [["Authorization", "Digest secret"]]}', "secret"),
        ("sent Bearer secret.tok-en to h", "secret"),
        ("sent basic c2VjcmV0OnB3 to h", "c2VjcmV0OnB3"),
    ],
)
def test_redact_text_finds_secrets_in_free_text(text: str, secret: str) -> None:
    """Secrets in rendered messages, tracebacks and access log lines are scrubbed."""
    assert secret not in redact_text(text)


def test_redact_text_leaves_ordinary_text_alone() -> None:
    """Prose that only mentions the words is left as it is."""
    text = "basic auth and cookies: Authorization, Cookie and tokens; job abc failed"
    assert redact_text(text) == text


def test_redact_event_by_key_and_leaves_format_and_bookkeeping() -> None:
    """URL keys go through redact_url, header keys through redact_headers, other strings
    through redact_text; log_format and the log_* bookkeeping are kept; the input event
    is not changed."""
    event = {
        "log_format": "fetch {url} with {headers}",
        "log_level": LogLevel.info,
        "url": "http://u:secret@h/?token=secret",
        "headers": [("Authorization", "Bearer secret"), ("X-A", "1")],
        "note": "cookie=secret",
        "log_text": "Authorization: Bearer secret",
        "count": 3,
    }
    out = redact_event(event)
    assert out["url"] == "http://u:***@h/?token=***"
    assert out["headers"] == [("Authorization", "***"), ("X-A", "1")]
    assert "secret" not in out["note"]
    assert "secret" not in out["log_text"]
    assert out["log_format"] == event["log_format"]
    assert out["log_level"] is LogLevel.info
    assert out["count"] == 3
    assert event["url"] == "http://u:secret@h/?token=secret"


def test_json_log_line_is_redacted_and_still_json() -> None:
    """json_line redacts fields, the rendered message and a failure's traceback (an
    exception message may echo a URL), and the line still reads back as JSON."""
    try:
        raise ValueError("cannot fetch http://user:secret@127.0.0.1/?api_key=secret")
    except ValueError:
        failure = Failure()
    event = {
        "log_format": "job {job_id} to {url} failed; sent {headers}",
        "job_id": "abc",
        "url": "http://user:secret@127.0.0.1/",
        "headers": [["Authorization", "Bearer secret"], ["Cookie", "c=secret"]],
        "log_level": LogLevel.error,
        "log_namespace": "test",
        "log_time": 1_700_000_000.0,
        "log_failure": failure,
    }
    line = json_line(event)
    assert "secret" not in line
    data = json.loads(line)
    assert data["message"].startswith("job abc to http://user:***@127.0.0.1/ failed")
    assert "ValueError" in data["traceback"]
    assert eventFromJSON(line)["job_id"] == "abc"


def test_the_job_record_keeps_the_real_url() -> None:
    """Redaction is for logs only: a job spec keeps its URL and headers as given."""
    spec = JobSpec.from_json(
        {"url": "http://h/?token=t", "headers": [["Authorization", "Bearer xyz"]]}, Limits()
    )
    assert spec.to_json()["url"] == "http://h/?token=t"
    assert spec.to_json()["headers"] == [["Authorization", "Bearer xyz"]]
