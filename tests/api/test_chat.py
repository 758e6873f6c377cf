"""The chat API end to end.

The spec's three examples (Python requests, Node node-fetch, curl) run here unchanged but for the URL and
key, against the real model behind a real socket, and so do the tests that show the model's answers
(``@needs_model``). The official openai SDK and the request shapes run in-process against the scripted
engine. tests/engines/test_upstream_peer.py runs many of these tests again with its own ``server``:
AimiChat in upstream mode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import requests

from aimichat.engines.base import Message, SamplingParams
from aimichat.store.db import Database
from conftest import (
    AppClient,
    LiveServer,
    app_client,
    make_account,
    make_key,
    serve_app,
    sse_events,
    sse_text,
    tool_missing,
)
from scripted_engine import ScriptedEngine, echo

SPEC = (Path(__file__).parents[2] / "src/aimichat/docs/api.txt").read_text()
NODE_DIR = Path(__file__).parents[1] / "node"


def needs_model(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that shows the real model's answers: its ``server`` is the real model."""
    test.needs_model = True  # type: ignore[attr-defined]
    return test


@pytest.fixture
def server(request: pytest.FixtureRequest) -> AppClient | LiveServer:
    """The real model behind a real socket for ``@needs_model`` tests; the in-process app answered by the
    scripted engine for the others. Either way with an account of 100,000 daily credits and its ``key``."""
    return request.getfixturevalue("model_server" if getattr(request.function, "needs_model", False) else "api_server")


@pytest.fixture(scope="module")
def model_server(engine, tmp_path_factory):
    """The real model behind a real socket, with an account of 100,000 daily credits and its key."""
    tmp = tmp_path_factory.mktemp("chat")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(engine, db, tmp) as live:
        make_account(db, "chat@example.com", daily=100_000)
        live.key = make_key(db, "chat@example.com")
        yield live
    db.dispose()


def spec_block(start: str, end: str) -> str:
    """A code example from the spec, between two marker lines."""
    begin = SPEC.index(start)
    return SPEC[begin : SPEC.index(end, begin) + len(end)]


# -- the spec's examples -------------------------------------------------------------------------


@needs_model
def test_spec_python_example(server):
    code = spec_block("import requests", "print(response.json())")
    code = code.replace("https://aimichat.app", server.url).replace("aimichat_your_api_key_here", server.key)
    scope: dict = {}
    exec(code.replace("print(response.json())", "result = response"), scope)
    response = scope["result"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "aimichat-1"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].strip()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 100


@needs_model
def test_spec_curl_example_shows_rate_limit_headers(server):
    if not shutil.which("curl"):
        tool_missing("curl is not installed")
    begin = SPEC.index("curl", SPEC.index("popular programming languages"))
    example = SPEC[begin : SPEC.index("}'", begin) + 2]
    example = example.replace("https://aimichat.app", server.url).replace("aimichat_your_api_key_here", server.key)
    out = subprocess.run(
        ["bash", "-c", example.replace("curl -X POST", "curl -s -i -X POST", 1)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    head, _, body = out.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200"), out
    headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head.split("\n")[1:]}
    assert int(headers["x-ratelimit-limit"]) == 100_000
    assert int(headers["x-ratelimit-remaining"]) < 100_000
    assert headers["x-ratelimit-reset"].endswith("T00:00:00Z")
    assert json.loads(body)["choices"][0]["message"]["content"]


@needs_model
def test_spec_node_example(server):
    if not shutil.which("node") or not (NODE_DIR / "node_modules" / "node-fetch").is_dir():
        tool_missing("node or node-fetch is not installed")
    code = spec_block("const fetch = require('node-fetch');", ".then(data => console.log(data));")
    code = code.replace("https://aimichat.app", server.url).replace("aimichat_your_api_key_here", server.key)
    code = code.replace("console.log(data)", "console.log(JSON.stringify(data))")
    out = subprocess.run(["node", "-e", code], capture_output=True, text=True, timeout=120, cwd=NODE_DIR)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]


# -- the openai SDK ------------------------------------------------------------------------------


