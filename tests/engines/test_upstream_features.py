"""Upstream models get the whole OpenAI request and give back the whole answer.

A recording upstream (a raw ASGI app on a real socket) sits behind AimiChat: what the caller sends (tools,
tool_choice, n, logprobs, images, sampling fields AimiChat does not interpret) reaches it as sent, and what
it answers (tool calls, log probabilities, refusals, reasoning, two choices with their own finish reasons)
reaches the caller as it was sent, streamed and not. Then a real llama.cpp server (llama-cpp-python's, as in
test_upstream_peer.py) gives the same tool call and the same JSON through AimiChat as when called directly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import requests
from sqlalchemy import select
from test_upstream_peer import peer, serve_upstream  # noqa: F401 (``peer`` is a fixture)

from aimichat.config import Settings
from aimichat.engines.configs import build_engine
from aimichat.registry import service as registry
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from fixtures import AppClient, LiveServer, app_client, make_account, make_key, migrated, sse_events
from scripted_engine import ScriptedEngine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
            "required": ["zone"],
        },
    },
}

# What a caller sends: everything that must reach the upstream as is.
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture, and what is the weather there?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        ],
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": '{"sky": "clear"}'},
]
FIELDS = {
    "tools": [WEATHER, CLOCK],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "n": 2,
    "logprobs": True,
    "top_logprobs": 2,
    "temperature": 0.5,
    "seed": 3,
    "max_tokens": 50,
    # Sampling fields of vLLM, llama.cpp and Ollama that AimiChat passes on without reading them.
    "top_k": 20,
    "min_p": 0.1,
    "repetition_penalty": 1.05,
    "guided_json": {"type": "object", "properties": {"city": {"type": "string"}}},
}

# What the upstream answers: choice 0 thinks, says a word with its log probabilities and calls a tool (its
# arguments in pieces); choice 1 refuses. Each ends with its own finish reason.
LOGPROBS = [
    {
        "token": "Sure",
        "logprob": -0.25,
        "bytes": [83, 117, 114, 101],
        "top_logprobs": [
            {"token": "Sure", "logprob": -0.25, "bytes": [83, 117, 114, 101]},
            {"token": "OK", "logprob": -1.75, "bytes": [79, 75]},
        ],
    },
    {
        "token": "!",
        "logprob": -0.5,
        "bytes": [33],
        "top_logprobs": [
            {"token": "!", "logprob": -0.5, "bytes": [33]},
            {"token": ".", "logprob": -1.0, "bytes": [46]},
        ],
    },
]
CALL_PIECES = [
    {"index": 0, "id": "call_up_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
]
UPSTREAM_USAGE = {"prompt_tokens": 57, "completion_tokens": 14, "total_tokens": 71}
ANSWER: list[tuple[int, dict[str, Any], dict[str, Any] | None, str | None]] = [  # (choice, delta, logprobs, finish)
    (0, {"role": "assistant", "content": ""}, None, None),
    (1, {"role": "assistant", "content": ""}, None, None),
    (0, {"reasoning_content": "Let me "}, None, None),
    (1, {"refusal": "I cannot "}, None, None),
    (0, {"reasoning_content": "think."}, None, None),
    (0, {"content": "Sure"}, {"content": LOGPROBS[:1]}, None),
    (1, {"refusal": "help with that."}, None, None),
    (0, {"content": "!"}, {"content": LOGPROBS[1:]}, None),
    *((0, {"tool_calls": [piece]}, None, None) for piece in CALL_PIECES),
    (1, {}, None, "stop"),
    (0, {}, None, "tool_calls"),
]


class RecordingUpstream:
    """An OpenAI-compatible server that records each chat request's body and streams ``ANSWER``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"].endswith("/models"):
            await self._send(send, "application/json", [json.dumps({"object": "list", "data": []})])
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(json.loads(body))
        events = [_chunk(index, delta, logprobs, finish) for index, delta, logprobs, finish in ANSWER]
        events.append({"id": "up", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": []})
        events[-1]["usage"] = UPSTREAM_USAGE
        await self._send(send, "text/event-stream", [*(json.dumps(e) for e in events), "[DONE]"])

    @staticmethod
    async def _send(send, kind: str, payloads: list[str]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind.encode())]})
        for payload in payloads:
            data = f"data: {payload}\n\n" if kind == "text/event-stream" else payload
            await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": "up", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}


