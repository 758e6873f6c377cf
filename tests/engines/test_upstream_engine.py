"""The upstream engine's parts on their own: the breaker, URL parsing, the prompt estimate, and the
engine driven directly (no API in between) against the fault-injecting upstream."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections import deque

import pytest
from faulty_upstream import FaultyUpstream

from aimichat.engines import upstream_http
from aimichat.engines.base import Delta, EngineError, Finish, Message, SamplingParams
from aimichat.engines.breaker import CircuitBreaker
from aimichat.engines.openai_upstream import (
    UpstreamEngine,
    UpstreamTimeouts,
    _Relay,
    _retry_after,
    _Watchdog,
    estimate_prompt_tokens,
    parse_urls,
)
from conftest import LiveServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the breaker ---------------------------------------------------------------------------------


def test_breaker_trips_after_consecutive_failures_only():
    breaker = CircuitBreaker(failure_threshold=3, cooldown=10, clock=FakeClock())
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # a success in between resets the count
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()


def test_breaker_admits_one_probe_after_the_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=10, clock=clock)
    breaker.failure()
    clock.now += 9.5
    assert not breaker.allow() and breaker.retry_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.consecutive_failures == 0


def test_a_failed_probe_reopens_for_a_full_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=10, clock=clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and breaker.retry_in() == 10


def test_a_released_probe_lets_the_next_request_probe():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=1, clock=clock)
    breaker.failure()
    clock.now += 1
    assert breaker.allow()
    breaker.release()  # e.g. the caller went away before the upstream said anything
    assert breaker.allow()


# -- settings parsing and estimates ---------------------------------------------------------------


def test_parse_urls_normalises_to_the_api_root():
    assert parse_urls(" http://a:8000 , https://b.example/v1/, http://c/v1/chat/completions,,") == [
        "http://a:8000/v1",
        "https://b.example/v1",
        "http://c/v1",
    ]
    assert parse_urls("https://gw.example/api/openai/v1") == ["https://gw.example/api/openai/v1"]
    for bad in ("", " , ", "localhost:8000", "ftp://x/v1"):
        with pytest.raises(ValueError):
            parse_urls(bad)


def test_prompt_estimate_is_about_four_characters_a_token():
    chat = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 401}]
    assert estimate_prompt_tokens(chat) == 3 + (4 + 10) + (4 + 101)


def test_retry_after_accepts_seconds_and_dates_within_bounds():
    assert _retry_after("7", default=1) == 7
    assert _retry_after(None, default=2) == 2
    assert _retry_after("soon", default=3) == 3
    assert _retry_after("100000", default=1) == 300
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 20))
    assert 18 <= _retry_after(date, default=1) <= 21


# -- the engine, driven directly ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    fault = FaultyUpstream()
    with LiveServer(fault) as live:
        fault.url = live.url + "/v1"
        yield fault


async def _collect(engine: UpstreamEngine, limit: int | None = None) -> tuple[list, float | None]:
    """Run one request; with ``limit``, close the stream after that many events and return when.

    The engine (and its connection pool) stays open for a while after that, so only closing the
    stream itself can have closed the upstream connection.
    """
    await engine.start()
    try:
        prompt = await engine.prepare([Message("user", "hi")])
        events, stream, closed_at = [], engine.generate(prompt, SamplingParams(max_tokens=50)), None
        async for event in stream:
            events.append(event)
            if limit is not None and len(events) == limit:
                await stream.aclose()
                closed_at = time.monotonic()
                await asyncio.sleep(1.5)
                break
        return events, closed_at
    finally:
        await engine.close()


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
def test_each_upstream_chunk_is_one_delta_and_the_finish_carries_its_usage(upstream, http):
    """The same events over either connection pool (AIMICHAT_UPSTREAM_HTTP): the parity of the two."""
    upstream.reset()
    upstream.default = "ok"
    events, _ = asyncio.run(_collect(UpstreamEngine(upstream.url, http_client=http)))
    assert events[:-1] == [Delta(piece, 1) for piece in upstream.pieces]
    assert events[-1] == Finish("stop", 42, 7, estimated=False)
    assert "model" not in upstream.requests[-1]  # no model configured: the upstream's default


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
def test_closing_the_stream_closes_the_upstream_connection(upstream, http):
    upstream.reset()
    upstream.default = "trickle"
    engine = UpstreamEngine(upstream.url, timeouts=UpstreamTimeouts(first_token=2, between_tokens=2), http_client=http)
    events, closed = asyncio.run(_collect(engine, limit=3))
    assert len(events) == 3 and upstream.disconnects
    assert upstream.disconnects[0] - closed < 1.0
    assert engine.stats().running == 0


# -- the stream as bytes: line splitting, timeouts, credentials -------------------------------------


class ScriptedUpstream:
    """Answers every chat request with ``script``: bytes are sent as one chunk each, a number is a pause of
    that many seconds (cut short when the client goes away). Records the Authorization headers and the paths.
    With ``redirect`` (a 3xx status), every path answers it, pointing to the same path under ``/moved``."""

    def __init__(self) -> None:
        self.script: list[bytes | float] = []
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self.redirect: int | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
        while (await receive()).get("more_body"):
            pass
        self.paths.append(scope["path"])
        if self.redirect is not None and not scope["path"].startswith("/moved/"):
            location = ("/moved" + scope["path"]).encode()
            await send({"type": "http.response.start", "status": self.redirect, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"].endswith("/models"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"data":[]}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for item in self.script:
            if isinstance(item, bytes):
                await send({"type": "http.response.body", "body": item, "more_body": True})
                continue
            try:
                await asyncio.wait_for(receive(), item)  # the only message left to come is the disconnect
                return
            except TimeoutError:
                pass
        await send({"type": "http.response.body", "body": b""})


def sse(payload: dict | str, end: bytes = b"\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: " + data.encode() + end + end


def piece(text: str = "", finish: str | None = None) -> dict:
    delta = {"content": text} if text else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
HTTP_CLIENTS = ["aiohttp", "httpx"]


@pytest.fixture(scope="module")
def scripted():
    app = ScriptedUpstream()
    with LiveServer(app) as live:
        app.url = live.url + "/v1"
        yield app


async def _events(engine: UpstreamEngine, pause: float = 0) -> list:
    """Every event of one request (an EngineError is the last one), the consumer taking ``pause`` s per event."""
    await engine.start()
    events: list = []
    try:
        prompt = await engine.prepare([Message("user", "hi")])
        async for event in engine.generate(prompt, SamplingParams(max_tokens=50)):
            events.append(event)
            await asyncio.sleep(pause)
    except EngineError as exc:
        events.append(exc)
    finally:
        await engine.close()
    return events


def run_scripted(scripted: ScriptedUpstream, http: str, script: list, *, between: float = 5.0, pause: float = 0):
    scripted.script = script
    timeouts = UpstreamTimeouts(first_token=5, between_tokens=between)
    return asyncio.run(_events(UpstreamEngine(scripted.url, timeouts=timeouts, http_client=http), pause))


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_lines_are_split_wherever_the_chunks_end_with_lf_or_crlf_and_no_length_limit(scripted, http):
    long = "x" * 300_000  # over aiohttp's readline limit (2**17): one SSE line, e.g. a tool call's arguments
    body = sse(piece("a"), b"\r\n") + b": ping\n\n" + sse(piece(long)) + sse(piece("b", "stop"), b"\r\n")
    body += sse(USAGE) + sse("[DONE]")
    cuts = [0, 7, 14, 15, 40, 1000, 150_000, len(body) - 30, len(body) - 1, len(body)]  # one cut between \r and \n
    chunks: list = [body[a:b] for a, b in itertools.pairwise(cuts)]
    events = run_scripted(scripted, http, chunks)
    assert events == [Delta("a", 1), Delta(long, 1), Delta("b", 1), Finish("stop", 3, 2)]


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_a_stall_between_tokens_is_an_error_and_pings_do_not_stretch_it(scripted, http):
    pings = [b": ping\n\n", 0.1] * 30
    started = time.monotonic()
    events = run_scripted(scripted, http, [sse(piece("a")), sse(piece("b")), *pings], between=0.6)
    elapsed = time.monotonic() - started
    assert events[:2] == [Delta("a", 1), Delta("b", 1)]
    assert isinstance(events[2], EngineError) and "stalled: no token within 0.6s" in str(events[2])
    assert 0.6 <= elapsed < 2.0


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_a_stall_after_the_finish_reason_ends_the_answer_normally(scripted, http):
    """Waiting for a usage chunk that never comes: the answer is whole, so it ends (usage estimated)."""
    events = run_scripted(scripted, http, [sse(piece("a")), sse(piece("b", "length")), 5.0], between=0.5)
    assert events[:2] == [Delta("a", 1), Delta("b", 1)]
    assert events[2].finish_reason == "length" and events[2].estimated and events[2].completion_tokens == 2


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_only_the_upstream_is_timed_never_the_consumer(scripted, http):
    """A consumer slower than the between-tokens limit: the upstream was on time, nothing fails."""
    script = [sse(piece("a")), sse(piece("b")), sse(piece("c", "stop")), sse(USAGE), sse("[DONE]")]
    events = run_scripted(scripted, http, script, between=0.3, pause=0.5)
    assert events == [Delta("a", 1), Delta("b", 1), Delta("c", 1), Finish("stop", 3, 2)]


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(scripted, http, caplog):
    scripted.script, scripted.authorizations = [sse(piece("a", "stop")), sse("[DONE]")], []
    url = scripted.url.replace("http://", "http://us%40er:s3cret@")
    engine = UpstreamEngine(url, api_key="sk-ignored", http_client=http)
    events = asyncio.run(_events(engine))
    assert events[0] == Delta("a", 1)
    expected = "Basic " + base64.b64encode(b"us@er:s3cret").decode()
    assert scripted.authorizations == [expected, expected]  # the probe of /models, then the request
    assert "s3cret" not in json.dumps(engine.stats().details) and "s3cret" not in caplog.text


# -- review fixes: redirects, foreign cancels, long lines, CR line ends, disconnect names ---------


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_the_upstreams_failure_and_never_followed(scripted, http, status):
    """httpx never followed redirects; aiohttp does unless told not to (a 302 re-sends the POST as a GET)."""
    scripted.script, scripted.paths, scripted.redirect = [sse(piece("a", "stop")), sse("[DONE]")], [], status

    async def run() -> tuple[dict, list]:
        engine = UpstreamEngine(scripted.url, http_client=http)
        await engine.start()
        probed = engine.stats().details["upstreams"][0]
        await engine.close()
        return probed, await _events(engine)

    try:
        probed, events = asyncio.run(run())
    finally:
        scripted.redirect = None
    assert probed["state"] == "up" and probed["last_error"] is None  # the probe's 3xx: an answer, not an error
    assert len(events) == 1 and isinstance(events[0], EngineError) and f"HTTP {status}" in str(events[0])
    assert not [path for path in scripted.paths if path.startswith("/moved/")]


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_a_redirect_is_the_status_the_probe_sees(scripted, http):
    scripted.redirect = 302

    async def status() -> int:
        client = upstream_http.new_client(http, {}, 5.0, 4)
        try:
            return await client.get_status(scripted.url + "/models", {}, 5.0)
        finally:
            await client.aclose()

    try:
        assert asyncio.run(status()) == 302
    finally:
        scripted.redirect = None


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_a_cancel_from_outside_stays_a_cancel_even_when_the_deadline_has_passed_too(scripted, http):
    """A shutdown's cancel (or an outer timeout's) requested in the loop turn before the watchdog's timer
    fires: the read must raise CancelledError, not the watchdog's TimeoutError ("stalled")."""
    scripted.script = [30.0]  # headers, then nothing

    async def run() -> None:
        client = upstream_http.new_client(http, {}, 5.0, 4)
        response = await client.post(scripted.url + "/chat/completions", b"{}", {})
        try:
            loop = asyncio.get_running_loop()
            watchdog = _Watchdog(0.05)
            reader = asyncio.create_task(watchdog.read(response))
            await asyncio.sleep(0.02)  # the read is waiting on the socket (no deadline yet: no race with it)
            watchdog.start()
            loop.call_later(0, reader.cancel)  # a timer due before the watchdog's…
            time.sleep(0.1)  # …and both due in the same loop turn, the foreign cancel first
            with pytest.raises(asyncio.CancelledError):
                await reader
            watchdog.stop()
        finally:
            await response.aclose()
            await client.aclose()

    asyncio.run(run())


