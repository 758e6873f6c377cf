"""The chat API over real HTTP, answered by the real embedded model.

The spec's three examples (Python requests, Node node-fetch, curl) run here unchanged but for the
URL and key, and so does the official openai SDK.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest
import requests

from aimichat.engines.base import Message
from aimichat.store.db import Database
from conftest import make_account, make_key, serve_app, tool_missing

SPEC = (Path(__file__).parents[2] / "src/aimichat/docs/api.txt").read_text()
NODE_DIR = Path(__file__).parents[1] / "node"


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(engine, db, tmp) as live:
        make_account(db, "chat@example.com", daily=100_000)
        live.key = make_key(db, "chat@example.com")
        yield live


def spec_block(start: str, end: str) -> str:
    """A code example from the spec, between two marker lines."""
    begin = SPEC.index(start)
    return SPEC[begin : SPEC.index(end, begin) + len(end)]


def events(body: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing as we go."""
    assert body.endswith("\n\n"), "every event ends with a blank line"
    payloads = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        payloads.append(block[len("data: ") :])
    return payloads


# -- the spec's examples -------------------------------------------------------------------------


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


def test_spec_curl_example_shows_rate_limit_headers(server):
    if not shutil.which("curl"):
        tool_missing("curl is not installed")
    begin = SPEC.index("curl", SPEC.index("popular programming languages"))
    example = SPEC[begin : SPEC.index("}'", begin) + 2]
    example = example.replace("https://aimichat.app", server.url).replace("aimichat_your_api_key_here", server.key)
    out = subprocess.run(["bash", "-c", example.replace("curl -X POST", "curl -s -i -X POST", 1)],
                         capture_output=True, text=True, timeout=120).stdout
    head, _, body = out.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200"), out
    headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head.split("\n")[1:]}
    assert int(headers["x-ratelimit-limit"]) == 100_000
    assert int(headers["x-ratelimit-remaining"]) < 100_000
    assert headers["x-ratelimit-reset"].endswith("T00:00:00Z")
    assert json.loads(body)["choices"][0]["message"]["content"]


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


@pytest.fixture
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)


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
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="aimichat_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model="aimichat-1", messages=[{"role": "user", "content": "hi"}])


# -- response shape and streaming ----------------------------------------------------------------


def test_usage_counts_come_from_the_tokenizer(server, engine):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    r = requests.post(f"{server.url}/v1/chat/completions", headers={"X-API-Key": server.key},
                      json={"messages": messages, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200
    expected = len(engine.tokenize_chat([Message("user", "What is 2 + 2?")]))
    assert r.json()["usage"]["prompt_tokens"] == expected
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


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
    r = requests.post(f"{server.url}/v1/chat/completions", headers=headers, json={**request, "stream": True}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        assert name in r.headers
    payloads = events(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    # The spec's minimal client reads choices[0].delta.content from each event.
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "aimichat-1" for c in chunks)


def test_stop_sequences_end_the_text(server):
    request = {"messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
               "max_tokens": 60, "temperature": 0}
    headers = {"Authorization": f"Bearer {server.key}"}
    free = requests.post(f"{server.url}/v1/chat/completions", headers=headers, json=request, timeout=60).json()
    text = free["choices"][0]["message"]["content"]
    assert "3" in text
    stopped = requests.post(f"{server.url}/v1/chat/completions", headers=headers, json={**request, "stop": ["3"]}, timeout=60).json()
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
    r = requests.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.key}"}, json=body, timeout=60)
    assert r.status_code == 200, r.text


# -- other routes --------------------------------------------------------------------------------


def test_models_health_and_ready(server):
    models = requests.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["aimichat-1"]
    assert requests.get(f"{server.url}/v1/models/aimichat-1", timeout=10).json()["id"] == "aimichat-1"
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["engine"]["loaded"] is True


def test_readyz_is_503_when_the_database_is_unreachable(engine, tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'ok.db'}")
    with serve_app(engine, db, tmp_path) as live:
        live.app.state.db = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
        r = requests.get(f"{live.url}/readyz", timeout=30)
        assert r.status_code == 503
        assert r.json()["database"]["ok"] is False
