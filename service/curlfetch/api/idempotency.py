"""``Idempotency-Key`` (IETF draft-ietf-httpapi-idempotency-key-header, Stripe's
semantics), as any route that creates something uses it: the header, a shielded
reservation in the store, a background release, and the 409/422 answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from ..store import IdempotencyInProgressError, IdempotencyMismatchError, JobStore, StoredResponse
from .http import ApiError, send_stored, shielded
from .routes import Param

log = Logger()

IDEMPOTENCY_HEADER = "Idempotency-Key"
IN_PROGRESS_RETRY_AFTER = 1
"""Retry-After (seconds) of a 409 for a key whose first request is still being accepted:
that normally takes milliseconds (a reservation left by a crashed process takes up to
``IDEMPOTENCY_ABANDONED_AFTER``)."""


IDEMPOTENCY_KEY = Param(
    IDEMPOTENCY_HEADER,
    {"type": "string", "minLength": 1, "maxLength": 255},
    str,
    f"{IDEMPOTENCY_HEADER} must be one header of 1 to 255 visible ASCII characters",
    where="header",
    pattern="[!-~]{1,255}",
    description="Any unique value (a UUID), compared verbatim; remembered for 24 hours.",
)
"""The ``Idempotency-Key`` header, taken verbatim (a structured-field string keeps its
quotes): 1-255 visible ASCII characters, at most one header; else 400."""


def idempotency_key(request: IRequest) -> str | None:
    return IDEMPOTENCY_KEY.get(request)


async def reserve(
    store: JobStore, clock: IReactorTime, client: str, key: str, fingerprint: str
) -> StoredResponse | None:
    """``reserve_key``, shielded: if the client hangs up meanwhile, a reservation
    made anyway is released once it is made, so it cannot block the key."""
    hung_up = False

    def settle(stored: StoredResponse | None) -> StoredResponse | None:
        if hung_up and stored is None:
            release(store, client, key)
        return stored

    d = store.reserve_key(client, key, fingerprint, clock.seconds())
    try:
        return await shielded(d.addCallback(settle))
    except CancelledError:
        hung_up = True
        raise


def release(store: JobStore, client: str, key: str) -> None:
    """Release a reservation in the background (the response does not wait)."""

    def failed(failure: Failure) -> None:
        log.warn(
            "could not release an Idempotency-Key of {client!r}: {error}",
            client=client,
            error=failure.getErrorMessage(),
        )

    store.release_key(client, key).addErrback(failed)


async def idempotently(
    store: JobStore,
    clock: IReactorTime,
    request: IRequest,
    *,
    client: str,
    key: str | None,
    fingerprint: Callable[[], str],
    accept: Callable[[str | None], Awaitable[bytes]],
) -> bytes:
    """A submission under an optional key: without one, ``accept(None)``. With one,
    only a request that passed validation reserves it (scoped to the client); the same
    key and body replay the 201 as first sent, another body is 422, a repeat while the
    first is still being accepted is 409. A refusal (429, 503, an error) releases the
    key: only a 201 is recorded, in the transaction that stores what it created."""
    if key is None:
        return await accept(None)
    try:
        stored = await reserve(store, clock, client, key, fingerprint())
        if stored is not None:
            return send_stored(request, stored, replayed=True)
        try:
            return await accept(key)
        except BaseException:
            # Queued after the add: a no-op if it committed (the key is recorded).
            release(store, client, key)
            raise
    except (IdempotencyMismatchError, IdempotencyInProgressError) as e:
        raise key_refused(e) from None


def key_refused(error: IdempotencyMismatchError | IdempotencyInProgressError) -> ApiError:
    """The answer to a key used with another body (422) or still in progress (409)."""
    if isinstance(error, IdempotencyMismatchError):
        return ApiError(
            422,
            "idempotency_key_reused",
            f"this {IDEMPOTENCY_HEADER} was used with another request body; "
            "use a new key for a new request",
            field=IDEMPOTENCY_HEADER,
        )
    return ApiError(
        409,
        "idempotency_key_in_progress",
        f"a request with this {IDEMPOTENCY_HEADER} is still being accepted; "
        "retry it later to get its response",
        field=IDEMPOTENCY_HEADER,
        headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER)},
    )