class ChunkedResponse(upstream_http.Response):
    """An upstream's 200 answer whose body arrives in exactly the chunks given."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = deque(chunks)
        self.status, self.headers = 200, {}

    async def next_chunk(self) -> bytes:
        return self._chunks.popleft() if self._chunks else b""

    async def aclose(self, drain: float = 0) -> None:
        self._chunks.clear()


async def _relayed(chunks: list[bytes]) -> tuple[list[Delta], str | None, object]:
    relay = _Relay(ChunkedResponse(chunks))
    deltas = []
    while (delta := await relay.next_delta()) is not None:
        deltas.append(delta)
    return deltas, relay.finish_reason, relay.usage


def test_a_multi_megabyte_line_in_small_chunks_costs_linear_cpu():
    """Re-joining the unfinished line at every chunk was quadratic: a 2 MB line in 1,400-byte chunks took 1 s."""
    long = "y" * 4_000_000
    body = sse(piece(long, "stop")) + sse("[DONE]")
    chunks = [body[i : i + 1400] for i in range(0, len(body), 1400)]
    started = time.process_time()
    deltas, finish, _ = asyncio.run(_relayed(chunks))
    cpu = time.process_time() - started
    assert deltas == [Delta(long, 1)] and finish == "stop"
    assert cpu < 0.5, f"{cpu:.2f} s of CPU for one 4 MB line"


def _stream(end: bytes) -> bytes:
    """A stream whose every line ends with ``end``: pings, a data field without its space, an event of two
    data lines, a finish, the usage, [DONE]."""
    first_half = json.dumps(piece("c"))[:-1]
    events = [
        ": ping\n\n",
        sse(piece("a")).decode(),
        f"data:{json.dumps(piece('b'))}\n: ping\n\n",
        f"data: {first_half}\ndata: }}\n\n",
        sse(piece("", "stop")).decode(),
        sse(USAGE).decode(),
        sse("[DONE]").decode(),
    ]
    text = "".join(events)
    return text.replace("\n", end.decode()).encode()


def _cuts(body: bytes) -> list[list[bytes]]:
    """The body in two chunks at every position, a byte a chunk, and each line end as a chunk of its own."""
    every = [[body[:i], body[i:]] for i in range(1, len(body))] + [[bytes([b]) for b in body]]
    ends = [i for i, b in enumerate(body) if b in b"\r\n"]
    return every + [[body[:i], body[i : i + 2], body[i + 2 :]] for i in ends]


def test_lf_crlf_and_a_bare_cr_end_lines_wherever_the_chunks_are_cut():
    """The SSE spec ends lines with CRLF, LF or CR (httpx's aiter_lines did too); a CR ending one chunk and an
    LF starting the next are one line end."""
    expected = ([Delta("a", 1), Delta("b", 1), Delta("c", 1)], "stop", USAGE["usage"])

    async def run() -> None:
        for end in (b"\n", b"\r\n", b"\r"):
            for chunks in _cuts(_stream(end)):
                assert await _relayed(chunks) == expected, (end, chunks)

    asyncio.run(run())


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_a_bare_cr_ends_lines_over_either_client(scripted, http):
    body = sse(piece("a"), b"\r") + b": ping\r\r" + sse(piece("b", "stop"), b"\r") + sse(USAGE, b"\r") + sse("[DONE]")
    chunks: list = [body[a:b] for a, b in itertools.pairwise([0, 5, 30, 70, 71, len(body)])]
    assert run_scripted(scripted, http, chunks) == [Delta("a", 1), Delta("b", 1), Finish("stop", 3, 2)]


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize(
    "head", [b"", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"], ids=["nothing", "half_a_head"]
)
def test_a_server_that_hangs_up_before_its_answer_is_named_as_httpx_names_it(http, head):
    """The same error on both clients, for logs and /readyz: httpx's, and never the upstream's headers."""

    async def run() -> str:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        client = upstream_http.new_client(http, {}, 5.0, 4)
        try:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(upstream_http.TransportError) as caught:
                await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", {})
            return caught.value.reason
        finally:
            await client.aclose()
            server.close()

    assert asyncio.run(run()) == "RemoteProtocolError: Server disconnected without sending a response."


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_infinities_and_nan_from_an_upstream_become_json_a_client_can_read(scripted, http):
    """Python's JSON parser takes -Infinity and NaN, which JSON has not: the answer could not be rendered."""
    top = '[{"token":"b","logprob":NaN,"bytes":[98]}]'
    logprobs = f'{{"content":[{{"token":"a","logprob":-Infinity,"bytes":[97],"top_logprobs":{top}}}]}}'
    first = f'{{"choices":[{{"index":0,"delta":{{"content":"a"}},"logprobs":{logprobs}}}]}}'
    events = run_scripted(scripted, http, [sse(first), sse(piece("b", "stop")), sse(USAGE), sse("[DONE]")])
    [token] = events[0].logprobs
    assert token["logprob"] == -9999.0 and token["top_logprobs"][0]["logprob"] is None
    json.dumps(events[0].logprobs, allow_nan=False)  # as Starlette renders answers