@pytest.fixture(scope="module", params=["aiohttp", "httpx"])
def recorded(request, tmp_path_factory) -> Iterator[tuple[RecordingUpstream, AppClient]]:
    """The recording upstream as the model ``vision`` (marked multimodal) of an AimiChat over SQLite, with an
    account charged one credit a token (``.key``); once over each HTTP client of the engine (they must agree)."""
    upstream = RecordingUpstream()
    tmp = tmp_path_factory.mktemp("upstream_features")
    db = migrated(f"sqlite:///{tmp / 'aimichat.db'}")
    settings = Settings(upstream_http=request.param)
    with LiveServer(upstream) as live:
        with db.session() as s:
            registry.add_upstream(s, "vision", f"{live.url}/v1", upstream_model="vision-7b", multimodal=True)
            registry.add_upstream(s, "picky", f"{live.url}/v1", strip_fields="top_k,seed", refuse_fields="guided_json")
            s.commit()

        def factory(spec, threads):
            return build_engine(spec.name, spec.config, settings, threads=threads)

        with app_client(ScriptedEngine(), db, tmp, engine_factory=factory) as client:
            make_account(db, "up@example.com", daily=100_000, cost_rule="per_token", per_1k=1000)
            client.key = make_key(db, "up@example.com")
            yield upstream, client
    db.dispose()


def ledger(db: Database) -> list[UsageEvent]:
    with db.session() as s:
        return list(s.scalars(select(UsageEvent).order_by(UsageEvent.id)))


def refused_with(response: httpx.Response) -> tuple[int, str, str]:
    """The status, code and param of an error answer (OpenAI's shape)."""
    error = response.json()["error"]
    return response.status_code, error["code"], error["param"]


@pytest.mark.parametrize("stream", [False, True])
def test_what_the_caller_sends_reaches_the_upstream_as_sent(recorded, stream):
    upstream, client = recorded
    sent = {"model": "vision", "messages": copy.deepcopy(MESSAGES), **copy.deepcopy(FIELDS), "stream": stream}
    answer = client.chat({**sent, "frobnicate": True}, client.key)
    assert answer.status_code == 200, answer.text
    got = upstream.requests[-1]
    assert got["model"] == "vision-7b"  # the upstream's own name for the model
    assert got["messages"] == MESSAGES
    assert {name: got.get(name) for name in FIELDS} == FIELDS
    assert "frobnicate" not in got  # a field nobody knows to be a sampling option is not forwarded


def test_a_models_settings_strip_or_refuse_named_fields_and_images_need_a_multimodal_model(recorded):
    upstream, client = recorded
    text_only = [MESSAGES[0], {"role": "user", "content": "Hello"}]
    sent = {"model": "picky", "messages": text_only, "top_k": 20, "seed": 3, "min_p": 0.1, "max_tokens": 5}
    assert client.chat(sent, client.key).status_code == 200
    got = upstream.requests[-1]
    assert "top_k" not in got and "seed" not in got and got["min_p"] == 0.1

    count, rows = len(upstream.requests), len(ledger(client.db))
    refused = client.chat({**sent, "guided_json": {"type": "object"}}, client.key)
    assert refused_with(refused) == (400, "unsupported_parameter", "guided_json")
    image = client.chat({**sent, "messages": MESSAGES[:2]}, client.key)  # "picky" is not marked multimodal
    assert refused_with(image) == (400, "unsupported_content", "messages")
    assert (len(upstream.requests), len(ledger(client.db))) == (count, rows)  # refused before anything ran


