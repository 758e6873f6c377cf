"""Chat completions: reserve credits, run the engine, stream or collect, settle exactly once."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from aimichat.api.metrics import Metrics
from aimichat.api.errors import STORE_UNAVAILABLE, APIError, engine_error, quota_exceeded
from aimichat.engines.base import Engine, EngineError, Event, Finish, PreparedPrompt, SamplingParams
from aimichat.keys.service import Principal
from aimichat.quota import ledger, periods
from aimichat.quota.backends import QuotaBackend
from aimichat.quota.periods import Clock

from .protocol import ChatCompletionRequest

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for the access log: the client hung up; nothing is sent
HANG_UP_CHECK_SECONDS = 0.25  # how often a non-streaming answer checks that its caller is still there

@dataclass
class ChatService:
    engine: Engine
    quota: QuotaBackend
    clock: Clock
    default_max_tokens: int = 1024
    metrics: Metrics | None = None

    async def complete(self, principal: Principal, request: ChatCompletionRequest, log_state: object | None = None,
                       client_gone: Callable[[], Awaitable[bool]] | None = None):
        """Answer one chat request. ``log_state`` (the request's state) receives the completion id and
        the credits charged, for the access log line. ``client_gone`` says, without waiting, whether the
        caller has hung up: a non-streaming answer then stops generating (a stream notices by itself,
        at its next write)."""
        if request.mode not in (None, "talk"):
            raise APIError(403, f"Mode '{request.mode}' is not available: API keys give talk mode only.", code="mode_not_allowed", param="mode")
        if request.model not in (None, self.engine.model_id):
            raise APIError(
                404,
                f"The model '{request.model}' does not exist. This server serves '{self.engine.model_id}'.",
                code="model_not_found",
                param="model",
            )
        prompt = await self.engine.prepare(request.engine_messages())
        max_tokens = min(request.requested_max_tokens() or self.default_max_tokens, prompt.max_completion_tokens)

        request_id = "chatcmpl-" + secrets.token_hex(12)
        # An engine that only estimates the prompt is reserved for at worst one token per UTF-8 byte,
        # so a prompt that counts higher than estimated is still paid for in full.
        prompt_bound = _prompt_upper_bound(prompt)
        with anyio.CancelScope(shield=True):  # once the database has granted it, we must know about it
            reservation = await self._reserve(principal, request_id, prompt_bound, max_tokens)
        if isinstance(reservation, ledger.Refusal):
            if self.metrics:
                self.metrics.refusals.inc()
            return quota_exceeded(reservation)
        if principal.cost_rule == "per_token":
            # Never generate more than the reserved credits pay for.
            max_tokens = min(max_tokens, ledger.affordable_tokens(principal, reservation.credits) - prompt_bound)
        params = SamplingParams(
            max_tokens=max(1, max_tokens),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop_sequences(),
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
        )
        call = _Call(self, principal, reservation, request_id, int(time.time()), self.engine.model_id)
        call.prompt_tokens = prompt.prompt_tokens
        call.prompt_estimated = prompt.estimated
        call.log_state = log_state
        if log_state is not None:
            log_state.completion_id = request_id
        events = self.engine.generate(prompt, params)
        started = time.perf_counter()
        first = await call.first_event(events)  # errors before the first token become plain HTTP errors
        if self.metrics:
            self.metrics.ttft.observe(time.perf_counter() - started)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                call.sse(first, events, include_usage),
                media_type="text/event-stream",
                headers={**call.rate_headers(), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await call.collect(first, events, client_gone)

    async def _reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int):
        cost = ledger.request_cost(principal, prompt_tokens, max_tokens)
        return await run_in_threadpool(lambda: self.quota.reserve(principal, cost, request_id=request_id, now=self.clock()))

    async def settle(self, principal: Principal, reservation: ledger.Reservation, usage: Finish | None,
                     delivered_tokens: int, prompt_tokens: int, prompt_estimated: bool = False):
        if usage is None:  # cut short: charge what was delivered
            completion, estimated = delivered_tokens, prompt_estimated
        else:
            completion, prompt_tokens, estimated = usage.completion_tokens, usage.prompt_tokens, usage.estimated
        credits = ledger.final_charge(principal, reservation, prompt_tokens, completion)
        if self.metrics:
            self.metrics.observe_usage(prompt_tokens, completion, credits)
        await run_in_threadpool(
            lambda: self.quota.settle(reservation, credits=credits, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion, estimated=estimated, now=self.clock())
        )
        return credits

    async def release(self, reservation: ledger.Reservation):
        await run_in_threadpool(lambda: self.quota.release(reservation, now=self.clock()))


class _Call:
    """One granted request: its reservation, what it delivered, and how it is settled."""

    def __init__(self, service: ChatService, principal: Principal, reservation: ledger.Reservation, request_id: str, created: int, model: str):
        self.service = service
        self.principal = principal
        self.reservation = reservation
        self.id = request_id
        self.created = created
        self.model = model
        self.delivered_tokens = 0
        self.prompt_tokens = 0
        self.prompt_estimated = False
        self.settled = False
        self.log_state: object | None = None

    def rate_headers(self, remaining: int | None = None) -> dict[str, str]:
        r = self.reservation
        return {
            "X-RateLimit-Limit": str(r.daily_limit),
            "X-RateLimit-Remaining": str(r.remaining if remaining is None else remaining),
            "X-RateLimit-Reset": periods.iso_utc(r.reset_at),
        }

    async def first_event(self, events: AsyncIterator[Event]) -> Event:
        try:
            return await anext(events)
        except EngineError as exc:
            await self._release()
            if self.service.metrics:
                self.service.metrics.engine_errors.labels(type(exc).__name__).inc()
            error = engine_error(exc)
            error.headers.update(self.rate_headers(self.reservation.remaining + self.reservation.credits))
            raise error from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await events.aclose()
                await self._release()
            raise

    async def _release(self) -> None:
        self.settled = True
        await self.service.release(self.reservation)

    async def _settle(self, usage: Finish | None) -> int:
        if self.settled:
            return 0
        self.settled = True
        with anyio.CancelScope(shield=True):  # a disconnect must not cancel the bookkeeping
            try:
                credits = await self.service.settle(self.principal, self.reservation, usage, self.delivered_tokens,
                                                    self.prompt_tokens, self.prompt_estimated)
            except STORE_UNAVAILABLE:
                # The row stays 'reserved' and counted: the caller keeps its answer, no charge is lost.
                log.exception("could not settle %s; its reservation stands", self.id)
                return 0
        if self.log_state is not None:
            self.log_state.credits = credits
        return self.reservation.credits - credits  # refunded

    async def collect(self, first: Event, events: AsyncIterator[Event],
                      client_gone: Callable[[], Awaitable[bool]] | None = None) -> Response:
        parts: list[str] = []
        finish: Finish | None = None
        gone = False
        next_check = time.monotonic() + HANG_UP_CHECK_SECONDS  # a quick answer never pays for the check
        try:
            event = first
            while True:
                if isinstance(event, Finish):
                    finish = event
                    break
                parts.append(event.text)
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
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if finish is None:
            raise engine_error(EngineError("generation failed"))
        refunded = await self._settle(finish)
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "logprobs": None,
                    "finish_reason": finish.finish_reason,
                }
            ],
            "usage": _usage(finish),
        }
        return JSONResponse(body, headers=self.rate_headers(self.reservation.remaining + refunded))

    async def sse(self, first: Event, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[bytes]:
        finish: Finish | None = None
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if isinstance(event, Finish):
                    finish = event
                    break
                self.delivered_tokens += event.tokens
                yield self._chunk({"content": event.text})
                event = await anext(events)
        except EngineError as exc:
            log.warning("engine failed mid-stream: %s", exc)
            err = engine_error(exc)
            message = "The model stopped answering mid-stream; you are charged only for the text you received."
            yield _sse({"error": {"message": message, "type": err.type, "param": None, "code": err.code}})
            yield b"data: [DONE]\n\n"
            return
        finally:
            await events.aclose()
            refunded = await self._settle(finish)
        yield self._chunk({}, finish_reason=finish.finish_reason)
        if include_usage:
            r = self.reservation
            usage_chunk = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": _usage(finish),
                "x_ratelimit": {
                    "limit": r.daily_limit,
                    "remaining": r.remaining + refunded,
                    "reset": periods.iso_utc(r.reset_at),
                },
            }
            yield _sse(usage_chunk)
        yield b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        return _sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
        )


def _prompt_upper_bound(prompt: PreparedPrompt) -> int:
    if not prompt.estimated:
        return prompt.prompt_tokens
    per_message_overhead = 8  # role markers and separators of common chat templates
    encoded = sum(len(m.content.encode("utf-8")) + per_message_overhead for m in prompt.messages)
    return max(prompt.prompt_tokens, encoded)


def _usage(finish: Finish) -> dict:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
