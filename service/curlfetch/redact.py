"""Redaction of secrets in what the service logs (never in what it stores).

A job record keeps its real URL and headers: the job has to fetch with them, and its
owner may read them back. Logs are another matter: they go to collectors, tickets and
screens, so ``Authorization``, ``Cookie`` and credentials in URLs must never reach them
(libcurl-security.md, "Showing What You Do"). Three layers, from precise to blunt:

- ``redact_url`` and ``redact_headers`` for values known to be a URL or header pairs;
- ``redact_event`` applies them to the log event keys that hold such values (``url``,
  ``headers``...) and ``redact_text`` to every other string in the event;
- ``redact_text`` scrubs free text (a rendered message, a traceback, a whole JSON log
  line): userinfo in URLs, secret-looking query parameters, ``Authorization:``/``Cookie:``
  values and ``Bearer``/``Basic`` credentials. Its patterns never cross a quote or a
  backslash, so scrubbing a JSON line keeps it valid JSON.

Which query parameters are secret is a guess from the name: any name containing token,
passw, pwd, secret, key, sig, auth, credential or session (``access_token``, ``api_key``,
``X-Amz-Signature``, ``sig``, ``password``). The guess errs towards redacting
(``?monkey=1`` loses its value too): an over-redacted log line costs nothing, a leaked
token does. A URL's user name is kept when a password follows it (``user:***@``) and
redacted when it stands alone (``***@``), because a lone user name is often a token
(``https://TOKEN@host/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
"""Always redacted; so is any header whose name looks secret (``X-Api-Key``)."""

URL_KEYS = frozenset({"url", "effective_url", "location", "uri", "referer", "referrer"})
"""Log event keys whose string value is a URL."""
HEADER_KEYS = frozenset({"headers", "request_headers", "response_headers"})
"""Log event keys whose value is a sequence of (name, value) pairs."""

_SECRET_NAME = re.compile(r"token|passw|pwd|secret|key|sig|auth|credential|session", re.I)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_STOP = r"\s\"'\\<>"
"""Free-text patterns stop at whitespace, quotes, backslashes and angle brackets."""
_TEXT_USERINFO = re.compile(rf"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@{_STOP}]*)@")
_TEXT_PARAM = re.compile(rf"([?&;#][^=&#;{_STOP}]*=)([^&#;{_STOP}]*)")
_TEXT_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|(?:set-)?cookie)"
    r"((?:['\"]?[ \t]*[:=]|['\"][ \t]*,)[ \t]*['\"]?)"
    r"([^'\"\\\r\n]+)",
    re.I,
)
_TEXT_CREDENTIAL = re.compile(
    r"\b(bearer([ \t]+)[A-Za-z0-9._~+/=-]+|basic([ \t]+)[A-Za-z0-9+/=]{8,})", re.I
)


def is_secret_header(name: str) -> bool:
    """True for Authorization, Proxy-Authorization, Cookie, Set-Cookie and any header
    whose name looks like it carries a secret."""
    lowered = name.lower()
    return lowered in SECRET_HEADERS or _SECRET_NAME.search(lowered) is not None


def redact_url(url: str) -> str:
    """``url`` with its userinfo password (or lone user name) and secret-looking query
    and fragment parameter values replaced by ``***``; otherwise unchanged, character
    for character (it is not re-normalized, so it still matches what was submitted)."""
    if not isinstance(url, str):
        return url
    start = 0
    scheme = _SCHEME.match(url)
    if scheme is not None:
        start = scheme.end()
        end = len(url)
        for stop in "/?#":
            found = url.find(stop, start)
            if found != -1:
                end = min(end, found)
        authority = url[start:end]
        at = authority.rfind("@")
        if at != -1:
            userinfo = authority[:at]
            user, colon, _ = userinfo.partition(":")
            safe = f"{user}:{REDACTED}" if colon else REDACTED
            url = url[:start] + safe + url[start + at :]
            start += len(safe) + 1
    query = url.find("?", start)
    fragment = url.find("#", start)
    if query == -1 and fragment == -1:
        return url
    cut = min(i for i in (query, fragment) if i != -1)
    return url[:cut] + _redact_params(url[cut:])


def _redact_params(tail: str) -> str:
    """``?a=1&token=x#k=v`` with secret-looking values redacted."""
    out: list[str] = []
    for piece in re.split(r"([?&;#])", tail):
        name, eq, _ = piece.partition("=")
        out.append(f"{name}={REDACTED}" if eq and _SECRET_NAME.search(name) else piece)
    return "".join(out)


def redact_headers(pairs: Iterable[tuple[Any, Any]] | Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """(name, value) pairs with the values of secret headers replaced by ``***``.
    Names and values may be str or bytes (Twisted's raw headers)."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out: list[tuple[Any, Any]] = []
    for pair in items:
        name, value = pair
        text = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if is_secret_header(text):
            value = REDACTED.encode() if isinstance(value, bytes) else REDACTED
        out.append((name, value))
    return out


def redact_text(text: str) -> str:
    """Free text with every secret it visibly carries replaced by ``***``."""
    if not isinstance(text, str):
        return text
    text = _TEXT_USERINFO.sub(_userinfo, text)
    text = _TEXT_PARAM.sub(_param, text)
    text = _TEXT_HEADER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    return _TEXT_CREDENTIAL.sub(_credential, text)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match[2].partition(":")
    return f"{match[1]}{user}:{REDACTED}@" if colon else f"{match[1]}{REDACTED}@"


def _credential(match: re.Match[str]) -> str:
    scheme = match[1].split(None, 1)[0]
    return f"{scheme}{match[2] or match[3]}{REDACTED}"


def _param(match: re.Match[str]) -> str:
    return f"{match[1]}{REDACTED}" if _SECRET_NAME.search(match[1][1:-1]) else match[0]


def redact_value(key: str, value: object) -> object:
    """One log event field, redacted by what its key says it is."""
    if key in URL_KEYS and isinstance(value, str):
        return redact_text(redact_url(value))
    if key in HEADER_KEYS and isinstance(value, list | tuple | Mapping):
        try:
            return redact_headers(value)
        except (TypeError, ValueError):
            return REDACTED  # not pairs after all: say nothing rather than leak
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
        return type(value)(redact_text(v) for v in value)  # legacy log.msg's "message"
    return value


def redact_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a log event fit to write out. The format string (``log_format``) and
    Twisted's other ``log_*`` bookkeeping are kept; every other field is redacted, and
    so is ``log_text`` (the text of a legacy ``log.msg`` event, such as an access log
    line)."""
    return {
        key: value if key.startswith("log_") and key != "log_text" else redact_value(key, value)
        for key, value in event.items()
    }
