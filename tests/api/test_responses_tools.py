"""Function tools in ``POST /v1/responses``.

- The item mapping (Responses input items and tools to the chat request) as plain function calls.
- The reshaping of a chat answer with tool calls into ``function_call`` output items and OpenAI's event
  sequence, in-process, against an engine that answers with scripted tool calls (exact and fast).
- The official openai SDK, unchanged, against a real server and the real model: a call with
  ``tool_choice="required"`` (non-streamed, then streamed with the SDK's helper), and the second turn that
  sends the call and its output back and gets text.
- What cannot be honoured is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import ValidationError

from aimichat.api.openai_responses.protocol import ResponsesRequest, chat_messages
from aimichat.engines.base import Delta, Event, Finish, PreparedPrompt, SamplingParams
from fixtures import AppClient, app_client, make_account, make_key, migrated, new_postgres_database, serve_app
from scripted_engine import ScriptedEngine

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": WEATHER,
    "strict": True,
}


# -- the item mapping, without the model -----------------------------------------------------------


def chat_body(**fields: Any) -> dict[str, Any]:
    """The chat request a Responses request becomes, as JSON."""
    request = ResponsesRequest.model_validate({"model": "aimichat-1", "input": "Hi", **fields})
    return request.chat_request().model_dump(exclude_none=True)


def call_item(call_id: str, name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def output_item(call_id: str, output: Any = "18C") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def test_function_calls_and_outputs_become_assistant_tool_calls_and_tool_messages():
    messages = chat_messages(
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            call_item("call_1"),
            {**call_item("call_2", arguments='{"city": "Rome"}'), "id": "fc_2", "status": "completed"},
            output_item("call_1"),
            output_item("call_2", [{"type": "input_text", "text": "21"}, {"type": "input_text", "text": "C"}]),
            {"role": "user", "content": "Thanks."},
        ]
    )
    assert messages == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [  # consecutive calls: one assistant message
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
        {"role": "user", "content": "Thanks."},
    ]


def test_a_call_joins_the_assistant_text_before_it_and_calls_apart_stay_apart():
    messages = chat_messages(
        [
            {"role": "user", "content": "Paris?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
            call_item("call_1"),
            output_item("call_1"),
            call_item("call_2"),
        ]
    )
    assert [(m["role"], m.get("content"), len(m.get("tool_calls", []))) for m in messages] == [
        ("user", "Paris?", 0),
        ("assistant", "Let me look.", 1),
        ("tool", "18C", 0),
        ("assistant", None, 1),  # after a tool message: a new assistant turn
    ]


def test_tools_and_tool_choice_map_to_the_chat_shape():
    body = chat_body(
        tools=[WEATHER_TOOL, {"type": "function", "name": "now"}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        input=[{"role": "user", "content": "Paris?"}, call_item("c"), output_item("c")],
    )
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather in a city.",
                "parameters": WEATHER,
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1]["tool_calls"][0]["id"] == "c" and body["messages"][2]["role"] == "tool"
    assert chat_body(tools=[WEATHER_TOOL], tool_choice="required")["tool_choice"] == "required"
    assert "tools" not in chat_body() and "tool_choice" not in chat_body()


BAD = [
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
    ({"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools", "'file_search'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not nested under 'function'"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name", "letters, digits"),
    ({"tools": [{"type": "function", "name": "f", "parameters": 3}]}, "tools.0.parameters", "dictionary"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice", "'g' is not among"),
    (
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "allowed_tools", "tools": []}},
        "tool_choice",
        "'allowed_tools'",
    ),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice", "'required'"),
    ({"tool_choice": "required"}, "tool_choice", "needs at least one tool"),
    ({"tools": [WEATHER_TOOL], "parallel_tool_calls": "no"}, "parallel_tool_calls", "boolean"),
    ({"input": [output_item("call_9")]}, "input", "no function_call item with call_id 'call_9'"),
    ({"input": [output_item("call_9"), call_item("call_9")]}, "input", "comes before"),
    ({"input": [call_item("c", arguments="{not json")]}, "input", "JSON text"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input", "'name'"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input", "'call_id'"),
    ({"input": [call_item("c"), output_item("c", {"x": 1})]}, "input", "'output'"),
    ({"input": [call_item("c"), output_item("c", [{"type": "input_image"}])]}, "input", "input_text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "not 'reasoning'"),
]


@pytest.mark.parametrize("fields, param, words", BAD)
def test_what_cannot_map_is_refused_naming_it(fields, param, words):
    with pytest.raises(ValidationError) as caught:
        chat_body(**fields)
    error = caught.value.errors()[0]
    assert (error.get("ctx") or {}).get("param", ".".join(map(str, error["loc"]))) == param
    assert words in error["msg"]


# -- the reshaping, in-process, with scripted tool calls ---------------------------------------------


class CallingEngine(ScriptedEngine):
    """Answers every request with ``events``: text and tool-call pieces as the chat service streams them."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.prompts: list[PreparedPrompt] = []

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncIterator[Event]:
        self.prompts.append(prompt)
        for event in self.events:
            if isinstance(event, Finish):
                yield Finish(event.finish_reason, prompt.prompt_tokens, event.completion_tokens)
            else:
                yield event


