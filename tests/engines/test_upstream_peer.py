"""AimiChat in upstream mode in front of a real peer: llama-cpp-python's OpenAI-compatible server
(``python -m llama_cpp.server``, its ``[server]`` extra) serving the same GGUF as the embedded engine.

The chat-API tests written for the embedded engine (tests/api) run here unchanged against the
upstream-mode server: they are imported from their modules and get this module's ``server``
fixture. The few that look inside the embedded engine (its tokenizer, its context length) have
upstream versions below: llama-cpp-python's server sends no usage in streams, so usage is an
estimate and the ledger says so; its context window is its own to enforce.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests
from sqlalchemy import select

from aimichat.app import create_app
from aimichat.config import Settings
from aimichat.engines.base import Message
from aimichat.engines.llama import default_model_path
from aimichat.engines.openai_upstream import estimate_prompt_tokens
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import LiveServer, free_port, make_account, make_key

PEER_CONTEXT = 512
API_TESTS = Path(__file__).parents[1] / "api"


def _api_tests(name: str):
    """A module of tests/api, loaded under its own name so it never clashes with pytest's copy."""
    spec = importlib.util.spec_from_file_location(f"upstream_peer_{name}", API_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_chat, _errors = _api_tests("test_chat"), _api_tests("test_errors")

# The embedded engine's chat-API tests, run as they are against AimiChat in upstream mode.
sdk = _chat.sdk
test_spec_python_example = _chat.test_spec_python_example
test_spec_curl_example_shows_rate_limit_headers = _chat.test_spec_curl_example_shows_rate_limit_headers
test_spec_node_example = _chat.test_spec_node_example
test_openai_sdk_plain = _chat.test_openai_sdk_plain
test_openai_sdk_stream_with_usage = _chat.test_openai_sdk_stream_with_usage
test_openai_sdk_error_classes = _chat.test_openai_sdk_error_classes
test_stop_sequences_end_the_text = _chat.test_stop_sequences_end_the_text
test_content_as_text_parts_and_developer_role = _chat.test_content_as_text_parts_and_developer_role
test_schema_violations_are_400 = _errors.test_schema_violations_are_400
test_fields_we_cannot_honour_are_refused_by_name = _errors.test_fields_we_cannot_honour_are_refused_by_name
test_unknown_model_is_404_model_not_found = _errors.test_unknown_model_is_404_model_not_found
assert_error = _errors.assert_error


# -- the peer and the server in front of it -------------------------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> str:
    """llama-cpp-python's server on a free port, started once for the module; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("peer") / "llama_cpp_server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(PEER_CONTEXT),
        "--n_threads",
        "1",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(process, f"http://127.0.0.1:{port}/v1/models", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet: keep waiting
        time.sleep(0.25)
    raise RuntimeError(f"llama_cpp.server did not start within 120 s:\n{log.read_text()[-3000:]}")


def serve_upstream(db: Database, tmp_path: Path, peer: str, http: str = "aiohttp") -> LiveServer:
    settings = Settings(
        data_dir=tmp_path, database_url=db.url, engine="upstream", upstream_url=peer, upstream_http=http
    )
    return LiveServer(create_app(settings, database=db))


@pytest.fixture(scope="module", params=["aiohttp", "httpx"])
def server(request, peer, tmp_path_factory):
    """What tests/api's modules call ``server``: AimiChat, here in upstream mode, over each HTTP client."""
    tmp = tmp_path_factory.mktemp("upstream_chat")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_upstream(db, tmp, peer, request.param) as live:
        make_account(db, "chat@example.com", daily=100_000)
        live.key = make_key(db, "chat@example.com")
        live.db = db
        yield live


def post(server, body: dict) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.key}"}, json=body, timeout=120
    )


# -- the embedded-specific tests, in their upstream form -------------------------------------------


def test_usage_is_an_estimate_and_the_ledger_says_so(peer, database, tmp_path, engine):
    """llama-cpp-python's server sends no usage in streams: prompt tokens are estimated (~4
    characters a token), completion tokens are the chunks received, and the ledger row is marked."""
    make_account(database, "usage@example.com", daily=100_000, cost_rule="per_token", per_1k=1000)
    key = make_key(database, "usage@example.com")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    with serve_upstream(database, tmp_path, peer) as live:
        live.key = key
        plain = post(live, {"messages": messages, "max_tokens": 8})
        streamed = post(
            live, {"messages": messages, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert plain.status_code == 200 and streamed.status_code == 200
    estimate = estimate_prompt_tokens([{"role": "system", "content": Settings().system_prompt}, *messages])
    usage = plain.json()["usage"]
    assert usage["prompt_tokens"] == estimate and 0 < usage["completion_tokens"] <= 8
    real = len(engine.tokenize_chat([Message("user", "What is 2 + 2?")]))  # the same GGUF's tokenizer
    assert real / 2 <= estimate <= real * 2, (estimate, real)
    with database.session() as s:
        rows = list(s.scalars(select(UsageEvent).order_by(UsageEvent.id)))
    assert [(r.status, r.estimated) for r in rows] == [("charged", True), ("charged", True)]
    assert rows[0].credits == estimate + usage["completion_tokens"]


def test_stream_equals_non_stream_at_temperature_zero(server):
    """As in tests/api, with the peer's prompt cache in the same state before both requests.

    llama-cpp-python reads only the last token of a repeated prompt again, in a decode of one row,
    which can change a greedy answer at a near tie; our own engines read the last few again (see
    ``REREAD_TOKENS``). Another prompt in between makes the peer read both requests the same way.
    """

    def other_prompt() -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        assert (
            requests.post(
                f"{server.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {server.key}"},
                json=body,
                timeout=60,
            ).status_code
            == 200
        )

    _chat.check_stream_equals_non_stream(server, before_each=other_prompt)


def test_prompt_longer_than_the_upstream_context_is_400_context_length_exceeded(server):
    words = " ".join(["banana"] * (PEER_CONTEXT + 100))
    error = assert_error(
        post(server, {"messages": [{"role": "user", "content": words}]}), 400, code="context_length_exceeded"
    )
    assert str(PEER_CONTEXT) in error["message"]
    with server.db.session() as s:
        row = s.scalars(select(UsageEvent).order_by(UsageEvent.id.desc())).first()
    assert (row.status, row.credits) == ("released", 0)


def test_readyz_shows_the_peer_up(server, peer):
    r = requests.get(f"{server.url}/readyz", timeout=10)
    assert r.status_code == 200
    engine = r.json()["engine"]
    assert engine["engine"] == "upstream"
    assert engine["upstreams"] == [
        {"url": peer, "state": "up", "consecutive_failures": 0, "last_error": None, "retry_in": 0}
    ]


def test_response_format_reaches_the_upstream_and_its_answer_validates(server):
    """Passed through as sent; llama-cpp-python's server takes a schema in its own json_object dialect."""
    import json as _json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"yes": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
        "required": ["yes", "color"],
    }
    body = {
        "messages": [{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        "response_format": {"type": "json_object", "schema": schema},
        "temperature": 0,
        "max_tokens": 60,
    }
    answer = post(server, body)
    assert answer.status_code == 200, answer.text
    jsonschema.validate(_json.loads(answer.json()["choices"][0]["message"]["content"]), schema)
