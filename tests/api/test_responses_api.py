"""``POST /v1/responses`` with the official openai SDK, unchanged, against a real server and the real model:
plain, streamed, with a JSON schema; the same keys, credits, headers and 429 as chat completions."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from fixtures import make_account, make_key, serve_app

SCHEMA = {
    "type": "object",
    "properties": {"yes": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["yes", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    from fixtures import migrated

    tmp = tmp_path_factory.mktemp("responses")
    db = migrated(f"sqlite:///{tmp / 'a.db'}")
    with serve_app(engine, db, tmp) as server:
        make_account(db, daily=100_000)
        server.key = make_key(db)
        server.db = db
        yield server
    db.dispose()


@pytest.fixture
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)


def test_a_plain_response(client):
    response = client.responses.create(
        model="aimichat-1", input="What is the capital of France?", max_output_tokens=16, temperature=0
    )
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    assert response.model == "aimichat-1" and response.id.startswith("resp_")
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 16


def test_instructions_and_items(client):
    response = client.responses.create(
        model="aimichat-1",
        instructions="Answer with one word.",
        input=[
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "input_text", "text": "Again."}]},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert response.output[0].type == "message" and response.output_text


def test_a_streamed_response_has_the_documented_events(client):
    stream = client.responses.create(
        model="aimichat-1", input="Count to three.", max_output_tokens=16, temperature=0, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if kinds[-1] == "response.completed" else "response.incomplete",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas and final.usage.output_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_json_schema_response_validates(client):
    response = client.responses.create(
        model="aimichat-1",
        input="Is the sky blue? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


def test_same_credits_headers_and_429(live):
    make_account(live.db, "poor@example.com", daily=1)
    key = make_key(live.db, "poor@example.com")
    body = {"model": "aimichat-1", "input": "Hi", "max_output_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    first = httpx.post(live.url + "/v1/responses", json=body, headers=headers, timeout=60)
    assert first.status_code == 200 and first.headers["X-RateLimit-Remaining"] == "0"
    second = httpx.post(live.url + "/v1/responses", json=body, headers=headers, timeout=60)
    assert second.status_code == 429 and second.json()["message"] == "Daily credit limit reached"
    assert "Retry-After" in second.headers


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input"),
        ({"max_output_tokens": "5"}, "max_output_tokens"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_it(live, extra, param):
    body = {"model": "aimichat-1", "input": "Hi", **extra}
    answer = httpx.post(live.url + "/v1/responses", json=body, headers={"X-API-Key": live.key}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