def call_pieces(index: int, call_id: str, name: str, *arguments: str) -> list[Delta]:
    first = Delta("", 1, tool_calls=({"index": index, "id": call_id, "type": "function",
                                      "function": {"name": name, "arguments": ""}},))  # fmt: skip
    return [first] + [Delta("", 1, tool_calls=({"index": index, "function": {"arguments": a}},)) for a in arguments]


TEXT_AND_TWO_CALLS: list[Event] = [
    Delta("Checking", 1),
    Delta(" both.", 1),
    *call_pieces(0, "call_a", "get_weather", '{"city": ', '"Paris"}'),
    *call_pieces(1, "call_b", "get_weather", '{"city": "Rome"}'),
    Finish("tool_calls", 0, 7),
]


@pytest.fixture(scope="module")
def calling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppClient, CallingEngine]]:
    """The in-process app on PostgreSQL (the real model's server below runs on SQLite: both stores are used,
    and nothing here depends on which one), answered by a CallingEngine."""
    tmp = tmp_path_factory.mktemp("tools")
    url, drop = new_postgres_database()
    db = migrated(url)
    engine = CallingEngine()
    with app_client(engine, db, tmp) as client:
        make_account(db, daily=100_000)
        client.key = make_key(db)
        yield client, engine
    db.dispose()
    drop()


def sdk_for(client: AppClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.url}/v1", api_key=client.key, max_retries=0, http_client=client.client())


def test_calls_become_function_call_items_after_the_message(calling):
    client, engine = calling
    engine.events = TEXT_AND_TWO_CALLS
    response = sdk_for(client).responses.create(
        model="aimichat-1", input="Weather in Paris and Rome?", tools=[WEATHER_TOOL], tool_choice="auto"
    )
    assert response.status == "completed" and response.output_text == "Checking both."
    message, first, second = response.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert [(c.type, c.call_id, c.name, c.arguments, c.status) for c in (first, second)] == [
        ("function_call", "call_a", "get_weather", '{"city": "Paris"}', "completed"),
        ("function_call", "call_b", "get_weather", '{"city": "Rome"}', "completed"),
    ]
    assert first.id.startswith("fc_") and second.id.startswith("fc_") and first.id != second.id
    assert response.tools[0].name == "get_weather" and response.tools[0].parameters == WEATHER
    assert response.tools[0].strict is True and response.tool_choice == "auto" and response.parallel_tool_calls
    assert response.usage.output_tokens == 7


