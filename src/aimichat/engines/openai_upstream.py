"""The upstream engine: any OpenAI-compatible server (vLLM, llama.cpp's ``llama-server``, Ollama, a
hosted API) behind the :class:`~aimichat.engines.base.Engine` interface.

How it keeps the credits guarantee ("never charged for what an upstream failed to deliver"):

- It always asks the upstream for a stream (``stream: true`` with ``stream_options.include_usage``),
  for streaming and non-streaming callers alike, and hands every piece of text on the moment it
  arrives. Each upstream chunk with text becomes one :class:`Delta` worth one token, so a caller cut
  off mid-stream pays for exactly the chunks it received.
- Until the first piece of text exists, nothing has reached the caller, so any failure can still be
  hidden: a connect error or a 5xx is retried once on the same upstream, then the next URL is tried.
  429/503, 401/403/404 and a first-token timeout go straight to the next URL. Each upstream has a
  :class:`CircuitBreaker`: one that keeps failing is skipped for a cool-down, then probed by the
  next request. When every URL has failed the caller gets a 503 with ``Retry-After`` (never a 429:
  that status means "your credits are spent") and the credit reservation is released.
- After the first piece, a dead or stalled upstream raises :class:`EngineError`; the API ends the
  stream with an error event and charges only what was delivered.
- Usage comes from the upstream's ``include_usage`` chunk. Where an upstream sends none, prompt
  tokens are estimated locally (:func:`estimate_prompt_tokens`) and completion tokens are the
  chunks received, and the Finish is marked ``estimated`` (so is the ledger row).
- The context window is the upstream's to enforce: its 400 becomes our 400 (with code
  ``context_length_exceeded`` when its message says so), via :class:`UpstreamRejected`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio

from . import upstream_http
from .base import (
    JSON,
    Delta,
    EngineBusy,
    EngineError,
    EngineStats,
    Event,
    Finish,
    FinishReason,
    Message,
    PreparedPrompt,
    SamplingParams,
    UpstreamRejected,
    with_default_system_prompt,
)
from .breaker import CircuitBreaker
from .upstream_http import HttpClientKind, TransportError

if TYPE_CHECKING:
    from aimichat.config import Settings

log = logging.getLogger(__name__)

# The prompt estimate (the model's tokenizer is upstream): OpenAI's rule of thumb of ~4 characters
# per token, plus the chat template's framing (role markers, separators) per message and for the
# reply. It sizes every credit reservation, and is charged only when the upstream sends no usage,
# in which case the ledger row is marked estimated.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3

RETRIES = 1  # extra attempts on the same upstream after a connect error or a 5xx
_UNKNOWN_ROOM = 1 << 30  # the upstream's context window is unknown here; it enforces it itself
_ERROR_BODY_LIMIT = 64 * 1024  # read at most this much of an upstream's error answer
_MAX_RETRY_AFTER = 300
_TIMEOUT_RETRY_AFTER = 5
_CONTEXT_MESSAGE = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|too many tokens|prompt is too long", re.I
)
_CLIENT_ERROR_TYPES = {"invalid_request_error", "BadRequestError", "invalid_request"}


def estimate_prompt_tokens(chat: Sequence[Mapping[str, Any]], tools: Sequence[JSON] = ()) -> int:
    """A guess at the prompt's tokens: each message's text (content parts and calls as JSON) and the tools'
    JSON at CHARS_PER_TOKEN, plus the template's framing."""
    tokens = TOKENS_PER_REPLY + math.ceil(len(json.dumps(list(tools))) / CHARS_PER_TOKEN) if tools else TOKENS_PER_REPLY
    for m in chat:
        size = len(_text_of(m.get("content"))) + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        tokens += TOKENS_PER_MESSAGE + math.ceil(size / CHARS_PER_TOKEN)
    return tokens


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    return json.dumps(content) if content else ""  # parts: an image's URL is sent, and read, as text