def openai_client(server: AppClient | LiveServer, key: str) -> openai.OpenAI:
    """The SDK, its requests sent by ``server``'s own client (into the app, when it runs in-process)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, http_client=server.client())


@pytest.fixture
def sdk(server):
    return openai_client(server, server.key)


def test_openai_sdk_plain(sdk):
    completion = sdk.chat.completions.create(
        model="aimichat-1", messages=[{"role": "user", "content": "Name a color."}], max_tokens=20
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_sdk_stream_with_usage(sdk):
    stream = sdk.chat.completions.create(
        model="aimichat-1",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 20
    assert len({c.id for c in chunks}) == 1


def test_openai_sdk_error_classes(sdk, server):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="aimichat-1", messages=[])
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    wrong_key = openai_client(server, "aimichat_wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model="aimichat-1", messages=[{"role": "user", "content": "hi"}])


# -- the real model's answers -------------------------------------------------------------------


@needs_model
def test_usage_counts_come_from_the_tokenizer(server, engine):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    r = requests.post(
        f"{server.url}/v1/chat/completions",
        headers={"X-API-Key": server.key},
        json={"messages": messages, "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 200
    expected = len(engine.tokenize_chat([Message("user", "What is 2 + 2?")]))
    assert r.json()["usage"]["prompt_tokens"] == expected
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@needs_model
def test_stream_equals_non_stream_at_temperature_zero(server):
    check_stream_equals_non_stream(server)


def check_stream_equals_non_stream(server, before_each=lambda: None) -> None:
    request = {
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_tokens": 40,
        "temperature": 0,
        "seed": 7,
    }
    headers = {"Authorization": f"Bearer {server.key}"}
    before_each()
    plain = requests.post(f"{server.url}/v1/chat/completions", headers=headers, json=request, timeout=60).json()
    before_each()
    r = requests.post(
        f"{server.url}/v1/chat/completions", headers=headers, json={**request, "stream": True}, timeout=60
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        assert name in r.headers
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert sse_text(chunks) == plain["choices"][0]["message"]["content"]  # the spec's minimal client's reading
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "aimichat-1" for c in chunks)


@needs_model
def test_stop_sequences_end_the_text(server):
    request = {
        "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        "max_tokens": 60,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {server.key}"}
    free = requests.post(f"{server.url}/v1/chat/completions", headers=headers, json=request, timeout=60).json()
    text = free["choices"][0]["message"]["content"]
    assert "3" in text
    stopped = requests.post(
        f"{server.url}/v1/chat/completions", headers=headers, json={**request, "stop": ["3"]}, timeout=60
    ).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.index("3")]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_content_as_text_parts_and_developer_role(server):
    body = {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        ],
        "max_tokens": 5,
        "some_future_field": {"ignored": True},
    }
    r = server.chat(body)
    assert r.status_code == 200, r.text


# -- the request's parts, other routes -------------------------------------------------------------


def test_text_parts_are_joined_and_developer_is_the_system_role(api_server, monkeypatch):
    monkeypatch.setattr(api_server.engine, "reply", echo)
    body = {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        ],
        "max_tokens": 5,
    }
    r = api_server.chat(body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello there"  # what the engine was given, echoed
    assert api_server.engine.generations[-1].messages[0] == Message("system", "Answer briefly.")


def test_sampling_parameters_reach_the_engine_as_sent(api_server):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    assert api_server.chat(body).status_code == 200
    sent = SamplingParams(7, 0.3, 0.9, ("END",), 42, presence_penalty=0.5, frequency_penalty=-0.5)
    assert api_server.engine.generations[-1].params == sent
    assert api_server.chat({"messages": body["messages"], "stop": ["a", "b"]}).status_code == 200
    # Left out: the model's defaults (aimichat-1's: AIMICHAT_DEFAULT_TEMPERATURE, _TOP_P), 1024 the default budget.
    defaults = SamplingParams(max_tokens=1024, temperature=0.2, top_p=0.9, stop=("a", "b"))
    assert api_server.engine.generations[-1].params == defaults


def test_models_health_and_ready(api_server):
    http = api_server.http
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["aimichat-1"]
    assert http.get("/v1/models/aimichat-1").json()["id"] == "aimichat-1"
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["engine"]["loaded"] is True


def test_readyz_is_503_when_the_engine_or_the_database_is_not_ready(sqlite_url, tmp_path):
    with app_client(ScriptedEngine(), Database(sqlite_url), tmp_path) as server:
        assert server.http.get("/readyz").status_code == 200
        server.engine.loaded = False  # a model still loading
        r = server.http.get("/readyz")
        assert r.status_code == 503 and r.json()["engine"]["loaded"] is False and r.json()["database"]["ok"] is True
        server.engine.loaded = True
        server.app.state.database = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
        r = server.http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["database"]["ok"] is False
