"""The response schemas in ``api/chat/protocol.py`` are the bodies actually sent, field for field.

serving.py builds answers as plain dicts typed by protocol's TypedDicts (mypy checks them where they
are built); these tests check real answers against the same types at run time, extra keys included,
and that the OpenAPI document shows them, so neither can drift from the other.
"""

from __future__ import annotations

import typing
from typing import Any

import typing_extensions
from pydantic import TypeAdapter

from aimichat.api.chat.protocol import ChatCompletion, ChatCompletionChunk
from aimichat.api.handlers import validation_message
from conftest import sse_events


def assert_exact(value: Any, schema: Any, where: str = "body") -> None:
    """``value`` validates against ``schema`` and has no key the schema does not declare, at any depth."""
    TypeAdapter(schema).validate_python(value, strict=True)
    origin = typing.get_origin(schema)
    if typing_extensions.is_typeddict(schema):  # typing's own misses typing_extensions' TypedDicts on 3.11
        hints = typing.get_type_hints(schema)
        assert set(value) <= set(hints), f"{where}: undeclared keys {set(value) - set(hints)}"
        for key, item in value.items():
            assert_exact(item, _strip_not_required(hints[key]), f"{where}.{key}")
    elif origin is list:
        (item_schema,) = typing.get_args(schema)
        for i, item in enumerate(value):
            assert_exact(item, item_schema, f"{where}[{i}]")


def _strip_not_required(hint: Any) -> Any:
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) in (typing.NotRequired, typing.Required) and args else hint


HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5, "temperature": 0}


def test_a_completion_is_exactly_a_ChatCompletion(api_server):
    r = api_server.chat(HELLO)
    assert r.status_code == 200, r.text
    assert_exact(r.json(), ChatCompletion)


def test_every_stream_chunk_is_exactly_a_ChatCompletionChunk(api_server):
    body = HELLO | {"stream": True, "stream_options": {"include_usage": True}}
    r = api_server.chat(body)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3 and "usage" in chunks[-1] and "x_ratelimit" in chunks[-1]
    for chunk in chunks:
        assert_exact(chunk, ChatCompletionChunk)


def test_the_openapi_document_shows_the_completion_that_is_sent(api_server):
    document = api_server.http.get("/openapi.json").json()
    answer = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"]["$ref"].endswith("/ChatCompletion")
    shown = document["components"]["schemas"]["ChatCompletion"]
    assert set(shown["properties"]) == set(typing.get_type_hints(ChatCompletion))


def test_a_refused_parameter_is_named_from_the_error_not_its_text():
    errors = [
        {
            "type": "unsupported_parameter",
            "loc": ("body",),
            "msg": "'tools': no",
            "ctx": {"param": "tools", "reason": "no"},
        }
    ]
    assert validation_message(errors) == ("'tools': no", "tools")
    # An ordinary message that merely looks like a refusal names no parameter.
    errors = [{"type": "value_error", "loc": ("body",), "msg": "Value error, 'tools': lookalike"}]
    assert validation_message(errors) == ("Invalid request body: 'tools': lookalike.", None)
