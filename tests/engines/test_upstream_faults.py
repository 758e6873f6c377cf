"""The upstream engine against a fault-injecting upstream, over real HTTP and real databases.

AimiChat runs in upstream mode (built from Settings, as ``aimichat serve --engine upstream`` does) in
front of one or two :class:`FaultyUpstream` servers. Every test checks what the caller saw and what
it was charged, read from the ``usage_ledger`` table: nothing when no text reached it, exactly the
chunks it received when a stream broke. The tier charges 1 credit per token, so credits are tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import requests
from faulty_upstream import FaultyUpstream
from sqlalchemy import select

from aimichat.app import create_app
from aimichat.config import Settings
from aimichat.engines.openai_upstream import estimate_prompt_tokens
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from fixtures import LiveServer, free_port, make_account, make_key, settled, sse_events

USER = [{"role": "user", "content": "Say hello"}]
MAX_TOKENS = 100  # the per-token reservation (prompt + this) stays above the upstream's usage
COOLDOWN = 2.0  # long enough for a few requests under load, short enough to wait out
FAST = {  # short limits so failures show within a second or two
    "upstream_connect_timeout": 1.0,
    "upstream_first_token_timeout": 1.0,
    "upstream_token_timeout": 1.0,
    "upstream_breaker_failures": 3,
    "upstream_breaker_cooldown": 30.0,
}


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstreams():
    """Two fault-injecting upstreams, A and B, shared by the module and reset before each test."""
    a, b = FaultyUpstream(), FaultyUpstream()
    with LiveServer(a) as live_a, LiveServer(b) as live_b:
        a.url, b.url = live_a.url + "/v1", live_b.url + "/v1"
        yield a, b


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def upstream_http(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test over either HTTP client of the engine (AIMICHAT_UPSTREAM_HTTP): proof that the two agree."""
    monkeypatch.setenv("AIMICHAT_UPSTREAM_HTTP", request.param)
    return str(request.param)


@pytest.fixture
def up(upstreams) -> tuple[FaultyUpstream, FaultyUpstream]:
    for upstream in upstreams:
        upstream.reset()
        upstream.default = "ok"
    return upstreams


@pytest.fixture
def key(database) -> str:
    make_account(database, "caller@example.com", daily=100_000, cost_rule="per_token", per_1k=1000)
    return make_key(database, "caller@example.com")


@contextmanager
def aimichat(db: Database, tmp_path, *urls: str, **settings) -> Iterator[LiveServer]:
    cfg = Settings(
        data_dir=tmp_path,
        database_url=db.url,
        engine="upstream",
        upstream_url=",".join(urls),
        upstream_model="the-model",
        **{**FAST, **settings},
    )
    with LiveServer(create_app(cfg, database=db)) as live:
        yield live


