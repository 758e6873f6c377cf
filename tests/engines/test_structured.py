"""Structured output on the embedded model: a llama.cpp grammar per slot, built from the JSON schema, so
every complete answer parses and validates, and constrained requests leave the others' answers alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from aimichat.config import Settings
from aimichat.engines.llama import LlamaEngine
from fixtures import app_client, make_account, make_key, migrated, sse_events, sse_text

TEXT = {"type": "string", "maxLength": 24}  # bounded, so every answer can finish within its max_tokens
PERSON = {
    "type": "object",
    "properties": {"name": TEXT, "age": {"type": "integer", "maximum": 150}, "city": TEXT},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
COLOR = {"enum": ["red", "green", "blue", "black", "white"]}
SCHEMAS = [  # bounded (enums, numbers, short arrays): a 135M model's free strings can run past any budget
    {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": COLOR, "maxItems": 3}},
        "required": ["colors"],
    },
    {"type": "object", "properties": {"yes": {"type": "boolean"}, "color": COLOR}, "required": ["yes", "color"]},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 99}, "unit": {"enum": ["km", "mi"]}},
        "required": ["n", "unit"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def batching(tmp_path_factory):
    """A batching engine of 4 slots (the session's engine has one), with an app and a key over SQLite."""
    engine = LlamaEngine(slots=4, context_length=1024, threads=2, system_prompt=Settings().system_prompt)
    engine.load()
    tmp = tmp_path_factory.mktemp("structured")
    db = migrated(f"sqlite:///{tmp / 'a.db'}")
    with app_client(engine, db, tmp) as client:
        make_account(db, daily=100_000)
        client.key = make_key(db)
        yield client
    engine.shutdown()
    db.dispose()


def ask(client, body: dict) -> dict:
    answer = client.chat({"temperature": 0, "max_tokens": 120, **body}, client.key)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_json_schema_answer_validates(batching):
    body = {"messages": [{"role": "user", "content": "Invent a person."}], "response_format": schema_format(PERSON)}
    data = ask(batching, body)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_json_object_mode_gives_an_object(batching):
    prompt = "Reply in JSON: an object whose key 'animal' names one animal."
    body = {"messages": [{"role": "user", "content": prompt}], "response_format": {"type": "json_object"}}
    choice = ask(batching, {**body, "max_tokens": 300})["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_streamed_json_schema_answer_validates(batching):
    body = {
        "messages": [{"role": "user", "content": "Invent a person."}],
        "response_format": schema_format(PERSON),
        "stream": True,
        "temperature": 0,
        "max_tokens": 120,
    }
    answer = batching.chat(body, batching.key)
    jsonschema.validate(json.loads(sse_text(sse_events(answer.text))), PERSON)


def test_a_cut_answer_ends_with_length(batching):
    body = {"messages": [{"role": "user", "content": "Invent a person."}], "response_format": schema_format(PERSON)}
    assert ask(batching, {**body, "max_tokens": 3})["choices"][0]["finish_reason"] == "length"


def test_constrained_requests_do_not_change_plain_answers_beside_them(batching):
    plain = [{"messages": [{"role": "user", "content": f"Count to {n}."}], "max_tokens": 24} for n in (3, 4, 5, 6)]
    alone = [ask(batching, body)["choices"][0]["message"]["content"] for body in plain]
    constrained = [
        {"messages": [{"role": "user", "content": f"Answer number {i}."}], "response_format": schema_format(schema)}
        for i, schema in enumerate(SCHEMAS * 2)
    ]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda body: ask(batching, body), constrained + plain))
    for body, data in zip(constrained, results, strict=False):
        schema = body["response_format"]["json_schema"]["schema"]
        assert data["choices"][0]["finish_reason"] == "stop", data["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(data["choices"][0]["message"]["content"]), schema)
    assert [data["choices"][0]["message"]["content"] for data in results[len(constrained) :]] == alone


def test_llama_cpp_servers_json_object_with_a_schema_is_honoured_too(batching):
    body = {
        "messages": [{"role": "user", "content": "Pick a color."}],
        "response_format": {"type": "json_object", "schema": SCHEMAS[1]},
    }
    jsonschema.validate(json.loads(ask(batching, body)["choices"][0]["message"]["content"]), SCHEMAS[1])