def parse_urls(value: str | Sequence[str]) -> list[str]:
    """Base URLs from a comma-separated setting (or a list), normalised to end in the API root.

    ``http://host:8000`` becomes ``http://host:8000/v1`` and a pasted ``.../v1/chat/completions``
    becomes ``.../v1``; a URL with another path (``https://example.com/api/openai/v1``) is kept.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    urls = []
    for raw in (item.strip() for item in items):
        if not raw:
            continue
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {raw!r}")
        path = parts.path.rstrip("/").removesuffix("/chat/completions")
        urls.append(urlunsplit((parts.scheme, parts.netloc, path or "/v1", "", "")))
    if not urls:
        raise ValueError("no upstream URL: set AIMICHAT_UPSTREAM_URL (or aimichat serve --upstream-url)")
    return urls


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: float = 5.0  # TCP (and TLS) connect
    first_token: float = 60.0  # from sending the request to the first piece of text (queue + prompt)
    between_tokens: float = 30.0  # from one piece of text to the next


# -- one upstream and what we know about it ------------------------------------------------------


@dataclass
class _Upstream:
    base_url: str
    breaker: CircuitBreaker
    last_error: str | None = None
    contacted: bool = False
    display_url: str = field(init=False)  # the URL without credentials, for logs and /readyz
    headers: dict[str, str] = field(init=False)  # the credentials of the URL, if any
    chat_url: str = field(init=False)
    models_url: str = field(init=False)

    def __post_init__(self) -> None:
        # Credentials in the URL (https://user:pass@host/v1) travel as a Basic Authorization header, as
        # httpx sends them; the URL the client sees, and so any error message about it, has none.
        self.display_url, self.headers = upstream_http.split_userinfo(self.base_url)
        self.chat_url = self.display_url + "/chat/completions"
        self.models_url = self.display_url + "/models"

    def answered(self) -> None:
        self.contacted, self.last_error = True, None
        self.breaker.success()

    def failed(self, reason: str) -> None:
        self.contacted, self.last_error = True, reason
        self.breaker.failure()

    def state(self) -> str:
        if self.breaker.state != "closed":
            return "tripped"
        if self.last_error is not None:
            return "unreachable"
        return "up" if self.contacted else "unknown"

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.display_url,
            "state": self.state(),
            "consecutive_failures": self.breaker.consecutive_failures,
            "last_error": self.last_error,
            "retry_in": math.ceil(self.breaker.retry_in()),
        }


class _AttemptFailed(Exception):
    """One attempt at one upstream failed before any text reached the caller."""

    def __init__(self, reason: str, *, retry_same: bool = False, busy: bool = False, retry_after: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.retry_same = retry_same  # worth one more try on the same upstream (connect error, 5xx)
        self.busy = busy  # the upstream said "later" (429/503) or was too slow: the caller gets Retry-After
        self.retry_after = retry_after


class _StreamBroken(Exception):
    """The upstream's stream carried an error event or something that is not a chat chunk."""

    def __init__(self, reason: str, *, code: object = None, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.kind = kind

    @property
    def client_error(self) -> bool:
        """Does the upstream blame the request (a 4xx-like error event) rather than itself?"""
        code, kind = self.code, self.kind
        return (isinstance(code, int) and 400 <= code < 500 and code not in (408, 429)) or kind in _CLIENT_ERROR_TYPES


# -- reading an upstream stream ------------------------------------------------------------------


class _Watchdog:
    """The between-tokens limit of one request: one deadline, moved at each event, and one timer.

    ``anyio.fail_after`` around each read opened a cancel scope per event (~4 % of a request's CPU in the
    issue-14 profile). Here an event costs a clock read: the timer is armed once and, when it fires
    before the deadline (which moved since), re-armed for the new one, so a stream that keeps flowing
    re-arms it about once per ``seconds``. When the deadline has passed while a read is waiting, it
    cancels the reading task, as ``asyncio.timeout`` does, and the read raises TimeoutError.

    Only reads are timed, never the time the consumer holds the stream between two events: the
    deadline is set when the consumer asks for the next piece (:meth:`start`), and no timer-held state
    spans a ``yield`` of the engine's generator.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[Any] | None = None  # the task waiting in :meth:`read`, if any
        self._fired = False  # we cancelled the read in progress

    def start(self) -> None:
        """The next event is due within ``seconds`` from now."""
        self._deadline = self._loop.time() + self.seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check)

    async def read(self, response: upstream_http.Response) -> bytes:
        task = asyncio.current_task()
        if task is None:  # not in a task: nothing to cancel, so no limit (the engine always runs in one)
            return await response.next_chunk()
        # The cancel requests before the read, counted now: one made by anyone else during the read (a
        # shutdown, an outer timeout), even in the very loop turn our timer fires, must stay a cancel.
        entry = task.cancelling()
        self._reader, self._fired = task, False
        try:
            return await response.next_chunk()
        except asyncio.CancelledError:
            if self._fired and task.uncancel() <= entry:
                raise TimeoutError from None  # ours, and nobody else's: the upstream stalled
            raise
        finally:
            self._reader, self._fired = None, False

    def _check(self) -> None:
        self._timer = None
        if self._reader is None:  # nobody is waiting: the next start() arms the timer again
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check)
            return
        self._fired = True
        self._reader.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Relay:
    """Reads one upstream SSE stream: text pieces as they come, then the finish reason and usage."""

    def __init__(self, response: upstream_http.Response):
        self.response = response
        self.watchdog: _Watchdog | None = None  # the between-tokens limit, once the first piece is in
        self._lines: deque[bytes] = deque()  # whole lines received and not yet read
        self._partial: list[bytes] = []  # the pieces of a line whose end has not arrived
        self._after_cr = False  # the last chunk ended in CR: an LF starting the next one ends no other line
        self._eof = False
        self.finish_reason: str | None = None  # the first choice's
        self.finish_reasons: dict[int, str] = {}  # every choice's, by index
        self._pending: deque[Delta] = deque()  # deltas of a payload that held several choices
        self.usage: dict[str, Any] | None = None
        self.events = 0  # data events seen (an empty 200 stream has none)
        self.done = False  # the upstream sent [DONE]
        self.ended = False

    @property
    def complete(self) -> bool:
        """Did the upstream end its answer properly (rather than the connection just closing)?"""
        return self.done or self.finish_reason is not None

    async def release(self) -> None:
        """Close the response. After a complete answer, read what is left of the body first (for up to
        a second), so the connection goes back to the pool (closing a half-read response closes the TCP
        connection, which is what we want when the caller has gone away, and a waste otherwise)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        # The answer is whole: a server that then drops the connection mid-chunk (llama-cpp-python's,
        # under concurrent requests) costs us the connection, never the caller's answer.
        await self.response.aclose(drain=1.0 if self.done else 0)

    async def next_delta(self) -> Delta | None:
        """The next piece of an answer (text, tool calls, log probabilities…), or None when the stream is over."""
        while not self._pending and not self.ended:
            payload = await self._next_payload()
            if payload is None:
                self.ended = True
                break
            self._pending += self._absorb(payload)
        return self._pending.popleft() if self._pending else None

    async def _next_line(self) -> bytes | None:
        """The next line of the body without its end (LF, CRLF or CR); None at the end of the body."""
        while not self._lines:
            if self._eof:
                return None
            chunk = await (self.response.next_chunk() if self.watchdog is None else self.watchdog.read(self.response))
            if not chunk:  # the end of the body: a last line without its line end is still a line
                self._eof = True
                if self._partial:
                    self._lines.append(b"".join(self._partial))
                    self._partial.clear()
                continue
            self._split(chunk)
        return self._lines.popleft()

    def _split(self, chunk: bytes) -> None:
        """Our own line splitting: no limit on a line's length (a tool call's arguments can make a long one),
        one split per chunk rather than a call per line, and the pieces of an unfinished line kept apart and
        joined once its end arrives (re-joining them at every chunk was quadratic: a 2 MB line in 1,400-byte
        chunks took 1 s of CPU)."""
        if self._after_cr and chunk.startswith(b"\n"):  # a CRLF cut between two chunks: one line end
            chunk = chunk[1:]
        if b"\r" in chunk:  # CRLF and a bare CR end lines too (the SSE spec; httpx's aiter_lines did so)
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        lines = chunk.split(b"\n")
        if len(lines) == 1:  # no line end in this chunk
            if chunk:
                self._partial.append(chunk)
            return
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial.clear()
        last = lines.pop()
        if last:
            self._partial.append(last)
        self._lines.extend(lines)

    async def _next_payload(self) -> dict[str, Any] | None:
        """The next SSE ``data`` payload, decoded; None at ``[DONE]`` or at the end of the body."""
        data: list[bytes] = []
        while True:
            line = await self._next_line()
            if not line:  # end of body (None), or end of one event (b"")
                if data:
                    return self._decode(b"\n".join(data).decode("utf-8", errors="replace"))
                if line is None:
                    return None
                continue
            if line.startswith(b":"):  # a comment, e.g. a keep-alive ping
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)

    def _decode(self, data: str) -> dict[str, Any] | None:
        self.events += 1
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data, parse_constant=_finite)
        except ValueError:
            raise _StreamBroken(f"not JSON in the stream: {data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise _StreamBroken(f"unexpected stream event: {data[:200]!r}")
        return payload

    def _absorb(self, payload: dict[str, Any]) -> list[Delta]:
        if payload.get("error"):
            reason, code, kind = _error_fields(payload)
            raise _StreamBroken(reason, code=code, kind=kind)
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        deltas = []
        for choice in payload.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = choice["index"] if isinstance(choice.get("index"), int) else 0
            if choice.get("finish_reason"):
                self.finish_reasons[index] = str(choice["finish_reason"])
                if index == 0:
                    self.finish_reason = self.finish_reasons[0]
            delta = _delta(choice, index)
            if delta is not None:
                deltas.append(delta)
        return deltas


# Delta fields we read ourselves; any other (reasoning_content, refusal, an engine's own) reaches the caller as sent.
_DELTA_FIELDS = frozenset({"role", "content", "tool_calls", "function_call"})


def _delta(choice: dict[str, Any], index: int) -> Delta | None:
    """One choice of an upstream chunk as a Delta; None when it carries nothing to pass on."""
    body: dict[str, Any] = choice["delta"] if isinstance(choice.get("delta"), dict) else {}
    content = body.get("content")
    text = content if isinstance(content, str) else ""
    calls = body.get("tool_calls")
    tool_calls = tuple(c for c in calls if isinstance(c, dict)) if isinstance(calls, list) else ()
    logprobs = choice.get("logprobs")
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    extra = {k: v for k, v in body.items() if k not in _DELTA_FIELDS and v is not None}
    if not (text or tool_calls or entries or extra):
        return None
    return Delta(
        text,
        1,
        index=index,
        tool_calls=tool_calls,
        logprobs=tuple(entries) if isinstance(entries, list) else (),
        extra=extra or None,
    )


@dataclass
class _Opened:
    upstream: _Upstream
    relay: _Relay
    first: Delta | None  # the first piece of the answer; None when the answer is empty


# -- the engine ----------------------------------------------------------------------------------


class UpstreamEngine:
    """Streams chat completions from OpenAI-compatible servers, with retry, failover and breakers."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str = "",
        api_key: str | None = None,
        model_id: str = "aimichat-1",
        system_prompt: str = "",
        timeouts: UpstreamTimeouts = UpstreamTimeouts(),
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
        max_connections: int = 256,
        strip_fields: Sequence[str] = (),
        http_client: HttpClientKind = "aiohttp",
    ):
        self.model_id = model_id
        self.strip_fields = tuple(strip_fields)  # request fields never sent to this upstream
        self.model = model  # the upstream's name for it; empty: leave "model" out, the server's default
        self.system_prompt = system_prompt
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.http_client = http_client
        self._api_key = api_key
        self._upstreams = [
            _Upstream(url, CircuitBreaker(breaker_failures, breaker_cooldown)) for url in parse_urls(urls)
        ]
        self._client: upstream_http.Client | None = None
        self._in_flight = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamEngine:
        from aimichat.config import PUBLIC_MODEL_ID

        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        return cls(
            settings.upstream_url,
            model=settings.upstream_model,
            api_key=key or None,
            model_id=PUBLIC_MODEL_ID,
            system_prompt=settings.system_prompt,
            timeouts=UpstreamTimeouts(
                connect=settings.upstream_connect_timeout,
                first_token=settings.upstream_first_token_timeout,
                between_tokens=settings.upstream_token_timeout,
            ),
            breaker_failures=settings.upstream_breaker_failures,
            breaker_cooldown=settings.upstream_breaker_cooldown,
            http_client=settings.upstream_http,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = self._new_client()
        async with anyio.create_task_group() as tg:  # probe all at once: start-up waits for the slowest only
            for upstream in self._upstreams:
                tg.start_soon(self._probe, upstream)

    def _new_client(self) -> upstream_http.Client:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # No read timeout: the first-token and between-token limits are enforced per event, not per
        # socket read, so an upstream's keep-alive pings cannot stretch them.
        return upstream_http.new_client(self.http_client, headers, self.timeouts.connect, self.max_connections)

    async def _probe(self, upstream: _Upstream) -> None:
        """Tell /readyz early whether an upstream answers at all; the breaker only learns from real requests."""
        try:
            status = await self._http.get_status(upstream.models_url, upstream.headers, self.timeouts.connect)
        except TransportError as exc:
            upstream.contacted, upstream.last_error = True, _transport_reason(exc)
            log.warning("upstream %s is not reachable at start: %s", upstream.display_url, upstream.last_error)
            return
        upstream.contacted = True
        if status >= 500:
            upstream.last_error = f"HTTP {status}"
        elif status in (401, 403):
            log.warning(
                "upstream %s refuses our credentials (HTTP %d): check AIMICHAT_UPSTREAM_API_KEY",
                upstream.display_url,
                status,
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def stats(self) -> EngineStats:
        """Ready while started and some upstream may take a request; ``running`` counts the requests in flight."""
        # A tripped upstream whose cool-down is over counts as available, otherwise readiness (and so
        # traffic) could never come back to probe it.
        available = any(u.breaker.state != "open" for u in self._upstreams)
        return EngineStats(
            ready=self._client is not None and available,
            kind="upstream",
            model=self.model or None,
            running=self._in_flight,
            details={"upstreams": [u.describe() for u in self._upstreams], "in_flight": self._in_flight},
        )

    @property
    def _http(self) -> upstream_http.Client:
        if self._client is None:
            raise EngineError("the upstream engine is not started")
        return self._client

    # -- prompt --------------------------------------------------------------------------------

    async def prepare(self, messages: list[Message], tools: Sequence[JSON] = ()) -> PreparedPrompt:
        """The chat as sent upstream (our system prompt first when it has none; each message as the caller
        sent it), its size estimated. ``tools`` reach the upstream with the sampling parameters."""
        chat = with_default_system_prompt(messages, self.system_prompt)
        payload = [m.as_json() for m in chat]
        tokens = estimate_prompt_tokens(payload, tools)
        return PreparedPrompt(tuple(messages), tokens, _UNKNOWN_ROOM, payload=payload, estimated=True)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncGenerator[Event, None]:
        if self._client is None:
            raise EngineError("the upstream engine is not started")
        body = self._request_body(prompt, params)
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        self._in_flight += 1
        opened: _Opened | None = None
        try:
            opened = await self._open(body, raw)
            delivered = 0
            delta = opened.first
            while delta is not None:
                delivered += 1
                yield delta
                delta = await self._next_delta(opened)
            yield _finish(opened.relay, prompt.prompt_tokens, delivered, params.n)
        finally:
            # Runs on normal end, on error and when the consumer goes away (the caller disconnected):
            # closing the response closes the upstream connection, which stops its generation.
            self._in_flight -= 1
            if opened is not None:
                with anyio.CancelScope(shield=True):
                    await opened.relay.release()

    def _request_body(self, prompt: PreparedPrompt, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": prompt.payload,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if self.model:
            body["model"] = self.model
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.response_format is not None:
            body["response_format"] = params.response_format  # the upstream constrains its own sampling
        if params.n != 1:
            body["n"] = params.n
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        if params.tools:  # the upstream renders and constrains its own calls
            body["tools"] = list(params.tools)
            if params.tool_choice is not None:
                body["tool_choice"] = params.tool_choice
            if params.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = params.parallel_tool_calls
        for name, value in params.extra.items():  # what we do not interpret, as the caller sent it
            body.setdefault(name, value)
        for name in self.strip_fields:  # what this upstream must not receive (the model's setting)
            body.pop(name, None)
        return body

    async def _open(self, body: dict[str, Any], raw: bytes) -> _Opened:
        """The first upstream that starts answering, in order, with one retry and breakers honoured."""
        failures: list[_AttemptFailed] = []
        skipped: list[_Upstream] = []
        for upstream in self._upstreams:
            for attempt in range(1 + RETRIES):
                if not upstream.breaker.allow():  # tripped, possibly by the attempt just made
                    if attempt == 0:
                        skipped.append(upstream)
                    break
                try:
                    return await self._attempt(upstream, body, raw)
                except _AttemptFailed as failure:
                    failures.append(failure)
                    log.warning(
                        "upstream %s failed (attempt %d): %s", upstream.display_url, attempt + 1, failure.reason
                    )
                    if not failure.retry_same:
                        break
        raise _exhausted(failures, skipped)

    async def _attempt(self, upstream: _Upstream, body: dict[str, Any], raw: bytes) -> _Opened:
        """Send the request to one upstream and wait for its first piece of text (or its empty answer)."""
        response: upstream_http.Response | None = None
        try:
            async with asyncio.timeout(self.timeouts.first_token):  # one per attempt: no yield inside
                response = await self._http.post(upstream.chat_url, raw, upstream.headers)
                if not response.is_success:
                    await self._raise_for_answer(response)
                relay = _Relay(response)
                first = await self._first_text(upstream, relay, body)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if response is not None:
                    await response.aclose()
            failure = self._attempt_failure(exc)
            if failure is not None:
                upstream.failed(failure.reason)
                if failure is exc:
                    raise
                raise failure from exc
            if isinstance(exc, _StreamBroken):  # an error event that blames the request
                upstream.answered()
                raise _rejection(exc.reason, exc.code, exc.kind) from None
            if isinstance(exc, UpstreamRejected):
                upstream.answered()  # it answered properly: the request was at fault, not the upstream
            else:
                upstream.breaker.release()  # e.g. the caller went away: no verdict on the upstream
            raise
        upstream.answered()
        return _Opened(upstream, relay, first)

    def _attempt_failure(self, exc: BaseException) -> _AttemptFailed | None:
        """The failure an exception stands for, or None when it is not the upstream's failure."""
        if isinstance(exc, _AttemptFailed):
            return exc
        if isinstance(exc, TimeoutError):
            return _AttemptFailed(
                f"no first token within {self.timeouts.first_token:g}s", busy=True, retry_after=_TIMEOUT_RETRY_AFTER
            )
        if isinstance(exc, TransportError):  # refused, reset, dropped before any text
            return _AttemptFailed(_transport_reason(exc), retry_same=True)
        if isinstance(exc, _StreamBroken):
            if exc.client_error:
                return None
            return _AttemptFailed(f"error event before any text: {exc.reason}", retry_same=True)
        return None

    async def _raise_for_answer(self, response: upstream_http.Response) -> None:
        """Turn an upstream's non-2xx answer into the right exception (always raises)."""
        status = response.status
        raw = await _read_limited(response)
        reason, code, kind = _error_fields(_json_or_text(raw))
        if status in (429, 503):
            hint = _retry_after(response.headers.get("retry-after"), default=1)
            raise _AttemptFailed(f"HTTP {status}: {reason}", busy=True, retry_after=hint)
        if status == 408:
            raise _AttemptFailed(f"HTTP 408: {reason}", busy=True, retry_after=_TIMEOUT_RETRY_AFTER)
        if status in (401, 403, 404) or status < 400:
            # Our credentials or model name are wrong for this upstream: the operator's to fix, and
            # the caller must not see the upstream's text (a 401 can echo part of our key).
            log.error("upstream answered HTTP %d to us (check its URL, model and API key): %s", status, reason)
            raise _AttemptFailed(f"HTTP {status} (see the server log)")  # /readyz is public: no upstream text
        if status < 500:
            raise _rejection(reason, code, kind)
        raise _AttemptFailed(f"HTTP {status}: {reason}", retry_same=True)

    async def _first_text(self, upstream: _Upstream, relay: _Relay, body: dict[str, Any]) -> Delta | None:
        """The first piece of the answer; None for a complete but empty answer."""
        try:
            first = await relay.next_delta()
        except TransportError as exc:
            if relay.events:
                raise
            await self._diagnose(upstream, body, _transport_reason(exc))
        if first is None and not relay.complete:
            if relay.events:
                raise _AttemptFailed("the stream ended before any text", retry_same=True)
            await self._diagnose(upstream, body, "an empty stream")
        return first

    async def _diagnose(self, upstream: _Upstream, body: dict[str, Any], what: str) -> None:
        """A 200 whose stream broke before its first event: find out why (always raises).

        llama-cpp-python's server answers 200 and only then validates, so a request it refuses
        (e.g. a prompt longer than its context) gets an empty or dropped stream. The same request
        without streaming, for one token, makes it answer the 400 that says why. It goes over a
        fresh connection: the one the broken stream used may be returned to the pool half-dead.
        """
        probe = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False, "max_tokens": 1}
        raw = json.dumps(probe, ensure_ascii=False, separators=(",", ":")).encode()
        headers = upstream.headers | {"Connection": "close"}
        response = await self._http.post(upstream.chat_url, raw, headers, fresh=True)
        try:
            if not response.is_success:
                await self._raise_for_answer(response)
        finally:
            await response.aclose()
        raise _AttemptFailed(f"{what} after HTTP 200 (the same request without streaming succeeds)", retry_same=True)

    async def _next_delta(self, opened: _Opened) -> Delta | None:
        """The next piece after the first; a dead or stalled upstream is now an EngineError."""
        relay = opened.relay
        if relay.watchdog is None:
            relay.watchdog = _Watchdog(self.timeouts.between_tokens)
        relay.watchdog.start()
        try:
            delta = await relay.next_delta()
        except TimeoutError:
            if relay.finish_reason is not None:  # stalled after its answer, while we waited for usage
                return None
            raise self._died(opened, f"stalled: no token within {self.timeouts.between_tokens:g}s") from None
        except TransportError as exc:
            if relay.finish_reason is not None:
                return None
            raise self._died(opened, _transport_reason(exc)) from exc
        except _StreamBroken as exc:
            raise self._died(opened, exc.reason) from exc
        if delta is None and not relay.complete:
            raise self._died(opened, "the stream ended before the answer did")
        return delta

    def _died(self, opened: _Opened, reason: str) -> EngineError:
        log.warning("upstream %s failed mid-stream: %s", opened.upstream.display_url, reason)
        opened.upstream.failed(reason)
        return EngineError(f"the model server failed mid-answer: {reason}")


