"""Twenty JSON-schema requests, each with its own schema, run on the batching engine together with four plain
streams: every grammar stays with its own slot. Each constrained answer validates against its schema (unless
it was cut by ``max_tokens``), and each plain stream, greedy, says exactly what it says alone.

Schemas are small and bounded (enums, booleans, short strings and arrays), so answers finish within a few
dozen tokens. They avoid ``minimum`` / ``maximum``: the converter ignores them (see
tests/api/test_openai_features.py::test_parse_honours_numeric_bounds).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest

from aimichat.config import Settings
from aimichat.engines.llama import LlamaEngine
from fixtures import app_client, make_account, make_key, migrated, sse_events, sse_text

SLOTS = 4
COLOR = {"enum": ["red", "green", "blue", "black", "white"]}
BOOL = {"type": "boolean"}
WORD = {"type": "string", "maxLength": 12}


def obj(required: bool = True, **properties: Any) -> dict[str, Any]:
    """An object of exactly these properties (no others: a small model wanders off into extra keys)."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return schema | ({"required": list(properties)} if required else {})


SCHEMAS = [
    obj(ok=BOOL),
    obj(color=COLOR),
    obj(colors={"type": "array", "items": COLOR, "maxItems": 3}),
    obj(count={"type": "integer"}),
    obj(unit={"enum": ["km", "mi"]}, far=BOOL),
    {"type": "array", "items": BOOL, "minItems": 1, "maxItems": 3},
    obj(name=WORD),
    obj(point=obj(x={"type": "integer"}, y={"type": "integer"})),
    obj(kind={"const": "fruit"}, name={"enum": ["apple", "pear", "plum"]}),
    obj(value={"anyOf": [BOOL, {"type": "null"}]}),
    obj(price={"type": "number"}),
    obj(tags={"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}),
    obj(answer={"enum": ["yes", "no", "maybe"]}, sure=BOOL),
    obj(required=False, day={"enum": ["mon", "tue", "wed"]}, note=WORD),
    obj(a=BOOL, b=BOOL, c=BOOL),
    obj(code={"type": "string", "pattern": "^[A-Z]{3}$"}),
    obj(date={"type": "string", "format": "date"}),
    obj(size={"type": ["integer", "null"]}),
    obj(pair={"type": "array", "prefixItems": [BOOL, COLOR], "items": False}),
    obj(pet=obj(species={"enum": ["cat", "dog"]}, legs={"type": "integer"})),
]
PLAIN = [f"Count from one to {n} in words." for n in (3, 4, 5, 6)]


@pytest.fixture(scope="module")
def batching(tmp_path_factory):
    """A batching engine of SLOTS slots (the session's has one), with an app and a key over SQLite."""
    engine = LlamaEngine(slots=SLOTS, context_length=1024, threads=2, system_prompt=Settings().system_prompt)
    engine.load()
    tmp = tmp_path_factory.mktemp("structured_concurrency")
    db = migrated(f"sqlite:///{tmp / 'a.db'}")
    with app_client(engine, db, tmp) as client:
        make_account(db, daily=100_000)
        client.key = make_key(db)
        yield client
    engine.shutdown()
    db.dispose()


def constrained(i: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Give example number {i} as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": schema}},
        "temperature": 0,
        "max_tokens": 40,
    }


def plain(prompt: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24, "stream": True}


def send(client, body: dict[str, Any]) -> tuple[str, str]:
    """(text, finish reason) of one answer, streamed or not."""
    answer = client.chat(body, client.key)
    assert answer.status_code == 200, answer.text
    if body.get("stream"):
        events = sse_events(answer.text)
        finish = [c["choices"][0]["finish_reason"] for c in events if isinstance(c, dict) and c["choices"]][-1]
        return sse_text(events), finish
    choice = answer.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


class BusySlots:
    """The most slots the engine had busy at once while it watched (polled every 5 ms)."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine, self.most = engine, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            self.most = max(self.most, self.engine.stats().running)
            time.sleep(0.005)

    def __enter__(self) -> BusySlots:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def test_twenty_schemas_beside_four_plain_streams(batching):
    for schema in SCHEMAS:  # the schemas themselves are valid JSON Schema
        jsonschema.validators.validator_for(schema).check_schema(schema)
    alone = [send(batching, plain(prompt)) for prompt in PLAIN]
    assert all(text for text, _ in alone)

    # The plain streams go in among the constrained requests, so each runs beside grammars in other slots.
    bodies = [constrained(i, schema) for i, schema in enumerate(SCHEMAS)]
    for at, prompt in zip((0, 6, 12, 18), PLAIN, strict=True):
        bodies.insert(at, plain(prompt))
    with BusySlots(batching.engine) as busy, ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: send(batching, body), bodies))
    assert busy.most == SLOTS

    finished = 0
    for body, (text, finish) in zip(bodies, answers, strict=True):
        if body.get("stream"):
            continue
        assert finish in ("stop", "length"), finish
        if finish == "stop":
            schema = body["response_format"]["json_schema"]["schema"]
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= 16, f"only {finished} of {len(SCHEMAS)} answers finished within their max_tokens"
    streamed = [answer for body, answer in zip(bodies, answers, strict=True) if body.get("stream")]
    assert streamed == alone
