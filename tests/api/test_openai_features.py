"""The official openai SDK, unchanged, against AimiChat on the real embedded model behind a real socket:
structured output (``chat.completions.parse``), tools (a whole tool loop, streamed and not; a named choice),
log probabilities in both shapes, ``n`` choices, and what each of them is charged.

The session's one-slot ``engine`` answers most tests; ``n`` needs a slot per choice, so the n tests run on an
engine of their own with three. Answers are short (small ``max_tokens``, bounded schemas) and greedy where
an answer is compared with another: a grammar-constrained token costs about twice a free one here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from sqlalchemy import select

from aimichat.accounts import service as accounts
from aimichat.config import Settings
from aimichat.engines.llama import LlamaEngine
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from fixtures import LiveServer, make_account, make_key, migrated, serve_app, settled

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
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
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who loves tea."}]


class City(BaseModel):
    """Bounded fields only: a 135M model's free strings can run past any small budget."""

    name: str = Field(max_length=20)
    country: Literal["France", "Japan", "Peru"]
    capital: bool


class Census(BaseModel):
    """Numeric bounds, as Pydantic writes them (``minimum`` / ``maximum``)."""

    city: Literal["Paris", "Lima"]
    population_millions: int = Field(ge=0, le=50)


# -- servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(engine: LlamaEngine, db: Database, tmp: Path, email: str) -> Iterator[LiveServer]:
    """AimiChat on ``engine`` behind a real socket, with an account charged one credit a token and its key."""
    with serve_app(engine, db, tmp) as server:
        make_account(db, email, daily=1_000_000, cost_rule="per_token", per_1k=1000)
        server.key = make_key(db, email)
        yield server


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    """The session's one-slot model behind a real socket (SQLite)."""
    tmp = tmp_path_factory.mktemp("openai_features")
    db = migrated(f"sqlite:///{tmp / 'aimichat.db'}")
    with serving(engine, db, tmp, "sdk@example.com") as server:
        yield server
    db.dispose()


@pytest.fixture(scope="module")
def three_slots():
    """The model with three slots, so that n=3 decodes its choices side by side."""
    engine = LlamaEngine(slots=3, context_length=512, threads=2, system_prompt=Settings().system_prompt)
    engine.load()
    yield engine
    engine.shutdown()


def sdk(server: LiveServer, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=key or server.key, max_retries=0, http_client=server.client()
    )


def ledger(db: Database) -> list[UsageEvent]:
    with db.session() as s:
        return list(s.scalars(select(UsageEvent).order_by(UsageEvent.id)))


# -- checks --------------------------------------------------------------------------------------


def check_call(name: str, arguments: str) -> dict[str, Any]:
    """A call of one of the offered functions whose arguments are valid for its parameters."""
    assert name in PARAMETERS, name
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, PARAMETERS[name])
    return {"name": name, "arguments": parsed}


def joined_stream_calls(chunks: list[Any]) -> tuple[list[dict[str, Any]], str | None, str]:
    """The calls a stream's pieces join to, its finish reason and its text. The first piece of each call
    carries its id, type and name (OpenAI's shape); the later pieces carry arguments only."""
    calls: dict[int, dict[str, Any]] = {}
    finish, text = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.id.startswith("call_") and piece.type == "function", piece
                    assert piece.function.name, piece
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and piece.function.name is None, piece
                calls[piece.index]["arguments"] += piece.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)], finish, text


def check_logprobs(entries: list[Any], content: str) -> None:
    """Three alternatives a token, best first, every log probability at most 0, and the tokens join to the text."""
    assert entries
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        best = [alt.logprob for alt in entry.top_logprobs]
        assert best == sorted(best, reverse=True) and all(lp <= 0 for lp in best)
        assert best[0] >= entry.logprob  # the likeliest token is at least as likely as the one picked
        assert sum(2.718281828459045**lp for lp in best) <= 1 + 1e-6
        assert bytes(entry.bytes) == entry.token.encode("utf-8") or "\ufffd" in entry.token
    assert b"".join(bytes(entry.bytes) for entry in entries) == content.encode("utf-8")


# -- structured output ---------------------------------------------------------------------------


def parse(server: LiveServer, model: type[BaseModel], prompt: str) -> Any:
    return sdk(server).chat.completions.parse(
        model="aimichat-1",
        messages=[{"role": "user", "content": prompt}],
        response_format=model,
        temperature=0,
        max_tokens=60,
    )