def dead_url() -> str:
    """A URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


def chat(live: LiveServer, key: str, *, stream: bool = False, **body) -> requests.Response:
    payload = {"messages": USER, "max_tokens": MAX_TOKENS, "stream": stream, **body}
    return requests.post(
        f"{live.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=payload, timeout=30
    )


def texts(payloads: list) -> list[str]:
    return [
        p["choices"][0]["delta"]["content"]
        for p in payloads
        if isinstance(p, dict) and p.get("choices") and p["choices"][0]["delta"].get("content")
    ]


def ledger(db: Database) -> list[UsageEvent]:
    with db.session() as s:
        return list(s.scalars(select(UsageEvent).order_by(UsageEvent.id)))


def estimated_prompt() -> int:
    """What the engine estimates for USER (our system prompt is added, as the embedded engine does)."""
    return estimate_prompt_tokens([{"role": "system", "content": Settings().system_prompt}, *USER])


def upstream_states(live: LiveServer) -> list[dict]:
    return requests.get(f"{live.url}/readyz", timeout=10).json()["engine"]["upstreams"]


def assert_charged_nothing(db: Database) -> None:
    row = ledger(db)[-1]
    assert (row.status, row.credits) == ("released", 0)


def assert_503_with_retry_after(r: requests.Response, code: str, retry_after: str | None = None) -> dict:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
    if retry_after is not None:
        assert r.headers["retry-after"] == retry_after
    error = r.json()["error"]  # OpenAI's error shape, never the credits-spent 429 body
    assert error["code"] == code
    return error


# -- the happy path: passthrough and usage -------------------------------------------------------


def test_upstream_usage_is_what_is_charged(database, tmp_path, key, up):
    a, _ = up
    with aimichat(database, tmp_path, a.url) as live:
        plain = chat(live, key)
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == "".join(a.pieces)
        assert plain.json()["usage"] == a.usage
        streamed = chat(live, key, stream=True, stream_options={"include_usage": True})
        payloads = sse_events(streamed.text)
    assert texts(payloads) == a.pieces  # one chunk per upstream chunk, re-framed with our ids
    assert {p["id"] for p in payloads[:-1]} == {payloads[0]["id"]} and payloads[0]["id"].startswith("chatcmpl-")
    assert payloads[-2]["usage"]["completion_tokens"] == 7 and payloads[-1] == "[DONE]"
    for row in ledger(database):
        assert (row.status, row.prompt_tokens, row.completion_tokens, row.estimated) == ("charged", 42, 7, False)
        assert row.credits == 49
    # The caller asked for no stream once, but the upstream is always asked for a stream with usage.
    assert all(r["stream"] is True and r["stream_options"] == {"include_usage": True} for r in a.requests)


def test_request_fields_pass_through(database, tmp_path, key, up):
    a, _ = up
    with aimichat(database, tmp_path, a.url, upstream_api_key="sk-upstream") as live:
        assert (
            chat(live, key, temperature=0.3, top_p=0.9, stop=["\n\n"], seed=11, presence_penalty=0.5).status_code == 200
        )
    sent = a.requests[-1]
    assert a.authorizations[-1] == "Bearer sk-upstream"  # our key for the upstream, never the caller's
    assert sent["model"] == "the-model" and sent["max_tokens"] == MAX_TOKENS
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["seed"], sent["presence_penalty"]) == (
        0.3,
        0.9,
        ["\n\n"],
        11,
        0.5,
    )
    assert sent["messages"][0] == {"role": "system", "content": Settings().system_prompt}


def test_without_upstream_usage_it_is_estimated_and_marked(database, tmp_path, key, up):
    a, _ = up
    a.default = "no_usage"
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key)
    assert r.status_code == 200, r.text
    assert a.authorizations[-1] is None  # no upstream key configured: none sent
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == estimated_prompt()
    assert usage["completion_tokens"] == len(a.pieces)  # one token per chunk received
    row = ledger(database)[-1]
    assert (row.status, row.estimated, row.credits) == ("charged", True, estimated_prompt() + len(a.pieces))


# -- before the first token: retry, failover, nothing charged -----------------------------------


def test_connect_error_is_retried_once_then_fails_over(database, tmp_path, key, up):
    a, _ = up
    with aimichat(database, tmp_path, dead_url(), a.url) as live:
        r = chat(live, key)
        assert r.status_code == 200, r.text
        dead, alive = upstream_states(live)
    assert dead["state"] == "unreachable" and dead["consecutive_failures"] == 2  # the try and its one retry
    assert "ConnectError" in dead["last_error"]
    assert alive["state"] == "up" and a.chat_requests == 1


def test_a_5xx_is_retried_once_on_the_same_upstream(database, tmp_path, key, up):
    a, b = up
    a.plan.extend(["500"])
    with aimichat(database, tmp_path, a.url, b.url) as live:
        assert chat(live, key).status_code == 200
    assert (a.chat_requests, b.chat_requests) == (2, 0)


def test_two_5xx_fail_over_to_the_next_url(database, tmp_path, key, up):
    a, b = up
    a.plan.extend(["500", "500"])
    with aimichat(database, tmp_path, a.url, b.url) as live:
        r = chat(live, key, stream=True)
    assert r.status_code == 200 and texts(sse_events(r.text)) == b.pieces
    assert (a.chat_requests, b.chat_requests) == (2, 1)
    assert ledger(database)[-1].status == "charged"


def test_when_every_upstream_fails_the_caller_gets_503_and_pays_nothing(database, tmp_path, key, up):
    a, b = up
    a.default = b.default = "500"
    with aimichat(database, tmp_path, a.url, b.url, upstream_breaker_failures=10) as live:
        for stream in (False, True):
            r = chat(live, key, stream=stream)
            error = assert_503_with_retry_after(r, "engine_error")
            assert "exploded" not in error["message"]  # the upstream's words stay in our logs
            assert_charged_nothing(database)
    assert (a.chat_requests, b.chat_requests) == (4, 4)


@pytest.mark.parametrize("status", ["429", "503"])
def test_429_and_503_are_our_503_with_retry_after_never_429(database, tmp_path, key, up, status):
    a, _ = up
    a.default = status
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key)
    assert_503_with_retry_after(r, "engine_overloaded", retry_after="7")  # the upstream's Retry-After
    assert a.chat_requests == 1  # a busy upstream is not hammered with an immediate retry
    assert_charged_nothing(database)


def test_a_busy_upstream_fails_over_to_the_next(database, tmp_path, key, up):
    a, b = up
    a.default = "429"
    with aimichat(database, tmp_path, a.url, b.url) as live:
        assert chat(live, key).status_code == 200
    assert (a.chat_requests, b.chat_requests) == (1, 1)


def test_upstream_401_is_a_503_that_does_not_leak_the_upstream_message(database, tmp_path, key, up):
    a, _ = up
    a.default = "401"
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key)
    error = assert_503_with_retry_after(r, "engine_error")
    assert "sk-" not in r.text and "API key" not in error["message"]
    assert_charged_nothing(database)


def test_upstream_400_is_our_400_with_its_reason_and_no_failover(database, tmp_path, key, up):
    a, b = up
    a.plan.extend(["400", "400_context"])
    with aimichat(database, tmp_path, a.url, b.url) as live:
        plain = chat(live, key)
        context = chat(live, key, stream=True)
        states = upstream_states(live)
    assert plain.status_code == 400
    assert "temperature is too spicy" in plain.json()["error"]["message"]
    assert plain.json()["error"]["type"] == "invalid_request_error"
    assert context.status_code == 400 and context.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in context.json()["error"]["message"]
    assert (a.chat_requests, b.chat_requests) == (2, 0)
    assert states[0]["state"] == "up"  # a 4xx is the request's fault, not the upstream's
    assert all((row.status, row.credits) == ("released", 0) for row in ledger(database))


@pytest.mark.parametrize("fault", ["empty", "drop_empty"])
def test_a_200_stream_that_breaks_before_any_event_is_diagnosed_without_streaming(database, tmp_path, key, up, fault):
    a, _ = up
    a.plan.extend([fault, "400_context"])  # llama-cpp-python's server refuses inside its stream
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    diagnosis = a.requests[1]
    assert diagnosis["stream"] is False and diagnosis["max_tokens"] == 1 and "stream_options" not in diagnosis


def test_a_drop_before_the_first_token_is_retried(database, tmp_path, key, up):
    a, _ = up
    a.plan.extend(["drop:0"])  # the role chunk, then the connection drops: nothing reached the caller
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key, stream=True)
    assert texts(sse_events(r.text)) == a.pieces and a.chat_requests == 2


def test_a_stall_before_the_first_token_is_503_after_the_timeout(database, tmp_path, key, up):
    a, _ = up
    a.default = "stall_first"
    with aimichat(database, tmp_path, a.url) as live:
        started = time.monotonic()
        r = chat(live, key, stream=True)
        elapsed = time.monotonic() - started
    assert_503_with_retry_after(r, "engine_overloaded")
    assert 1.0 <= elapsed < 4.0
    assert a.chat_requests == 1
    assert_charged_nothing(database)


def test_a_stall_before_the_first_token_fails_over(database, tmp_path, key, up):
    a, b = up
    a.default = "stall_first"
    with aimichat(database, tmp_path, a.url, b.url) as live:
        r = chat(live, key)
    assert r.status_code == 200 and (a.chat_requests, b.chat_requests) == (1, 1)


# -- after the first token: error event, charged what was received -------------------------------


@pytest.mark.parametrize("fault, received", [("stall_mid:3", 3), ("drop:2", 2)])
def test_a_stream_that_breaks_ends_with_an_error_event_and_charges_what_was_received(
    database, tmp_path, key, up, fault, received
):
    a, b = up
    a.default = fault
    with aimichat(database, tmp_path, a.url, b.url) as live:
        r = chat(live, key, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    payloads = sse_events(r.text)
    assert len(texts(payloads)) == received
    assert set(payloads[-2]) == {"error"} and payloads[-2]["error"]["message"]
    assert payloads[-1] == "[DONE]"
    assert b.chat_requests == 0  # too late to fail over: text had reached the caller
    row = ledger(database)[-1]
    assert (row.status, row.completion_tokens) == ("charged", received)
    assert row.credits == estimated_prompt() + received


@pytest.mark.parametrize("fault", ["stall_mid:3", "drop:2"])
def test_a_broken_non_streaming_answer_is_503_and_costs_nothing(database, tmp_path, key, up, fault):
    a, _ = up
    a.default = fault
    with aimichat(database, tmp_path, a.url) as live:
        r = chat(live, key)
    assert_503_with_retry_after(r, "engine_error")
    assert_charged_nothing(database)


# -- the circuit breaker -------------------------------------------------------------------------


def test_breaker_opens_skips_and_closes_after_a_good_probe(database, tmp_path, key, up):
    a, b = up
    a.default = "500"
    with aimichat(
        database, tmp_path, a.url, b.url, upstream_breaker_failures=2, upstream_breaker_cooldown=COOLDOWN
    ) as live:
        assert chat(live, key).status_code == 200  # A fails twice (the retry trips it), B answers
        assert (a.chat_requests, b.chat_requests) == (2, 1)
        tripped, fallback = upstream_states(live)
        assert tripped["state"] == "tripped" and tripped["retry_in"] >= 1 and fallback["state"] == "up"

        assert chat(live, key).status_code == 200
        assert (a.chat_requests, b.chat_requests) == (2, 2)  # skipped while cooling down

        time.sleep(COOLDOWN + 0.1)
        a.default = "ok"
        assert chat(live, key).status_code == 200
        assert (a.chat_requests, b.chat_requests) == (3, 2)  # probed, answered: closed again
        assert upstream_states(live)[0]["state"] == "up"


def test_a_failed_probe_trips_the_breaker_again(database, tmp_path, key, up):
    a, b = up
    a.default = "500"
    with aimichat(
        database, tmp_path, a.url, b.url, upstream_breaker_failures=2, upstream_breaker_cooldown=COOLDOWN
    ) as live:
        assert chat(live, key).status_code == 200
        time.sleep(COOLDOWN + 0.1)
        assert chat(live, key).status_code == 200
        assert a.chat_requests == 3  # one probe, no retry: it has shown it is still broken
        assert upstream_states(live)[0]["state"] == "tripped"


def test_when_every_breaker_is_open_requests_fail_fast(database, tmp_path, key, up):
    a, _ = up
    a.default = "500"
    with aimichat(database, tmp_path, a.url, upstream_breaker_failures=2, upstream_breaker_cooldown=30.0) as live:
        assert_503_with_retry_after(chat(live, key), "engine_error")
        started = time.monotonic()
        r = chat(live, key)
        assert time.monotonic() - started < 1.0  # well under the first-token timeout: A was not called
        error = assert_503_with_retry_after(r, "engine_overloaded")
        assert 1 <= int(r.headers["retry-after"]) <= 30 and error["message"]
        ready = requests.get(f"{live.url}/readyz", timeout=10)
    assert a.chat_requests == 2
    assert ready.status_code == 503 and ready.json()["engine"]["upstreams"][0]["state"] == "tripped"
    assert all(row.status == "released" for row in ledger(database))


# -- the caller goes away ------------------------------------------------------------------------


def test_a_callers_disconnect_closes_the_upstream_connection_within_a_second(database, tmp_path, key, up):
    a, _ = up
    a.default = "trickle"
    with aimichat(database, tmp_path, a.url) as live, httpx.Client(timeout=30) as client:
        body = {"messages": USER, "max_tokens": 5000, "stream": True}
        with client.stream(
            "POST", f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            received = 0
            for line in r.iter_lines():
                received += '"content":" w' in line
                if received == 3:
                    break
            left = time.monotonic()
        assert_upstream_saw_the_hang_up_within_a_second(a, left)
        time.sleep(0.2)  # let the server notice the hang-up
        settled(live)  # the settlement is written after the stream ends
        row = ledger(database)[-1]
    assert row.status == "charged" and 3 <= row.completion_tokens < 100


def test_a_non_streaming_caller_that_hangs_up_closes_the_upstream_and_pays_nothing(database, tmp_path, key, up):
    a, _ = up
    a.default = "trickle"
    with aimichat(database, tmp_path, a.url) as live:
        body = {"messages": USER, "max_tokens": 5000}
        with pytest.raises(httpx.ReadTimeout):  # the caller gives up waiting for the whole answer
            httpx.post(
                f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=1.0
            )
        assert_upstream_saw_the_hang_up_within_a_second(a, time.monotonic())
        time.sleep(0.2)  # let the release land
        row = ledger(database)[-1]
    assert (row.status, row.credits) == ("released", 0)  # it received nothing


def assert_upstream_saw_the_hang_up_within_a_second(upstream, left: float) -> None:
    deadline = left + 5
    while not upstream.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.disconnects, "the upstream never saw its client go away"
    assert upstream.disconnects[0] - left < 1.0


def test_readyz_lists_every_upstream(database, tmp_path, key, up):
    a, _ = up
    with aimichat(database, tmp_path, a.url, dead_url(), "http://user:secret@127.0.0.1:9/v1") as live:
        r = requests.get(f"{live.url}/readyz", timeout=10)
    assert r.status_code == 200
    engine = r.json()["engine"]
    assert engine["engine"] == "upstream" and engine["model"] == "the-model"
    assert [u["state"] for u in engine["upstreams"]] == ["up", "unreachable", "unreachable"]
    assert "secret" not in r.text  # credentials in a URL never reach the public readiness page


def test_sampling_fields_we_do_not_interpret_reach_the_upstream_as_sent(up, database, tmp_path, key):
    a, _ = up
    with aimichat(database, tmp_path, a.url) as live:
        answer = chat(
            live,
            key,
            top_k=7,
            min_p=0.1,
            guided_json={"type": "object"},
            response_format={"type": "json_object"},
            made_up_field="never forwarded",
        )
    assert answer.status_code == 200, answer.text
    sent = a.requests[-1]
    assert (sent["top_k"], sent["min_p"], sent["guided_json"]) == (7, 0.1, {"type": "object"})
    assert sent["response_format"] == {"type": "json_object"} and "made_up_field" not in sent
    assert sent["model"] == "the-model"  # what AimiChat sets is not overridden by a passed-through field
