"""``Idempotency-Key`` for any route that creates something: :func:`idempotent` wraps its answer.

The HTTP side of ``aimichat.idempotency`` (here, since only ``api/`` builds Starlette responses): it reads
the header and the raw body, writes a kept answer back as HTTP, and tells the attempt what the route
answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from aimichat.api.errors import APIError
from aimichat.api.responses import api_error_response
from aimichat.idempotency.records import Stored
from aimichat.idempotency.retries import MAX_KEY_LENGTH, Attempt, Retries, check_key, sse_complete

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"  # "true" on an answer replayed from a kept one (Stripe's name)
# Answers a retry may get another outcome for, so never kept: a timeout, a conflict, too early, a rate
# limit (a retry after its window may pass), a caller that hung up (nginx's 499); and every 5xx.
RETRYABLE = frozenset({408, 409, 425, 429, 499})
_NOT_REPLAYED = frozenset({"content-length", "x-request-id", "date", "server", "set-cookie"})

Answer = Callable[[], Awaitable[Response]]
Kept = Callable[[bytes], bytes]  # what of a whole (not streamed) answer's body is stored for the retries

# The header in a route's OpenAPI document: ``@router.post(..., openapi_extra=OPENAPI)``.
OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
            "description": "Send a request again with the same key (and the same body) and get the first "
            "answer, charged once (`Idempotent-Replayed: true`; kept 24 hours by default). Another body: 422 "
            "`idempotency_key_reused`; the first still running: the retry waits for it, then 409 "
            "`idempotency_key_in_progress`. See docs/idempotency.md.",
        }
    ]
}


async def idempotent(request: Request, owner: str, answer: Answer, kept: Kept | None = None) -> Response:
    """Answer ``request`` with ``answer()``, at most once per ``Idempotency-Key`` of ``owner``.

    The interface, for any route (call it after authentication and body validation)::

        return await idempotent(request, account_owner(principal.account_id), answer)

    - no ``Idempotency-Key`` header: ``answer()``, untouched;
    - a bad one (empty, over 255 characters, two different ones): 400 ``invalid_idempotency_key``;
    - a new key: ``answer()`` runs once; its answer is kept for ``AIMICHAT_IDEMPOTENCY_TTL`` when it is a
      2xx or 4xx outside :data:`RETRYABLE` (an :class:`APIError` raised by ``answer`` counts as its
      answer); a stream of server-sent events is kept as it ends, if it ends whole (``[DONE]``, no error
      event). Anything else (a 5xx, another exception, a caller that hung up) releases the key;
    - a key already answered: that answer (status, body, headers but ``content-length``, ``date``,
      ``x-request-id``…), with ``Idempotent-Replayed: true``, without calling ``answer``;
    - the same key with another body, or on another path: 422 ``idempotency_key_reused``;
    - a key whose first request still runs (here or on another replica): waits for it, then its answer,
      or a run of its own if it failed; 409 ``idempotency_key_in_progress`` after ``AIMICHAT_IDEMPOTENCY_WAIT``.

    ``owner`` scopes the keys: ``retries.account_owner(account_id)`` for an account's API keys; the admin
    API passes ``"admin_key:<id>"``. ``kept`` turns a whole answer's body into what is stored and replayed
    (the admin API's key creation drops the secret: no secret is kept at rest); by default the body as sent.

    ``answer`` must have committed what it changed before it returns: the answer is kept as soon as it
    does, and a retry must never be told of a change that was then rolled back.
    """
    key = check_key(request.headers.getlist(HEADER))
    if key is None:
        return await answer()
    retries: Retries = request.app.state.retries
    claimed = await retries.begin(owner, key, f"{request.method} {request.url.path}", await request.body())
    if isinstance(claimed, Stored):
        return replay(claimed)
    try:
        response = await answer()
    except APIError as exc:
        await finish(claimed, api_error_response(exc), kept)
        raise
    except BaseException:
        await claimed.release()
        raise
    return await finish(claimed, response, kept)


def replay(stored: Stored) -> Response:
    """A kept answer, as first sent (a stream's events arrive at once)."""
    return Response(stored.body, status_code=stored.status, headers={**stored.headers, REPLAYED: "true"})


async def finish(attempt: Attempt, response: Response, kept: Kept | None = None) -> Response:
    """Keep ``response`` for the retries if it is to be kept (a stream: as it ends), else release the key;
    a whole body is kept as ``kept`` makes it."""
    if response.status_code >= 500 or response.status_code in RETRYABLE:
        await attempt.release()
        return response
    headers = replayable(response.headers)
    if isinstance(response, StreamingResponse):
        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        response.body_iterator = attempt.recorded(
            _as_bytes(response.body_iterator, response.charset),
            response.status_code,
            headers,
            complete=sse_complete if sse else _whole,
        )
        return response
    body = bytes(response.body)
    await attempt.keep(Stored(response.status_code, headers, kept(body) if kept else body))
    return response


def replayable(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a replay repeats: all but those that describe this one sending."""
    return {name: value for name, value in headers.items() if name.lower() not in _NOT_REPLAYED}


async def _as_bytes(chunks: AsyncIterable[str | bytes | memoryview], charset: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk.encode(charset) if isinstance(chunk, str) else bytes(chunk)
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _whole(events: Sequence[bytes]) -> bool:
    """Any other stream is whole when it ends."""
    return True
