"""``curlfetch.auth`` and ``curlfetch.quotas`` as pure functions: loading tokens (file and
environment), what is kept in memory, the constant-time lookup, the ``Authorization``
header per RFC 6750, and the per-client token bucket on a ``Clock``."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from curlfetch import auth
from curlfetch.auth import INVALID, MALFORMED, MISSING, TokenError, TokenSet, authenticate
from curlfetch.quotas import ClientQuotas, RateLimiter, retry_after

ALICE = "alice-secret-token-0123"
BOB = "bob-secret-token-456789"


def tokens(*entries: str) -> TokenSet:
    return TokenSet.parse((f"entry {i}", e) for i, e in enumerate(entries, 1))


# -- loading -------------------------------------------------------------------------------


def test_tokens_file_with_comments_blank_lines_and_hashes(tmp_path: Path) -> None:
    """A tokens file holds ``client:token`` and ``client:sha256:<hex>`` lines; comments
    and blank lines are skipped; both forms authenticate their client."""
    path = tmp_path / "tokens"
    carol_hex = hashlib.sha256(b"carol-secret-token-999").hexdigest()
    path.write_text(
        f"# curlfetch clients\n\nalice:{ALICE}\n   \n  # indented comment\n"
        f"carol:sha256:{carol_hex.upper()}\n"
    )
    loaded = auth.load_tokens(str(path), {}, "CURLFETCH_TOKENS")
    assert loaded.clients == {"alice", "carol"}
    assert loaded.client_for(ALICE) == "alice"
    assert loaded.client_for("carol-secret-token-999") == "carol"
    assert loaded.client_for(BOB) is None


def test_environment_tokens_merge_with_the_file(tmp_path: Path) -> None:
    """``CURLFETCH_TOKENS`` adds comma-separated entries to the file's; a client may have
    several tokens (rotation)."""
    path = tmp_path / "tokens"
    path.write_text(f"alice:{ALICE}\n")
    loaded = auth.load_tokens(
        str(path),
        {"CURLFETCH_TOKENS": f" bob:{BOB} ,, alice:alice-second-token-42 "},
        "CURLFETCH_TOKENS",
    )
    assert loaded.client_for(BOB) == "bob"
    assert loaded.client_for(ALICE) == "alice"
    assert loaded.client_for("alice-second-token-42") == "alice"
    assert not auth.load_tokens(None, {}, "CURLFETCH_TOKENS")  # none: auth is off


def test_only_digests_are_kept() -> None:
    """The loaded set holds sha256 digests, never the token text (nor in its repr)."""
    loaded = tokens(f"alice:{ALICE}")
    assert loaded.entries == ((hashlib.sha256(ALICE.encode()).digest(), "alice"),)
    assert ALICE not in repr(loaded)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([f"alice{ALICE}"], "entry 1: expected client_id:token"),
        (["alice:"], "entry 1: the token is empty"),
        ([f":{ALICE}"], "entry 1: the client id must be"),
        ([f"al ice:{ALICE}"], "entry 1: the client id must be"),
        ([f"-alice:{ALICE}"], "entry 1: the client id must be"),
        ([f"{'a' * 65}:{ALICE}"], "entry 1: the client id must be"),
        (["alice:tiny-token"], "entry 1: the token is shorter than 16"),
        (["alice:token with spaces in it"], "entry 1: a token may only hold"),
        (["alice:tökentökentökentöken"], "entry 1: a token may only hold"),
        (["alice:sha256:abc"], "entry 1: sha256: must be followed by 64 hex digits"),
        ([f"alice:{ALICE}", f"bob:{ALICE}"], "entry 2: the same token is already given at entry 1"),
        (
            [f"alice:{ALICE}", f"alice:sha256:{hashlib.sha256(ALICE.encode()).hexdigest()}"],
            "entry 2: the same token is already given",
        ),
    ],
)
def test_unusable_entries_are_refused_without_showing_the_token(
    entries: list[str], message: str
) -> None:
    """Every unusable entry is a TokenError naming where it is; the token never appears
    in the message (it ends up in logs and terminals)."""
    with pytest.raises(TokenError) as raised:
        tokens(*entries)
    text = str(raised.value)
    assert text.startswith(message), text
    for entry in entries:
        secret = entry.partition(":")[2]
        assert len(secret) < 4 or secret not in text, text


def test_unreadable_file_is_a_token_error(tmp_path: Path) -> None:
    """A missing file is a TokenError naming it."""
    with pytest.raises(TokenError, match="cannot read"):
        auth.load_tokens(str(tmp_path / "missing"), {}, "CURLFETCH_TOKENS")


# -- the lookup ----------------------------------------------------------------------------


@pytest.mark.parametrize("presented", [ALICE, "carol-secret-token-999", "nobody-token-0000000"])
def test_lookup_compares_every_digest_in_constant_time(
    presented: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the token matches the first entry, the last or none, every known digest
    is compared with hmac.compare_digest (no early exit), always against the sha256 of
    the presented token."""
    known = tokens(f"alice:{ALICE}", f"bob:{BOB}", "carol:carol-secret-token-999")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    known.client_for(presented)
    assert len(calls) == 3
    assert {a for a, _ in calls} == {hashlib.sha256(presented.encode()).digest()}
    assert [b for _, b in calls] == [digest for digest, _ in known.entries]