def test_parse_with_a_pydantic_model(live):
    choice = parse(live, City, "Describe the capital of France as JSON.").choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    jsonschema.validate(json.loads(choice.message.content), City.model_json_schema())


def test_parse_honours_numeric_bounds(live):
    """``minimum`` and ``maximum`` must constrain the answer too: llama-cpp-python's schema converter skips
    them (a TODO in llama_grammar.py), so an unconstrained integer ran to 1234567890 here."""
    choice = parse(live, Census, "How many millions of people live in Paris? Answer as JSON.").choices[0]
    assert choice.finish_reason == "stop"
    assert 0 <= choice.message.parsed.population_millions <= 50


# -- tools ---------------------------------------------------------------------------------------


def test_a_tool_loop_with_required_then_none_streamed_and_not(live):
    client = sdk(live)
    ask = {"model": "aimichat-1", "tools": TOOLS, "temperature": 0}
    first = client.chat.completions.create(messages=ASK_WEATHER, tool_choice="required", max_tokens=60, **ask)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [check_call(call.function.name, call.function.arguments) for call in choice.message.tool_calls]
    assert calls and all(call.id.startswith("call_") for call in choice.message.tool_calls)

    chunks = list(
        client.chat.completions.create(messages=ASK_WEATHER, tool_choice="required", max_tokens=60, stream=True, **ask)
    )
    streamed, finish, text = joined_stream_calls(chunks)
    assert finish == "tool_calls" and text == ""
    # The same request, greedy: the streamed pieces join to the very calls the whole answer holds.
    assert [check_call(call["name"], call["arguments"]) for call in streamed] == calls

    history = [
        *ASK_WEATHER,
        choice.message.model_dump(exclude_none=True, exclude={"parsed"}),
        *(
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "degrees": 21})}
            for call in choice.message.tool_calls
        ),
    ]
    final = client.chat.completions.create(messages=history, tool_choice="none", max_tokens=16, **ask)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert answer.message.content.strip()
    again = list(
        client.chat.completions.create(messages=history, tool_choice="none", max_tokens=16, stream=True, **ask)
    )
    calls_again, finish_again, text_again = joined_stream_calls(again)
    assert calls_again == [] and finish_again == answer.finish_reason and text_again == answer.message.content