def test_the_upstreams_answer_reaches_the_caller_unchanged(recorded):
    _, client = recorded
    answer = client.chat({"model": "vision", "messages": MESSAGES, **FIELDS}, client.key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    first, second = body["choices"]
    assert (first["index"], first["finish_reason"]) == (0, "tool_calls")
    assert first["message"]["reasoning_content"] == "Let me think."
    assert first["message"]["content"] == "Sure!"
    assert first["message"]["tool_calls"] == [
        {"id": "call_up_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert first["logprobs"] == {"content": LOGPROBS}
    assert (second["index"], second["finish_reason"]) == (1, "stop")
    assert second["message"]["refusal"] == "I cannot help with that."
    assert not second["message"]["content"] and "tool_calls" not in second["message"]
    assert body["usage"] == UPSTREAM_USAGE
    row = ledger(client.db)[-1]  # charged from the upstream's usage, one credit a token
    assert (row.status, row.credits, row.estimated) == ("charged", UPSTREAM_USAGE["total_tokens"], False)


def test_the_upstreams_stream_reaches_the_caller_unchanged(recorded):
    _, client = recorded
    body = {
        "model": "vision",
        "messages": MESSAGES,
        **FIELDS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = client.chat(body, client.key)
    assert answer.status_code == 200, answer.text
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    pieces: dict[int, dict[str, list[Any]]] = {0: {}, 1: {}}
    finishes = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            mine = pieces[choice["index"]]
            for name, value in choice["delta"].items():
                if value not in ("", None) and name != "role":
                    mine.setdefault(name, []).append(value)
            if choice["logprobs"]:
                mine.setdefault("logprobs", []).append(choice["logprobs"]["content"])
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert pieces[0] == {
        "reasoning_content": ["Let me ", "think."],
        "content": ["Sure", "!"],
        "logprobs": [LOGPROBS[:1], LOGPROBS[1:]],
        "tool_calls": [[piece] for piece in CALL_PIECES],  # OpenAI's pieces, each as the upstream sent it
    }
    assert pieces[1] == {"refusal": ["I cannot ", "help with that."]}
    assert finishes == {0: "tool_calls", 1: "stop"}
    assert chunks[-1]["usage"] == UPSTREAM_USAGE


# -- a real llama.cpp server -----------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}  # sent, so both prompts are the same


@pytest.fixture(scope="module")
def fronted(peer, tmp_path_factory) -> Iterator[LiveServer]:  # noqa: F811 (``peer`` is a fixture)
    """AimiChat in upstream mode in front of the llama.cpp server, with an account and its key."""
    tmp: Path = tmp_path_factory.mktemp("upstream_features_peer")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_upstream(db, tmp, peer) as live:
        make_account(db, "peer@example.com", daily=100_000)
        live.key = make_key(db, "peer@example.com")
        yield live
    db.dispose()


def both_ways(peer: str, server: LiveServer, body: dict[str, Any]) -> tuple[dict, dict, list[dict]]:  # noqa: F811
    """The peer's own answer, AimiChat's answer and AimiChat's stream to the same request.

    llama-cpp-python reads a repeated prompt's last token again alone, which can move a near tie: another
    prompt before each request makes it read all three alike (see test_upstream_peer.py)."""

    def other_prompt() -> None:
        other = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        assert httpx.post(f"{peer}/chat/completions", json=other, timeout=60).status_code == 200

    other_prompt()
    direct = httpx.post(f"{peer}/chat/completions", json=body, timeout=120)
    assert direct.status_code == 200, direct.text
    headers = {"Authorization": f"Bearer {server.key}"}
    other_prompt()
    through = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert through.status_code == 200, through.text
    other_prompt()
    streamed = requests.post(
        f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=120
    )
    assert streamed.status_code == 200, streamed.text
    chunks = [e for e in sse_events(streamed.text) if isinstance(e, dict)]
    return direct.json(), through.json(), chunks


def test_a_real_llama_cpp_server_makes_the_same_named_tool_call_through_aimichat(peer, fronted):  # noqa: F811
    body = {
        "messages": [SYSTEM, {"role": "user", "content": "What time is it in Tokyo?"}],
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "temperature": 0,
        "top_p": 1.0,
        "max_tokens": 30,
    }
    direct, through, chunks = both_ways(peer, fronted, body)
    [call] = direct["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), CLOCK["function"]["parameters"])

    choice = through["choices"][0]
    assert choice["finish_reason"] == direct["choices"][0]["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["function"] for c in calls] == [call["function"]]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)

    # The stream passes on the server's pieces as it sent them (llama-cpp-python repeats id and name in each).
    pieces = [p for c in chunks for ch in c["choices"] for p in ch["delta"].get("tool_calls") or []]
    assert pieces and {p["function"]["name"] for p in pieces} == {"get_time"}
    assert "".join(p["function"]["arguments"] for p in pieces) == call["function"]["arguments"]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["tool_calls"]


def test_a_real_llama_cpp_server_gives_the_same_json_through_aimichat(peer, fronted):  # noqa: F811
    schema = {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}, "daylight": {"type": "boolean"}},
        "required": ["zone", "daylight"],
    }
    body = {
        "messages": [SYSTEM, {"role": "user", "content": "Which time zone is Tokyo in? Answer in JSON."}],
        "response_format": {"type": "json_object", "schema": schema},
        "temperature": 0,
        "top_p": 1.0,
        "max_tokens": 40,
    }
    direct, through, chunks = both_ways(peer, fronted, body)
    text = direct["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), schema)
    assert through["choices"][0]["message"]["content"] == text
    assert "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) == text
