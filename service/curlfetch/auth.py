"""Bearer tokens (RFC 6750): loading, hashing, and checking a request's ``Authorization``.

Each token belongs to one client (a client may have several, for rotation). Only the
sha256 digest of a token is kept in memory, and an operator may store only digests
(``client:sha256:<hex>``) so that the tokens file holds no secret. A presented token is
hashed and compared with *every* known digest with ``hmac.compare_digest``, without an
early exit, so the time taken says nothing about which digest (or how much of one)
matched. Tokens are high-entropy secrets, so an unsalted sha256 is enough: there is no
dictionary to attack (which is also why short tokens are refused).

Sources, merged (a token may appear only once across them):

- ``--tokens-file PATH``: one ``client_id:token`` or ``client_id:sha256:<64 hex>`` per
  line; ``#`` starts a comment line; blank lines are ignored. A line
  ``client_id:whsec_<base64>`` is not a token but that client's webhook signing secret
  (Standard Webhooks).
- ``CURLFETCH_TOKENS``: the same entries, comma-separated (only in the environment: a
  secret on the command line is visible to every local user in ``ps``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

import attrs

REALM = "curlfetch"
MIN_TOKEN_LENGTH = 16
"""Plain tokens shorter than this are refused: they could be guessed."""

_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}\Z")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+) *\Z")


class TokenError(ValueError):
    """A tokens file or variable that cannot be used; the message never shows a token."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


@attrs.frozen
class TokenSet:
    """Known token digests and their clients. Empty: authentication is off (every
    request is the anonymous client ``""``)."""

    entries: tuple[tuple[bytes, str], ...] = ()
    webhook_secrets: Mapping[str, str] = attrs.field(factory=dict)
    """Per-client webhook signing secrets (``whsec_...``) given with the tokens."""

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(client for _, client in self.entries)

    def client_for(self, token: str) -> str | None:
        """The client whose token this is, or None; constant time in the token."""
        presented = digest(token)
        found: str | None = None
        for known, client in self.entries:
            # Every digest is compared, even after a match.
            if hmac.compare_digest(presented, known):
                found = client
        return found

    @classmethod
    def parse(cls, entries: Iterable[tuple[str, str]]) -> TokenSet:
        """From ``(where, "client:token")`` pairs; ``where`` names the source in errors
        (``tokens.txt line 3``)."""
        seen: dict[bytes, str] = {}
        out: list[tuple[bytes, str]] = []
        webhook: dict[str, str] = {}
        for where, entry in entries:
            client, sep, secret = entry.strip().partition(":")
            if not sep:
                raise TokenError(f"{where}: expected client_id:token")
            if not _CLIENT_ID.match(client):
                raise TokenError(
                    f"{where}: the client id must be 1 to 64 of A-Z a-z 0-9 . _ - "
                    "(starting with a letter or digit)"
                )
            if secret.startswith(WEBHOOK_SECRET_PREFIX):
                if not _webhook_secret_ok(secret):
                    raise TokenError(
                        f"{where}: a webhook secret is whsec_ and the base64 of 24 to 64 bytes"
                    )
                if client in webhook:
                    raise TokenError(f"{where}: a second webhook secret for {client}")
                webhook[client] = secret
                continue
            scheme, sep, hexdigest = secret.partition(":")
            if sep and scheme == "sha256":
                if not _HEX_DIGEST.match(hexdigest):
                    raise TokenError(f"{where}: sha256: must be followed by 64 hex digits")
                value = bytes.fromhex(hexdigest)
            else:
                if not secret:
                    raise TokenError(f"{where}: the token is empty")
                if not _B64TOKEN.match(secret):
                    raise TokenError(
                        f"{where}: a token may only hold A-Z a-z 0-9 - . _ ~ + / "
                        "(and trailing =), as RFC 6750 bearer tokens do"
                    )
                if len(secret) < MIN_TOKEN_LENGTH:
                    raise TokenError(
                        f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters "
                        "(make one with: python3 -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))')"
                    )
                value = digest(secret)
            if value in seen:
                raise TokenError(f"{where}: the same token is already given at {seen[value]}")
            seen[value] = where
            out.append((value, client))
        return cls(tuple(out), webhook)


WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix


def _webhook_secret_ok(secret: str) -> bool:
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except ValueError:
        return False
    return 24 <= len(key) <= 64


def read_tokens_file(path: str) -> list[tuple[str, str]]:
    """``(where, entry)`` pairs from a tokens file (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read {path}: {e}") from None
    return [
        (f"{path} line {number}", line.strip())
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def tokens_from_variable(name: str, value: str) -> list[tuple[str, str]]:
    """``(where, entry)`` pairs from a comma-separated variable."""
    return [
        (f"{name} entry {number}", entry.strip())
        for number, entry in enumerate(value.split(","), 1)
        if entry.strip()
    ]


def load_tokens(path: str | None, environ: Mapping[str, str], variable: str) -> TokenSet:
    """Tokens from the file at ``path`` (if given) and ``environ[variable]`` (if set)."""
    entries: list[tuple[str, str]] = []
    if path:
        entries += read_tokens_file(path)
    raw = environ.get(variable)
    if raw:
        entries += tokens_from_variable(variable, raw)
    return TokenSet.parse(entries)


# -- the Authorization header ----------------------------------------------------------------


@attrs.frozen
class AuthFailure:
    """Why a request is not authenticated: the status, the API error code, a message, and
    the ``WWW-Authenticate`` challenge to send."""

    status: int
    code: str
    message: str
    challenge: str


def _challenge(error: str | None = None) -> str:
    challenge = f'Bearer realm="{REALM}"'
    return challenge if error is None else f'{challenge}, error="{error}"'


MISSING = AuthFailure(
    401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)", _challenge()
)
INVALID = AuthFailure(
    401, "invalid_token", "the bearer token is not valid", _challenge("invalid_token")
)
MALFORMED = AuthFailure(
    400,
    "invalid_request",
    "malformed Authorization header: send exactly one 'Authorization: Bearer <token>'",
    _challenge("invalid_request"),
)


def authenticate(tokens: TokenSet, values: list[bytes] | None) -> str | AuthFailure:
    """The client named by the ``Authorization`` header values, or why not.

    Per RFC 6750 section 3.1: no header, or another scheme (Basic), is a plain 401 without
    an error code; a token that is not known is 401 ``invalid_token``; a malformed bearer
    header, or more than one ``Authorization`` header, is 400 ``invalid_request``.
    """
    if not values:
        return MISSING
    if len(values) > 1:
        return MALFORMED
    raw = values[0].decode("latin-1").strip()
    scheme = raw.split(" ", 1)[0]
    if scheme.lower() != "bearer":
        return MISSING
    match = _BEARER.match(raw)
    if match is None or not _B64TOKEN.match(match[1]):
        return MALFORMED
    client = tokens.client_for(match[1])
    return INVALID if client is None else client