# -- the Authorization header --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, MISSING),
        ([], MISSING),
        ([b"Basic YWxpY2U6c2VjcmV0"], MISSING),  # another scheme: as if none (RFC 6750 3.1)
        ([b"Bearer"], MALFORMED),
        ([b"Bearer "], MALFORMED),
        ([b"Bearer a b"], MALFORMED),
        ([b"Bearer t\xf6ken"], MALFORMED),
        ([b"Bearer " + ALICE.encode(), b"Bearer " + ALICE.encode()], MALFORMED),
        ([b"Bearer unknown-token-0123456789"], INVALID),
        ([b"Bearer " + ALICE.encode()], "alice"),
        ([b"bearer  " + ALICE.encode() + b" "], "alice"),
        ([b"BEARER " + BOB.encode()], "bob"),
    ],
)
def test_authorization_header(values: list[bytes] | None, expected: object) -> None:
    """No header or another scheme: 401 without an error code; an unknown token: 401
    ``invalid_token``; a malformed bearer header or two headers: 400 ``invalid_request``;
    a known token (scheme case-insensitive): its client."""
    assert authenticate(tokens(f"alice:{ALICE}", f"bob:{BOB}"), values) == expected


def test_challenges_follow_rfc_6750() -> None:
    """The challenges: a bare ``Bearer realm``, plus ``error=`` for invalid or malformed."""
    assert (MISSING.status, MISSING.code) == (401, "unauthorized")
    assert MISSING.challenge == 'Bearer realm="curlfetch"'
    assert (INVALID.status, INVALID.code) == (401, "invalid_token")
    assert INVALID.challenge == 'Bearer realm="curlfetch", error="invalid_token"'
    assert (MALFORMED.status, MALFORMED.code) == (400, "invalid_request")
    assert MALFORMED.challenge == 'Bearer realm="curlfetch", error="invalid_request"'


# -- the rate limiter ----------------------------------------------------------------------


def test_token_bucket_on_a_clock() -> None:
    """2 jobs/s with a burst of 3: three at once pass, the fourth must wait 0.5 s; each
    client has its own bucket; time refills up to the burst, never beyond."""
    clock = Clock()
    limiter = RateLimiter(clock, rate=2.0, burst=3.0)
    for _ in range(3):
        assert limiter.delay("alice", 1) == 0
        limiter.take("alice", 1)
    assert limiter.delay("alice", 1) == pytest.approx(0.5)
    assert limiter.delay("bob", 3) == 0  # bob is not slowed by alice
    clock.advance(0.5)
    assert limiter.delay("alice", 1) == 0
    assert limiter.delay("alice", 2) == pytest.approx(0.5)
    clock.advance(3600)
    assert limiter.delay("alice", 3) == 0
    assert limiter.delay("alice", 4) == 0  # asks for the burst at most: see below
    limiter.take("alice", 3)
    assert limiter.delay("alice", 1) == pytest.approx(0.5)


def test_a_batch_larger_than_the_burst_passes_a_full_bucket_and_is_paid_back() -> None:
    """A batch of 5 with a burst of 3 passes a full bucket (it would otherwise never
    pass), leaving a debt: the next job waits until the debt and one job are refilled."""
    clock = Clock()
    limiter = RateLimiter(clock, rate=2.0, burst=3.0)
    assert limiter.delay("alice", 5) == 0
    limiter.take("alice", 5)
    assert limiter.delay("alice", 1) == pytest.approx(1.5)  # from -2 to 1 at 2/s
    clock.advance(1.5)
    assert limiter.delay("alice", 1) == 0


def test_no_rate_means_no_limit() -> None:
    """rate 0: never a delay."""
    limiter = RateLimiter(Clock(), rate=0.0, burst=1.0)
    limiter.take("alice", 10**6)
    assert limiter.delay("alice", 10**6) == 0


def test_bucket_size_and_retry_after() -> None:
    """The default burst is one second's worth (at least 1); Retry-After is whole seconds,
    rounded up, at least 1."""
    assert ClientQuotas(rate=2.5).bucket_size == 3
    assert ClientQuotas(rate=0.1).bucket_size == 1
    assert ClientQuotas(rate=2.5, burst=10).bucket_size == 10
    assert [retry_after(s) for s in (0.0, 0.2, 1.0, 1.01, 7.5)] == ["1", "1", "1", "2", "8"]
