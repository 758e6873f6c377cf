"""Chat completions: reserve credits, run the engine, stream or collect, settle exactly once.

:meth:`ChatService.complete` returns a typed result and never an HTTP object; ``api_router`` alone
turns results into HTTP answers:

- :class:`Completion`: the whole answer (``protocol.ChatCompletion``) and where the day's credits stand;
- :class:`CompletionStream`: the answer's server-sent events, ending in ``data: [DONE]``;
- :class:`~aimichat.quota.ledger.Refusal`: the account's credits are spent (the spec's 429);
- :class:`ClientGone`: the caller hung up before a non-streaming answer was complete; nothing is charged.

Anything else that goes wrong is raised as an :class:`~aimichat.api.errors.APIError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
from starlette.concurrency import run_in_threadpool

from aimichat.api.errors import APIError, engine_error
from aimichat.api.metrics import Metrics
from aimichat.engines.base import (
    Delta,
    EngineError,
    Event,
    Finish,
    FinishReason,
    PreparedPrompt,
    SamplingParams,
)
from aimichat.engines.configs import EngineConfig
from aimichat.keys import service as keys
from aimichat.keys.service import Principal
from aimichat.quota import ledger, pricing
from aimichat.quota.backends import QuotaBackend
from aimichat.quota.fairness import Fairness
from aimichat.quota.ledger import RateLimit, Refusal, Reservation
from aimichat.quota.pricing import Price
from aimichat.registry.live import LiveModels, ModelLookupError, Served
from aimichat.store.clock import Clock, iso_utc
from aimichat.store.errors import STORE_UNAVAILABLE

from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkDelta,
    ChunkToolCall,
    TokenLogprob,
    ToolCallOut,
    Usage,
)

log = logging.getLogger(__name__)

HANG_UP_CHECK_SECONDS = 0.25  # how often a non-streaming answer checks that its caller is still there
# Worker threads settlements and releases may hold at once, beside (never behind) the shared pool's 40:
# settled after the answer (issue 14), a settlement would otherwise queue for a thread behind reservations,
# and a reservation on Redis counters may hold its thread waiting for rows still to be settled. 16, not 8:
# while Redis is down each refund holds its thread for its socket timeout, and the backlog must drain fast.
SETTLE_THREADS = 16
# Seconds a reservation waits at most for its account's settlements in flight here: a settlement takes a
# millisecond or two; when the store is failing it can take seconds (a Redis socket timeout, retries), and
# the next request must then fail within its own bounds, not after them (tests/faults).
UNSETTLED_WAIT = 0.25
SETTLE_RETRY_PAUSES = (0.0, 0.1, 0.5)  # seconds before each try to settle: 3 tries when the store is unreachable

ClientGoneCheck = Callable[[], Awaitable[bool]]


Settlement = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Completion:
    body: ChatCompletion
    rate_limit: RateLimit  # after settlement: what the refund gives back is counted as remaining
    # With ``settle_later``: the settlement, to run once the answer has been sent (see ChatService.complete).
    settle: Settlement | None = None


@dataclass(frozen=True)
class CompletionStream:
    events: AsyncIterator[bytes]  # server-sent events; settles when it ends, however it ends
    rate_limit: RateLimit  # with the whole reservation taken: the stream has not been settled yet
    # With ``settle_later``: run it once the stream has ended, however it ended: it closes ``events`` if
    # they are still open, then writes the settlement they worked out.
    settle: Settlement | None = None


@dataclass(frozen=True)
class Charge:
    """What a settlement writes, worked out before any database work."""

    credits: int
    prompt_tokens: int
    completion_tokens: int
    estimated: bool


@dataclass(frozen=True)
class ClientGone:
    """The caller hung up before its answer was complete: it receives nothing and pays nothing."""

    completion_id: str


ChatResult = Completion | CompletionStream | Refusal | ClientGone


@dataclass
class CallRecord:
    """What the access log says of a chat request, filled in as the request goes."""

    completion_id: str | None = None
    credits: int | None = None  # charged at settlement


class Unsettled:
    """Settlements worked out and not yet written on this replica, by account (``settle_later``).

    A reservation first waits for those of its account that are pending when it starts and give
    something back (at most ``UNSETTLED_WAIT`` seconds), so a client that got an answer and sends its
    next request is counted with that answer's refund, as when the answer waited for its settlement.
    Only those pending at the start: a steady stream of new settlements never holds a reservation back.
    A settlement that gives nothing back (a per-request price, a completion that used its whole budget)
    changes no counter a reservation reads on the SQL backend: nothing waits for it there (a sequential
    client of a per-request tier waited for each previous answer's write, 0.1-0.3 ms a request in
    ``bench/gateway.py``). On Redis it still can (``QuotaBackend.exact_settlements_matter``).
    """

    def __init__(self) -> None:
        self._by_account: dict[int, set[asyncio.Event]] = {}
        self._in_flight = 0

    def add(self, account_id: int, *, refunds: bool) -> asyncio.Event:
        """A settlement worked out; ``refunds``: it gives credits or tokens back (the next reservation waits)."""
        written = asyncio.Event()
        self._in_flight += 1
        if refunds:
            self._by_account.setdefault(account_id, set()).add(written)
        return written

    def done(self, account_id: int, written: asyncio.Event) -> None:
        written.set()
        self._in_flight -= 1
        pending = self._by_account.get(account_id)
        if pending is not None:
            pending.discard(written)
            if not pending:
                del self._by_account[account_id]

    def __len__(self) -> int:
        """Settlements in flight on this replica, refunding or not (tests wait for none)."""
        return self._in_flight

    async def wait(self, account_id: int) -> None:
        pending = self._by_account.get(account_id)
        if not pending:
            return
        with anyio.move_on_after(UNSETTLED_WAIT):
            for written in list(pending):
                await written.wait()


@dataclass
class ChatService:
    models: LiveModels
    quota: QuotaBackend
    clock: Clock
    default_max_tokens: int = 1024
    metrics: Metrics | None = None
    # Told of each settlement (the usage alerts' worker): must neither block nor raise.
    settled: Callable[[Reservation, int], None] | None = None
    # Told of each refusal (the usage alerts' worker: a spent allotment is at 100%): the same contract.
    refused: Callable[[Principal, Refusal], None] | None = None
    fairness: Fairness | None = None  # the tiers' prompt and concurrency limits, round-robin turns between accounts
    settling: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(SETTLE_THREADS))
    unsettled: Unsettled = field(default_factory=Unsettled)

    async def complete(
        self,
        principal: Principal,
        request: ChatCompletionRequest,
        record: CallRecord | None = None,
        client_gone: ClientGoneCheck | None = None,
        *,
        settle_later: bool = False,
    ) -> ChatResult:
        """Answer one chat request. ``record`` receives the completion id and the credits charged.
        ``client_gone`` says, without waiting, whether the caller has hung up: a non-streaming answer then
        stops generating (a stream notices by itself, at its next write).

        ``settle_later``: the answer does not wait for its settlement's database round trip. The result's
        ``settle`` writes it, and the caller must await it once the answer has gone out, whatever happened
        to the sending (``api_router`` does, in a ``finally``). The charge and the rate-limit figures are
        worked out before, so the answer is the same; what changes is that the caller no longer waits for
        the write (issue 14: one round trip of the two off each request's latency)."""
        self._check_request(request, principal)
        served = await self._model(request.model, principal)
        engine, model = served.engine, served.spec.name
        _check_fields(request, served)
        if not keys.model_allowed(principal, model):
            raise APIError(
                403,
                f"This API key may not use the model '{model}': it is limited to "
                f"{', '.join(principal.limits.models or ())}.",
                code="key_scope_denied",
                param="model",
            )
        assert engine is not None  # resolve() returns loaded models only
        if self.fairness is not None:  # prepare() then refuses a prompt over the tier's size, generate() waits its turn
            engine = await self.fairness.bind(engine, principal)
        price = self.models.catalog.price(
            principal.tier_name, model, pricing.tier_price(principal.cost_rule, principal.credits_per_1k_tokens)
        )
        tools = request.tool_specs() if request.calls_tools() else ()
        prompt = await engine.prepare(request.engine_messages(), tools)
        max_tokens = min(request.requested_max_tokens() or self.default_max_tokens, prompt.max_completion_tokens)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        # An engine that only estimates the prompt is reserved for at worst one token per UTF-8 byte,
        # so a prompt that counts higher than estimated is still paid for in full.
        prompt_bound = _prompt_upper_bound(prompt)
        n = request.choices()  # every choice may use max_tokens: all of them are reserved for, and charged
        await self.unsettled.wait(principal.account_id)
        with anyio.CancelScope(shield=True):  # once the database has granted it, we must know about it
            granted = await self._reserve(principal, completion_id, price, prompt_bound, max_tokens * n, model)
        if isinstance(granted, Refusal):
            if self.metrics:
                self.metrics.refusals.inc()
            if self.refused is not None:
                self.refused(principal, granted)
            return granted
        affordable = pricing.affordable_completion(price, granted.credits, prompt_bound)
        if affordable is not None:  # never generate more than the reserved credits pay for
            max_tokens = min(max_tokens, affordable // n)
        call = OpenReservation(self, principal, granted, prompt, price, model, record or CallRecord(), request)
        call.settle_later = settle_later
        events = engine.generate(prompt, _sampling(request, max(1, max_tokens), served.spec.config))
        started = time.perf_counter()
        # Errors before the first token become plain HTTP errors; a caller that hangs up while its request
        # waits for the engine (queued, or reading the prompt) leaves the queue and pays nothing.
        first = await call.first_event(events, client_gone)
        if first is None:
            return await call.abandon(events)
        if self.metrics:
            self.metrics.ttft.observe(time.perf_counter() - started)
        if request.stream:
            if client_gone is not None and await client_gone():
                # The caller hung up while the first token was being made: not a byte has gone out, so,
                # as for a non-streaming answer, it receives nothing and pays nothing.
                return await call.abandon(events)
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            stream = call.stream(first, events, include_usage)
            settle = functools.partial(call.after_sent, stream, events) if settle_later else None
            return CompletionStream(stream, granted.rate_limit(), settle)
        return await call.collect(first, events, client_gone)

    def _check_request(self, request: ChatCompletionRequest, principal: Principal) -> None:
        if request.mode not in (None, "talk"):
            raise APIError(
                403,
                f"Mode '{request.mode}' is not available: API keys give talk mode only.",
                code="mode_not_allowed",
                param="mode",
            )
        if request.choices() > principal.max_n:
            raise APIError(
                400,
                f"n may be at most {principal.max_n} on the {principal.tier_name} plan; you asked for {request.n}.",
                code="invalid_value",
                param="n",
            )

    async def _model(self, name: str | None, principal: Principal) -> Served:
        try:
            return await self.models.resolve(name, principal.tier_name)
        except ModelLookupError as exc:
            retry_after = 5 if exc.status == 503 else None
            raise APIError(exc.status, str(exc), code=exc.code, param="model", retry_after=retry_after) from exc

    async def _reserve(
        self, principal: Principal, request_id: str, price: Price, prompt_tokens: int, max_tokens: int, model: str
    ) -> Reservation | Refusal:
        cost = pricing.request_cost(price, prompt_tokens, max_tokens)
        tokens = prompt_tokens + max_tokens  # what the key's tokens-per-minute counts until settlement
        return await run_in_threadpool(
            lambda: self.quota.reserve(
                principal, cost, request_id=request_id, now=self.clock(), model=model, tokens=tokens
            )
        )

    async def settle(self, reservation: Reservation, charge: Charge) -> None:
        """Write ``charge`` for ``reservation`` (exactly once: a second call changes nothing)."""
        if self.metrics:
            self.metrics.observe_usage(charge.prompt_tokens, charge.completion_tokens, charge.credits)
        done = await anyio.to_thread.run_sync(
            lambda: self.quota.settle(
                reservation,
                credits=charge.credits,
                prompt_tokens=charge.prompt_tokens,
                completion_tokens=charge.completion_tokens,
                estimated=charge.estimated,
                now=self.clock(),
            ),
            limiter=self.settling,
        )
        if done and self.settled is not None:
            self.settled(reservation, charge.credits)

    async def release(self, reservation: Reservation) -> None:
        await anyio.to_thread.run_sync(lambda: self.quota.release(reservation, now=self.clock()), limiter=self.settling)


class OpenReservation:
    """A granted reservation whose request is running: what it delivered, and its settlement, exactly once.

    It ends settled (charged for what was delivered) or released (nothing delivered, nothing charged).
    """

    def __init__(
        self,
        service: ChatService,
        principal: Principal,
        reservation: Reservation,
        prompt: PreparedPrompt,
        price: Price,
        model: str,
        record: CallRecord,
        request: ChatCompletionRequest | None = None,
    ) -> None:
        self.service = service
        self.principal = principal
        self.price = price
        self.reservation = reservation
        self.prompt = prompt
        self.id = reservation.request_id
        self.created = int(time.time())
        self.model = model
        self.record = record
        self.delivered_tokens = 0
        self.tokens_refunded = 0  # given back to the key's tokens-per-minute at settlement
        self.closed = False  # settled or released
        self.settle_later = False  # see ChatService.complete
        self.pending: Charge | None = None  # worked out, not written yet (settle_later)
        self._unwritten: asyncio.Event | None = None  # its mark in service.unsettled while pending
        self.n = request.choices() if request else 1
        self.logprobs = bool(request and request.logprobs)
        record.completion_id = self.id

    async def first_event(
        self, events: AsyncGenerator[Event, None], client_gone: ClientGoneCheck | None = None
    ) -> Event | None:
        """The first event; None when the caller hung up before it came (``events`` is then still open)."""
        try:
            if client_gone is None:
                return await anext(events)
            return await _unless_gone(anext(events), client_gone)
        except EngineError as exc:
            await self._release()
            if self.service.metrics:
                self.service.metrics.engine_errors.labels(type(exc).__name__).inc()
            error = engine_error(exc)
            error.rate_limit = self.reservation.rate_limit(self.reservation.credits, self.reservation.tokens)
            raise error from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await events.aclose()
                await self._release()
            raise

    async def abandon(self, events: AsyncGenerator[Event, None]) -> ClientGone:
        """Stop a stream that never started: its caller is gone before its first byte."""
        with anyio.CancelScope(shield=True):
            await events.aclose()
            await self._release()
        log.info("%s: the client hung up before the stream started; nothing charged", self.id)
        return ClientGone(self.id)

    async def _release(self) -> None:
        self.closed = True
        await self.service.release(self.reservation)

    def _charge(self, usage: Finish | None) -> Charge:
        """What was used (``usage``; None when cut short: what was delivered) and what it costs."""
        if usage is None:
            prompt_tokens, completion = self.prompt.prompt_tokens, self.delivered_tokens
            estimated = self.prompt.estimated
        else:
            prompt_tokens, completion, estimated = usage.prompt_tokens, usage.completion_tokens, usage.estimated
        credits = pricing.final_charge(self.price, self.reservation.credits, prompt_tokens, completion)
        return Charge(credits, prompt_tokens, completion, estimated)

    async def _settle(self, usage: Finish | None) -> int:
        """Settle once (with ``settle_later``, work the charge out for :meth:`after_sent`); the credits refunded."""
        if self.closed:
            return 0
        self.closed = True
        charge = self._charge(usage)
        tokens_refunded = ledger.unused_tokens(self.reservation, charge.prompt_tokens + charge.completion_tokens)
        if self.settle_later:
            self.pending = charge
            refunds = charge.credits < self.reservation.credits or tokens_refunded > 0
            refunds = refunds or self.service.quota.exact_settlements_matter
            self._unwritten = self.service.unsettled.add(self.reservation.account_id, refunds=refunds)
        elif not await self._write(charge):
            return 0
        self.tokens_refunded = tokens_refunded
        return self.reservation.credits - charge.credits

    async def _write(self, charge: Charge) -> bool:
        """Write the settlement, trying again while the store is unreachable; False if it never was."""
        with anyio.CancelScope(shield=True):  # a disconnect must not cancel the bookkeeping
            for attempt, pause in enumerate(SETTLE_RETRY_PAUSES):
                if pause:
                    await anyio.sleep(pause)
                try:
                    await self.service.settle(self.reservation, charge)
                    break
                except STORE_UNAVAILABLE:
                    # Settlement is guarded by the row's status, so a retry never charges twice (a first
                    # try that did settle, its answer lost, makes the retry a no-op).
                    if attempt + 1 < len(SETTLE_RETRY_PAUSES):
                        log.warning("could not settle %s; trying again", self.id)
                        continue
                    # The row stays 'reserved' and counted: the caller keeps its answer, no charge is
                    # lost, and the sweeper settles the row once it is older than AIMICHAT_RESERVATION_TTL.
                    log.exception("could not settle %s; its reservation stands", self.id)
                    return False
        self.record.credits = charge.credits
        return True

    async def after_sent(
        self, stream: AsyncGenerator[bytes, None] | None = None, events: AsyncGenerator[Event, None] | None = None
    ) -> None:
        """With ``settle_later``, once the answer has gone out (or failed to): write what was worked out.

        ``stream``, a stream's server-sent events, is closed first: when its caller left mid-stream, closing
        it is what works out the charge for what was delivered (or releases a reservation nothing was
        delivered for); a stream that never started (its caller gone before the headers) closes the engine's
        ``events`` and releases the reservation.
        """
        with anyio.CancelScope(shield=True):
            if stream is not None:
                await stream.aclose()
                if not self.closed and events is not None:
                    await events.aclose()
                    await self._release()
            charge, self.pending = self.pending, None
            if charge is not None:
                try:
                    await self._write(charge)
                finally:
                    if self._unwritten is not None:
                        self.service.unsettled.done(self.reservation.account_id, self._unwritten)

    async def collect(
        self, first: Event, events: AsyncGenerator[Event, None], client_gone: ClientGoneCheck | None = None
    ) -> Completion | ClientGone:
        answers = [_Answer() for _ in range(self.n)]
        finish: Finish | None = None
        gone = False
        next_check = time.monotonic() + HANG_UP_CHECK_SECONDS  # a quick answer never pays for the check
        try:
            event = first
            while True:
                if isinstance(event, Finish):
                    finish = event
                    break
                if event.index < len(answers):
                    answers[event.index].add(event)
                self.delivered_tokens += event.tokens
                if client_gone is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + HANG_UP_CHECK_SECONDS
                    if gone := await client_gone():
                        break
                event = await anext(events)
        except EngineError as exc:
            log.warning("engine failed mid-completion: %s", exc)
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()
                if finish is None:  # the caller gets an error, or hung up: it receives nothing and pays nothing
                    await self._release()
        if gone:
            log.info("%s: the client hung up before the answer was complete; nothing charged", self.id)
            return ClientGone(self.id)
        if finish is None:
            raise engine_error(EngineError("generation failed"))
        refunded = await self._settle(finish)
        body: ChatCompletion = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [answer.choice(i, finish.reason(i), self.logprobs) for i, answer in enumerate(answers)],
            "usage": _usage(finish),
        }
        settle = self.after_sent if self.settle_later else None
        return Completion(body, self.reservation.rate_limit(refunded, self.tokens_refunded), settle)

    async def stream(
        self, first: Event, events: AsyncGenerator[Event, None], include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        finish: Finish | None = None
        try:
            for index in range(self.n):
                yield self._chunk({"role": "assistant", "content": ""}, index=index)
            event = first
            while True:
                if isinstance(event, Finish):
                    finish = event
                    break
                if event.text or event.tool_calls or event.logprobs or event.extra:
                    yield self._delta_chunk(event)
                # Counted once the chunk has gone out: the generator resumes only after it was sent.
                self.delivered_tokens += event.tokens
                event = await anext(events)
        except EngineError as exc:
            log.warning("engine failed mid-stream: %s", exc)
            err = engine_error(exc)
            message = "The model stopped answering mid-stream; you are charged only for the text you received."
            yield _sse({"error": {"message": message, "type": err.type, "param": None, "code": err.code}})
            yield DONE
            return
        finally:
            await events.aclose()
            if finish is None and not self.delivered_tokens and not self.closed:
                # Cut before any text reached the caller: nothing charged, as for a non-streaming answer
                # whose caller hung up (issue 15: it used to pay for its prompt and one token).
                with anyio.CancelScope(shield=True):
                    await self._release()
                refunded = self.reservation.credits
            else:
                refunded = await self._settle(finish)
        assert finish is not None  # the loop leaves only on a Finish or through the except above
        for index in range(self.n):
            yield self._chunk({}, finish_reason=finish.reason(index), index=index)
        if include_usage:
            rate = self.reservation.rate_limit(refunded, self.tokens_refunded)
            usage_chunk: ChatCompletionChunk = {
                **self._head(),
                "choices": [],
                "usage": _usage(finish),
                "x_ratelimit": {"limit": rate.limit, "remaining": rate.remaining, "reset": iso_utc(rate.reset_at)},
            }
            yield _sse(usage_chunk)
        yield DONE

    def _head(self) -> ChatCompletionChunk:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
        }

    def _chunk(
        self,
        delta: ChunkDelta,
        finish_reason: FinishReason | None = None,
        index: int = 0,
        logprobs: ChoiceLogprobs | None = None,
    ) -> bytes:
        chunk = self._head()
        chunk["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        return _sse(chunk)

    def _delta_chunk(self, event: Delta) -> bytes:
        delta: ChunkDelta = {}
        if event.extra:
            delta.update(event.extra)  # type: ignore[typeddict-item]  # an upstream's own fields, as sent
        if event.text or not event.tool_calls:
            delta["content"] = event.text
        if event.tool_calls:
            delta["tool_calls"] = [cast("ChunkToolCall", call) for call in event.tool_calls]
        logprobs: ChoiceLogprobs | None = None
        if self.logprobs and event.logprobs:
            logprobs = {"content": cast("list[TokenLogprob]", list(event.logprobs))}
        return self._chunk(delta, index=event.index, logprobs=logprobs)


class _Answer:
    """One choice of a non-streaming answer, put together from its deltas."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, ToolCallOut] = {}
        self.logprobs: list[TokenLogprob] = []
        self.extra: dict[str, Any] = {}

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.logprobs += cast("tuple[TokenLogprob, ...]", delta.logprobs)
        for piece in delta.tool_calls:
            function = piece.get("function") or {}
            call = self.calls.setdefault(
                int(piece.get("index", len(self.calls))),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            # The id and name come with a call's first piece; some servers (llama-cpp-python's) repeat them.
            call["id"] = call["id"] or piece.get("id") or ""
            call["function"]["name"] = call["function"]["name"] or function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
        for name, value in (delta.extra or {}).items():
            # Text fields come in pieces (reasoning_content); anything else is kept as last sent.
            before = self.extra.get(name)
            self.extra[name] = before + value if isinstance(before, str) and isinstance(value, str) else value

    def choice(self, index: int, finish_reason: FinishReason, logprobs: bool) -> Choice:
        text = "".join(self.parts)
        message: AssistantMessage = {"role": "assistant", "content": text if text or not self.calls else None}
        message.update(self.extra)  # type: ignore[typeddict-item]  # an upstream's own fields, as sent
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "index": index,
            "message": message,
            "logprobs": {"content": self.logprobs} if logprobs else None,
            "finish_reason": finish_reason,
        }


DONE = b"data: [DONE]\n\n"


async def _unless_gone(waiting: Awaitable[Event], client_gone: ClientGoneCheck) -> Event | None:
    """``waiting``'s result, or None (and ``waiting`` cancelled) once the caller has hung up; checked every
    HANG_UP_CHECK_SECONDS, so an answer that comes quickly never pays for a check."""
    task = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HANG_UP_CHECK_SECONDS)
            if done:
                return task.result()
            if await client_gone():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    except BaseException:
        task.cancel()
        raise


def _check_fields(request: ChatCompletionRequest, served: Served) -> None:
    """Refuse what the model cannot take: fields its settings refuse (``--refuse-fields``), and images, audio
    and files, which reach only upstream models marked multimodal."""
    config = served.spec.config
    sent = request.model_fields_set | set(request.model_extra or {})
    refused = [name for name in getattr(config, "refuse_fields", ()) if name in sent]
    if refused:
        raise APIError(
            400,
            f"The model '{served.spec.name}' does not take the parameter '{refused[0]}'; send the request without it.",
            code="unsupported_parameter",
            param=refused[0],
        )
    if request.has_media() and not getattr(config, "multimodal", False):
        raise APIError(
            400,
            f"The model '{served.spec.name}' reads text only: content parts other than 'text' (images, audio, "
            "files) need a model marked multimodal.",
            code="unsupported_content",
            param="messages",
        )


def _sampling(request: ChatCompletionRequest, max_tokens: int, config: EngineConfig) -> SamplingParams:
    """The request's sampling; what it leaves out comes from the model's defaults (``models add
    --temperature``), else OpenAI's 1.0: a small model answers everyday questions sensibly only cooler."""
    temperature = config.temperature if config.temperature is not None else 1.0
    top_p = config.top_p if config.top_p is not None else 1.0
    return SamplingParams(
        n=request.choices(),
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        tools=request.tool_specs(),
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        grammar=request.grammar(),
        response_format=request.response_format if request.structured() else None,
        extra=request.passthrough(),
        max_tokens=max_tokens,
        temperature=temperature if request.temperature is None else request.temperature,
        top_p=top_p if request.top_p is None else request.top_p,
        stop=request.stop_sequences(),
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
    )


def _prompt_upper_bound(prompt: PreparedPrompt) -> int:
    if not prompt.estimated:
        return prompt.prompt_tokens
    per_message_overhead = 8  # role markers and separators of common chat templates
    encoded = sum(len(m.content.encode("utf-8")) + per_message_overhead for m in prompt.messages)
    return max(prompt.prompt_tokens, encoded)


def _usage(finish: Finish) -> Usage:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _sse(payload: ChatCompletionChunk | dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