# -- helpers -------------------------------------------------------------------------------------


def _finish(relay: _Relay, estimated_prompt: int, delivered: int, n: int = 1) -> Finish:
    """The upstream's own usage when it sent it; otherwise our estimate, marked as such."""
    reasons = tuple(_reason(relay.finish_reasons.get(i)) for i in range(n))
    every = reasons if n > 1 else ()
    usage = relay.usage or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Finish(reasons[0], prompt, completion, reasons=every)
    return Finish(
        reasons[0],
        prompt if isinstance(prompt, int) else estimated_prompt,
        completion if isinstance(completion, int) else delivered,
        estimated=True,
        reasons=every,
    )


_REASONS: dict[str, FinishReason] = {
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "function_call",
}


def _reason(upstream: str | None) -> FinishReason:
    """OpenAI's finish reasons as sent; anything else (an engine's "eos", "abort"…) is a plain stop."""
    return _REASONS.get(upstream or "", "stop")


def _exhausted(failures: list[_AttemptFailed], skipped: list[_Upstream]) -> EngineError:
    """What the caller hears when no upstream could start an answer."""
    busy = [f.retry_after for f in failures if f.busy]
    if busy:
        return EngineBusy("The model servers are busy; retry shortly. Nothing was charged.", retry_after=min(busy))
    if skipped and not failures:
        wait = max(1, math.ceil(min(u.breaker.retry_in() for u in skipped)))
        return EngineBusy(
            "The model servers are recovering from failures; retry shortly. Nothing was charged.", retry_after=wait
        )
    return EngineError("no upstream answered: " + "; ".join(f.reason for f in failures))