def test_a_named_tool_choice_calls_that_function(live):
    completion = sdk(live).chat.completions.create(
        model="aimichat-1",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=40,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [call.function.name for call in choice.message.tool_calls] == ["get_time"] * len(choice.message.tool_calls)
    for call in choice.message.tool_calls:
        check_call(call.function.name, call.function.arguments)


def test_required_always_gives_one_valid_call_even_when_sampling_an_unrelated_question(live):
    """The grammar, not the model's judgement, makes the call: a question no tool answers, sampled at
    temperature 1, still gets exactly one call (``parallel_tool_calls: false``) with valid arguments."""
    client = sdk(live)
    for seed in (1, 2):
        completion = client.chat.completions.create(
            model="aimichat-1",
            messages=[{"role": "user", "content": "Tell me a joke about cats."}],
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        check_call(call.function.name, call.function.arguments)


# -- log probabilities ---------------------------------------------------------------------------


def test_logprobs_with_three_alternatives_in_both_shapes(live):
    client = sdk(live)
    body = {
        "model": "aimichat-1",
        "messages": [{"role": "user", "content": "Name three fruits."}],
        "temperature": 0,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = client.chat.completions.create(**body)
    choice = whole.choices[0]
    check_logprobs(choice.logprobs.content, choice.message.content)
    assert len(choice.logprobs.content) == whole.usage.completion_tokens  # one entry per generated token

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    entries = [entry for c in chunks for ch in c.choices if ch.logprobs for entry in ch.logprobs.content or []]
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    for chunk in chunks:  # every piece of text comes with the log probabilities of its tokens
        for ch in chunk.choices:
            if ch.delta.content:
                assert ch.logprobs and ch.logprobs.content, chunk
    check_logprobs(entries, text)
    assert text == choice.message.content
    assert [e.token for e in entries] == [e.token for e in choice.logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in choice.logprobs.content], abs=1e-4)
    assert len(entries) == chunks[-1].usage.completion_tokens


# -- n choices -----------------------------------------------------------------------------------


@pytest.fixture
def n_server(three_slots, database, tmp_path):
    """The three-slot model over ``database`` (SQLite, then PostgreSQL: the charges are what is checked)."""
    with serving(three_slots, database, tmp_path, "choices@example.com") as server:
        yield server


def test_n_3_gives_three_choices_and_is_charged_for_all_of_them(n_server):
    client = sdk(n_server)
    body = {"model": "aimichat-1", "messages": STORY, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    whole = client.chat.completions.create(n=3, logprobs=True, **body)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in whole.choices)
    assert len({c.message.content for c in whole.choices}) > 1  # each choice samples on its own
    per_choice = [len(c.logprobs.content) for c in whole.choices]  # one entry a generated token
    assert whole.usage.completion_tokens == sum(per_choice) > 6

    chunks = list(
        client.chat.completions.create(n=3, logprobs=True, stream=True, stream_options={"include_usage": True}, **body)
    )
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert sorted(finishes) == [0, 1, 2]
    streamed = [0, 0, 0]
    for chunk in chunks:
        for ch in chunk.choices:
            streamed[ch.index] += len(ch.logprobs.content) if ch.logprobs and ch.logprobs.content else 0
    usage = chunks[-1].usage
    assert usage.completion_tokens == sum(streamed) > 6

    # One credit a token: the prompt once, every choice's tokens; every choice was reserved for.
    settled(n_server)
    rows = ledger(n_server.db)
    assert [r.status for r in rows] == ["charged", "charged"]
    for row, answer in zip(rows, (whole.usage, usage), strict=True):
        assert (row.prompt_tokens, row.completion_tokens) == (answer.prompt_tokens, answer.completion_tokens)
        assert row.credits == answer.prompt_tokens + answer.completion_tokens
        assert row.reserved_credits == answer.prompt_tokens + 3 * 6


def test_n_above_the_tiers_cap_is_400_and_charges_nothing(three_slots, tmp_path):
    db = migrated(f"sqlite:///{tmp_path / 'aimichat.db'}")
    with serve_app(three_slots, db, tmp_path) as server:
        make_account(db, "capped@example.com", tier="capped", daily=1000)
        with db.session() as s:
            accounts.set_tier_limits(s, "capped", max_n=2)
            s.commit()
        client = sdk(server, make_key(db, "capped@example.com"))
        body = {"model": "aimichat-1", "messages": STORY, "max_tokens": 4}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(n=3, **body)
        error = refused.value.body
        assert (error["code"], error["param"]) == ("invalid_value", "n") and "at most 2" in error["message"]
        assert len(client.chat.completions.create(n=2, **body).choices) == 2
        settled(server)
        assert [r.status for r in ledger(db)] == ["charged"]
    db.dispose()


def test_n_above_the_models_slots_is_400_not_a_retryable_503(live):
    """The session's model has one slot: n=2 is within the tier's cap (4) but the engine cannot decode two
    choices at once. That is the request's limit on this model, not a failure worth retrying."""
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(live).chat.completions.create(model="aimichat-1", messages=STORY, max_tokens=4, n=2)
    assert refused.value.body["param"] == "n"


# -- what a tool call costs ----------------------------------------------------------------------


def test_a_tool_calls_tokens_are_charged_like_text(live):
    before = len(ledger(live.db))
    client = sdk(live)
    called = client.chat.completions.create(
        model="aimichat-1",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        logprobs=True,
    )
    text = client.chat.completions.create(
        model="aimichat-1", messages=ASK_WEATHER, temperature=0, max_tokens=12, logprobs=True
    )
    for completion in (called, text):
        # Every generated token counts, the call's own markup (<tool_call>, its name) included.
        assert completion.usage.completion_tokens == len(completion.choices[0].logprobs.content) > 0
    assert called.choices[0].finish_reason == "tool_calls"
    settled(live)
    rows = ledger(live.db)[before:]
    assert [r.status for r in rows] == ["charged", "charged"]
    for row, completion in zip(rows, (called, text), strict=True):
        assert row.completion_tokens == completion.usage.completion_tokens
        assert row.credits == completion.usage.prompt_tokens + completion.usage.completion_tokens
