"""The upstream engine's parts on their own: the breaker, URL parsing, the prompt estimate, and the
engine driven directly (no API in between) against the fault-injecting upstream."""

from __future__ import annotations

import asyncio
import time

import pytest
from faulty_upstream import FaultyUpstream

from aimichat.engines.base import Delta, Finish, Message, SamplingParams
from aimichat.engines.breaker import CircuitBreaker
from aimichat.engines.openai_upstream import (
    UpstreamEngine,
    UpstreamTimeouts,
    _retry_after,
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