def test_an_answer_of_calls_only_has_no_message_and_echoes_the_choice(calling):
    client, engine = calling
    engine.events = [*call_pieces(0, "call_a", "get_weather", '{"city": "Oslo"}'), Finish("tool_calls", 0, 2)]
    body = {
        "model": "aimichat-1",
        "input": "Oslo?",
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
    }
    answer = client.http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {client.key}"})
    assert answer.status_code == 200, answer.text
    response = answer.json()
    assert [item["type"] for item in response["output"]] == ["function_call"]
    assert response["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert response["parallel_tool_calls"] is False


def test_the_second_turn_reaches_the_engine_as_a_call_and_its_result(calling):
    client, engine = calling
    engine.events = [Delta("It is 18C.", 3), Finish("stop", 0, 3)]
    response = sdk_for(client).responses.create(
        model="aimichat-1",
        instructions="Be brief.",
        input=[{"role": "user", "content": "Paris?"}, call_item("call_a"), output_item("call_a")],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert response.output_text == "It is 18C." and response.tool_choice == "none"
    messages = engine.prompts[-1].messages
    assert [(m.role, m.content, m.tool_call_id) for m in messages] == [
        ("system", "Be brief.", None),
        ("user", "Paris?", None),
        ("assistant", "", None),
        ("tool", "18C", "call_a"),
    ]
    assert messages[2].tool_calls == (
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    )
    assert engine.tools_offered[-1] == ()  # tool_choice "none": no tools offered


def test_a_streamed_answer_gives_each_item_its_events_in_order(calling):
    client, engine = calling
    engine.events = TEXT_AND_TWO_CALLS
    with sdk_for(client).responses.stream(
        model="aimichat-1", input="Weather in Paris and Rome?", tools=[WEATHER_TOOL]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [(e.type, getattr(e, "output_index", None)) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[9].item
    assert added.type == "function_call" and added.arguments == "" and added.status == "in_progress"
    assert added.call_id == "call_a" and added.name == "get_weather"
    done = events[12]
    assert done.item_id == added.id and done.arguments == '{"city": "Paris"}'
    assert events[13].item.status == "completed" and events[13].item.arguments == '{"city": "Paris"}'
    assert final.output_text == "Checking both."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.parsed_arguments) for c in calls] == [
        ("call_a", {"city": "Paris"}),
        ("call_b", {"city": "Rome"}),
    ]


def test_a_call_cut_by_max_output_tokens_is_incomplete(calling):
    client, engine = calling
    engine.events = [*call_pieces(0, "call_a", "get_weather", '{"city": "Par'), Finish("length", 0, 2)]
    body = {"model": "aimichat-1", "input": "Paris?", "tools": [WEATHER_TOOL], "stream": True}
    answer = client.http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {client.key}"})
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["output"][0]["arguments"] == '{"city": "Par'


# -- the real model, through the official SDK ----------------------------------------------------


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("responses-tools")
    db = migrated(f"sqlite:///{tmp / 'a.db'}")
    with serve_app(engine, db, tmp) as server:
        make_account(db, daily=100_000)
        server.key = make_key(db)
        yield server
    db.dispose()


@pytest.fixture
def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)


ASK = "What is the weather like in Paris, in celsius?"


def test_a_required_call_then_the_answer_in_text(sdk):
    first = sdk.responses.create(
        model="aimichat-1",
        input=ASK,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=48,
        temperature=0,
    )
    assert first.status == "completed", first
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert first.tool_choice == "required" and first.parallel_tool_calls is False
    assert first.usage.output_tokens > 0

    second = sdk.responses.create(
        model="aimichat-1",
        input=[
            {"role": "user", "content": ASK},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18, "sky": "sunny"}'},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=24,
        temperature=0,
    )
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text.strip() and "<tool_call>" not in second.output_text


def test_a_streamed_required_call(sdk):
    with sdk.responses.stream(
        model="aimichat-1",
        input=ASK,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=48,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = events[-3]
    assert done.arguments == deltas and done.output_index == 0 and done.item_id == events[2].item.id
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == deltas
    jsonschema.validate(call.parsed_arguments, WEATHER)  # the SDK parsed the strict tool's arguments


# -- 400s over HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param, words", [BAD[0], BAD[2], BAD[3], BAD[6], BAD[10], BAD[12]])
def test_bad_tools_and_items_are_400s_in_openais_shape(calling, fields, param, words):
    client, _ = calling
    body = {"model": "aimichat-1", "input": "Hi", **fields}
    answer = client.http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {client.key}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_a_bad_tool_schema_is_a_400(calling):
    client, _ = calling
    tool = {**WEATHER_TOOL, "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}
    body = {"model": "aimichat-1", "input": "Hi", "tools": [tool], "tool_choice": "required"}
    answer = client.http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {client.key}"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "tools"
