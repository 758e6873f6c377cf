"""The chat fast path (api/chat/fast_path.py) answers exactly what the FastAPI route answers.

Two apps, each over its own SQLite database with the same account and key: one with the fast path (as
``aimichat serve`` runs), one without (the FastAPI route, the reference). Every request below, good or bad,
goes to both in turn; status, headers and body must agree, but for what differs by nature (completion ids,
timestamps, request ids).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from aimichat.api.chat import fast_path
from aimichat.store.db import Database
from conftest import AppClient, build_app, make_account, make_key
from scripted_engine import ScriptedEngine

USER = [{"role": "user", "content": "hi there"}]
EMAIL = "parity@example.com"
POOR = "poor@example.com"

_IDS = re.compile(rb'"(chatcmpl-|req-)[0-9a-f]+"')
_CREATED = re.compile(rb'"created":\d+')
_UNSTABLE_HEADERS = {"date", "x-request-id", "content-length"}


class Twin:
    def __init__(self, tmp: Path, fast: bool) -> None:
        self.db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
        self.client = AppClient(build_app(ScriptedEngine(), self.db, tmp, fast_chat=fast, max_body_bytes=4096))
        self.keys: dict[str, str] = {}

    def __enter__(self) -> Twin:
        self.client.__enter__()
        make_account(self.db, EMAIL, tier="plenty", daily=100_000)
        make_account(self.db, POOR, tier="scarce", daily=1)
        self.keys = {"good": make_key(self.db, EMAIL), "poor": make_key(self.db, POOR)}
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(*exc)
        self.db.dispose()

    def send(self, method: str, path: str, *, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            secret = self.keys.get(key, key)  # a name from self.keys, or a literal string
            headers.setdefault("Authorization", f"Bearer {secret}")
        return self.client.http.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Twin, Twin]]:
    with (
        Twin(tmp_path_factory.mktemp("fast"), fast=True) as fast,
        Twin(tmp_path_factory.mktemp("slow"), fast=False) as slow,
    ):
        assert fast.keys["good"] != slow.keys["good"]
        yield fast, slow


def _normal(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in _UNSTABLE_HEADERS}
    body = _CREATED.sub(b'"created":0', _IDS.sub(b'"ID"', response.content))
    return response.status_code, headers, body


CASES: dict[str, dict[str, Any]] = {
    "answer": {"json": {"messages": USER}},
    "stream": {"json": {"messages": USER, "stream": True}},
    "stream with usage": {"json": {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}},
    "two choices": {"json": {"messages": USER, "n": 2, "max_tokens": 3}},
    "extra field": {"json": {"messages": USER, "my_field": {"a": 1}}},
    "invalid JSON": {"content": b'{"messages": [', "headers": {"Content-Type": "application/json"}},
    "not UTF-8": {"content": b'{"messages": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}},
    "empty body": {"content": b"", "headers": {"Content-Type": "application/json"}},
    "no content type": {"content": b'{"messages": [{"role": "user", "content": "hi"}]}'},
    "text/plain": {"content": b'{"messages": []}', "headers": {"Content-Type": "text/plain"}},
    "+json type": {
        "content": b'{"messages": [{"role": "user", "content": "hi"}]}',
        "headers": {"Content-Type": "application/vnd.api+json; charset=utf-8"},
    },
    "array body": {"json": [1, 2]},
    "string body": {"json": "hello"},
    "null body": {"content": b"null", "headers": {"Content-Type": "application/json"}},
    "no messages": {"json": {}},
    "messages not a list": {"json": {"messages": "hello"}},
    "bad role": {"json": {"messages": [{"role": "wizard", "content": "hi"}]}},
    "bad temperature": {"json": {"messages": USER, "temperature": 2.5}},
    "nested bad value": {"json": {"messages": USER, "stream_options": {"include_usage": "maybe"}}},
    "NUL in text": {"json": {"messages": [{"role": "user", "content": "a\u0000b"}]}},
    "lone surrogate": {
        "content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "headers": {"Content-Type": "application/json"},
    },
    "unknown model": {"json": {"messages": USER, "model": "no-such-model"}},
    "n over the plan": {"json": {"messages": USER, "n": 99}},
    "other mode": {"json": {"messages": USER, "mode": "agent"}},
    "body too large": {"json": {"messages": [{"role": "user", "content": "x" * 5000}]}},
    "no key": {"json": {"messages": USER}, "key": None},
    "bad key": {"json": {"messages": USER}, "key": "aimichat_" + "0" * 40},
    "bad key, bad body": {"json": {"messages": "hello"}, "key": "aimichat_" + "0" * 40},
    "bad key, bad JSON": {
        "content": b"{",
        "headers": {"Content-Type": "application/json"},
        "key": "aimichat_" + "0" * 40,
    },
    "not a key": {"json": {"messages": USER}, "key": "sk-whatever"},
    "two keys": {"json": {"messages": USER}, "headers": {"X-API-Key": "aimichat_" + "1" * 40}},
    "key in the query": {"json": {"messages": USER}, "key": None, "query_key": True},
    "credits spent": {"json": {"messages": USER}, "key": "poor"},
    "idempotent": {"json": {"messages": USER}, "headers": {"Idempotency-Key": "parity-1"}},
    "idempotent replay": {"json": {"messages": USER}, "headers": {"Idempotency-Key": "parity-1"}},
    "idempotency key too long": {"json": {"messages": USER}, "headers": {"Idempotency-Key": "k" * 300}},
    "GET": {"method": "GET", "key": "good"},
    "trailing slash": {"json": {"messages": USER}, "path": "/v1/chat/completions/"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_answers_what_the_fastapi_route_answers(twins: tuple[Twin, Twin], case: str) -> None:
    spec = dict(CASES[case])
    method = spec.pop("method", "POST")
    path = spec.pop("path", "/v1/chat/completions")
    key = spec.pop("key", "good")
    answers = []
    for twin in twins:
        params = {"api_key": twin.keys["good"]} if spec.get("query_key") else None
        kwargs = {k: v for k, v in spec.items() if k != "query_key"}
        answers.append(_normal(twin.send(method, path, key=key, params=params, **kwargs)))
    fast, slow = answers
    assert fast[0] == slow[0], (fast, slow)
    assert fast[2] == slow[2]
    assert fast[1] == slow[1]
    assert fast[0] != 500


def test_the_fast_path_is_the_one_answering(twins: tuple[Twin, Twin], monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above compares two paths: the fast app reads chat bodies in fast_path, the other
    does not, and both name the chat route in their request metrics."""
    read: list[bytes] = []
    json_body = fast_path._json_body

    async def counted(request: Request) -> Any:
        read.append(await request.body())
        return await json_body(request)

    monkeypatch.setattr(fast_path, "_json_body", counted)
    fast, slow = twins
    assert fast.send("POST", "/v1/chat/completions", key="good", json={"messages": USER}).status_code == 200
    assert len(read) == 1
    assert slow.send("POST", "/v1/chat/completions", key="good", json={"messages": USER}).status_code == 200
    assert len(read) == 1
    for twin in twins:
        assert 'route="/v1/chat/completions"' in twin.client.http.get("/metrics").text