def _rejection(reason: str, code: object, kind: str | None) -> UpstreamRejected:
    if code == "context_length_exceeded" or kind == "exceed_context_size_error" or _CONTEXT_MESSAGE.search(reason):
        return UpstreamRejected(reason, code="context_length_exceeded", param="messages")
    return UpstreamRejected(f"The model server rejected the request: {reason}", code="upstream_rejected")


def _error_fields(body: object) -> tuple[str, object, str | None]:
    """(message, code, type) from the error shapes OpenAI, vLLM, llama.cpp, Ollama and FastAPI use."""
    if isinstance(body, str):
        return body.strip()[:500] or "no reason given", None, None
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, str):
        return error[:500], None, None
    if not isinstance(error, dict):
        return json.dumps(body)[:500], None, None
    message = error.get("message") or error.get("detail") or json.dumps(error)
    if not isinstance(message, str):
        message = json.dumps(message)
    kind = error.get("type")
    return message[:500], error.get("code"), kind if isinstance(kind, str) else None


# JSON has no NaN or infinities, but Python's parser takes them (a llama.cpp server can send a -Infinity log
# probability): passed on as such, they made the answer impossible to render (a 500, its settlement left
# to the sweeper). Infinities become vLLM's clamp, NaN null.
_CONSTANTS: dict[str, float | None] = {"-Infinity": -9999.0, "Infinity": 9999.0, "NaN": None}


def _finite(name: str) -> float | None:
    return _CONSTANTS[name]


def _json_or_text(raw: bytes) -> object:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _read_limited(response: upstream_http.Response) -> bytes:
    return await response.read(_ERROR_BODY_LIMIT)


def _retry_after(value: str | None, default: int) -> int:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), kept within 1..300."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        seconds = int(value)
    else:
        try:
            seconds = math.ceil(email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return default
    return max(1, min(_MAX_RETRY_AFTER, seconds))


def _transport_reason(exc: TransportError) -> str:
    return exc.reason
