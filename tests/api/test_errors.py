"""Every bad input answers its 4xx in OpenAI's error shape; nothing answers 500.

In-process, against one app per module answered by the scripted engine: nothing here is about the model.
tests/engines/test_upstream_peer.py runs some of these tests again with its own ``server`` (a LiveServer).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import AppClient, LiveServer
from scripted_engine import endless

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(api_server: AppClient) -> AppClient:
    """What these tests call ``server``: the module's in-process app."""
    return api_server


def post(
    server: AppClient | LiveServer,
    body: Any = None,
    *,
    data: Any = None,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.key}", **(headers or {})}
    if data is not None:
        return server.http.post(path, content=data, headers={"Content-Type": "application/json", **headers})
    return server.http.post(path, json=body, headers=headers)


def assert_error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": USER, "temperature": 2.5}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_tokens": "lots"}, "max_tokens"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "presence_penalty": 5}, "presence_penalty"),
        # strict types: never coerced (issue 15, finding 9)
        ({"messages": USER, "max_tokens": "2"}, "max_tokens"),
        ({"messages": USER, "max_tokens": 2.0}, "max_tokens"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "stream": 1}, "stream"),
        ({"messages": USER, "temperature": "0.5"}, "temperature"),
        ({"messages": USER, "seed": True}, "seed"),
        ({"messages": [{"role": "user", "content": 42}]}, None),
    ],
)
def test_schema_violations_are_400(server, body, param):
    error = assert_error(post(server, body), 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


@pytest.mark.parametrize(
    "extra, word",
    [
        ({"functions": [{"name": "f"}]}, "'functions' parameter is not supported"),
        ({"function_call": "auto"}, "use 'tool_choice'"),
        ({"audio": {"voice": "alloy"}}, "not supported"),
        ({"n": 5}, "n may be at most 4"),  # the tier's cap (tiers set --max-n)
        ({"top_logprobs": 2}, "needs 'logprobs': true"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"tool_choice": "required"}, "needs at least one tool"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
          "function": {"name": "g"}}}, "'g' is not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "letters, digits"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
         "marked multimodal"),
    ],
)  # fmt: skip
def test_fields_we_cannot_honour_are_refused_by_name(server, extra, word):
    error = assert_error(post(server, {"messages": USER, **extra}), 400)
    assert word in error["message"], error


@pytest.mark.parametrize(
    "response_format, words",
    [
        ({"type": "xml"}, "unknown type 'xml'"),
        ({"type": "json_schema"}, "needs {'name'"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "cannot be turned"),
    ],
)
def test_response_formats_we_cannot_honour_are_400s(server, response_format, words):
    error = assert_error(post(server, {"messages": USER, "response_format": response_format}), 400)
    assert error["param"] == "response_format" and words in error["message"]


def test_image_parts_are_refused(server):
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    error = assert_error(post(server, {"messages": [{"role": "user", "content": content}]}), 400)
    assert "multimodal" in error["message"] and error["param"] == "messages"


def test_malformed_json_is_400(server):
    error = assert_error(post(server, data=b'{"messages": [}'), 400)
    assert "JSON" in error["message"]
    assert_error(post(server, data=b"[1, 2]"), 400)
    assert_error(post(server, data=b""), 400)


def test_unknown_model_is_404_model_not_found(server):
    assert_error(post(server, {"messages": USER, "model": "gpt-4"}), 404, code="model_not_found", param="model")


def test_unknown_route_and_wrong_method(server):
    assert_error(server.http.get("/nope"), 404)
    assert_error(server.http.get("/v1/chat/completions"), 405)
    assert_error(server.http.delete("/v1/models"), 405)


def test_body_over_one_mebibyte_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    assert_error(post(server, big), 413)


def test_an_empty_body_says_so(server):
    error = assert_error(post(server, data=b""), 400)
    assert "body is empty" in error["message"] and "None" not in error["message"]


def test_a_float_may_be_written_as_an_integer(server):
    assert post(server, {"messages": USER, "temperature": 1, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "headers, query",
    [
        ({"X-API-Key": "aimichat_other"}, ""),
        ({}, "?api_key=aimichat_a&api_key=aimichat_b"),
        ({}, "?api_key=aimichat_other"),
    ],
)
def test_two_different_keys_are_refused_as_ambiguous(server, headers, query):
    answer = post(server, {"messages": USER}, headers=headers, path="/v1/chat/completions" + query)
    assert_error(answer, 400, code="ambiguous_api_key")


def test_the_same_key_twice_is_not_ambiguous(server):
    answer = post(server, {"messages": USER, "max_tokens": 1}, headers={"X-API-Key": server.key})
    assert answer.status_code == 200


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(300):
            yield b"y" * 4096
        yield b'"}]}'

    assert_error(post(server, data=chunks()), 413)


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(server):
    context = server.engine.context_length
    words = " ".join(["banana"] * (context + 100))
    body = {"messages": [{"role": "user", "content": words}]}
    error = assert_error(post(server, body), 400, code="context_length_exceeded")
    assert str(context) in error["message"]


def test_max_tokens_is_clamped_to_what_fits(server, monkeypatch):
    monkeypatch.setattr(server.engine, "reply", endless())  # it would talk on if it could
    context = server.engine.context_length
    words = " ".join(["apple"] * (context - 60))
    r = post(server, {"messages": [{"role": "user", "content": words}], "max_tokens": 5000, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == context and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud83d"}', "stop"),
    ],
)
def test_a_lone_surrogate_is_a_400_not_a_500(api_server, body, param):
    """JSON may escape a lone surrogate (``\\ud800``); it is no text, and no engine can encode it."""
    headers = {"Authorization": f"Bearer {api_server.key}", "Content-Type": "application/json"}
    r = api_server.http.post("/v1/chat/completions", content=body, headers=headers)
    error = assert_error(r, 400)
    assert "lone surrogate" in error["message"] and error["param"] == param, error


def test_a_trailing_slash_is_a_404_naming_the_path_never_a_redirect_that_echoes_the_key(api_server):
    r = api_server.http.post(f"/v1/chat/completions/?api_key={api_server.key}", json={"messages": []})
    error = assert_error(r, 404, code="not_found")
    assert "Location" not in r.headers and api_server.key not in r.text
    assert "/v1/chat/completions (without the trailing slash)" in error["message"]


def test_the_openapi_document_promises_the_400_we_send_never_a_422(server):
    document = server.http.get("/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and chat["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert all("422" not in op.get("responses", {}) for ops in document["paths"].values() for op in ops.values())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error = assert_error(post(server, {"messages": "hello"}), 400)  # what the document describes
    assert set(error) == set(document["components"]["schemas"]["Error"]["properties"]["error"]["properties"])
