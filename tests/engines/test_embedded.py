"""The one-at-a-time embedded engine under load: a bounded FIFO queue, timeouts, disconnects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from aimichat.engines.text import StopScanner
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import make_account, make_key, serve_app

LONG = {"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}], "temperature": 0}


@pytest.fixture
def server(engine, tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    with serve_app(engine, db, tmp_path) as live:
        make_account(db, "queue@example.com", daily=100_000)
        live.key = make_key(db, "queue@example.com")
        live.db = db
        yield live


def stream(server, body, results, index):
    """Run one streaming request to the end; record (status, retry-after, got [DONE])."""
    with httpx.Client(timeout=120) as c, c.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {server.key}"}
    ) as r:
        text = "".join(r.iter_text())
        results[index] = (r.status_code, r.headers.get("retry-after"), text.endswith("data: [DONE]\n\n"), text[:300])


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queue", 2)
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=stream, args=(server, {**LONG, "max_tokens": 30}, results, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8, "no request may hang"
    ok = [r for r in results.values() if r[0] == 200]
    busy = [r for r in results.values() if r[0] == 503]
    assert len(ok) + len(busy) == 8
    assert busy and all(int(r[1]) >= 1 for r in busy)
    assert len(ok) >= 3 and all(r[2] for r in ok), busy  # one running + two queued, each completed
    with server.db.session() as s:  # refused requests reserved nothing: exactly the served ones are charged
        rows = s.scalars(select(UsageEvent)).all()
        assert sorted(r.status for r in rows) == ["charged"] * len(ok) + ["released"] * len(busy)
        assert sum(r.credits for r in rows) == len(ok)


def test_waiting_longer_than_the_queue_timeout_answers_503(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "queue_timeout", 0.5)
    results: dict[int, tuple] = {}
    # The first stream must still be running when the second has waited 0.5 s: ~3 s at 100 tok/s.
    first = threading.Thread(target=stream, args=(server, {**LONG, "max_tokens": 300}, results, 0))
    first.start()
    time.sleep(0.3)
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**LONG, "max_tokens": 5},
                   headers={"Authorization": f"Bearer {server.key}"}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "engine_overloaded"
    assert time.monotonic() - started < 5
    first.join(timeout=180)
    assert results[0][0] == 200


def test_a_disconnect_frees_the_engine_for_the_next_request(server):
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "max_tokens": 1500, "stream": True}, headers=headers) as r:
            lines = r.iter_lines()
            received = [line for line, _ in zip(lines, range(12)) if line.startswith("data: ")]
        assert len(received) >= 5  # the stream was running when we hung up
        # The abandoned stream had ~1,490 tokens (~20 s) to go; the next request must start at once.
        started = time.monotonic()
        with c.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "max_tokens": 5, "stream": True}, headers=headers) as r2:
            first_token = next(line for line in r2.iter_lines() if '"content":"' in line and '"role"' not in line)
            elapsed = time.monotonic() - started
            assert first_token
    assert elapsed < 2.0, f"next request waited {elapsed:.2f}s for its first token"
    time.sleep(0.3)
    with server.db.session() as s:
        cut = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).first()
        assert cut.status == "charged"
        assert 1 <= cut.completion_tokens < 100  # what was generated before the hang-up, not 1,500


def test_a_non_streaming_caller_that_hangs_up_frees_the_engine_and_pays_nothing(server):
    headers = {"Authorization": f"Bearer {server.key}"}
    with pytest.raises(httpx.ReadTimeout):  # ~1,500 tokens would take ~20 s; the caller gives up after 1 s
        httpx.post(f"{server.url}/v1/chat/completions", json={**LONG, "max_tokens": 1500}, headers=headers, timeout=1.0)
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**LONG, "max_tokens": 5}, headers=headers, timeout=60)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert elapsed < 2.0, f"the next request waited {elapsed:.2f}s behind the abandoned one"
    with server.db.session() as s:
        abandoned = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).first()
    assert (abandoned.status, abandoned.credits) == ("released", 0)  # it received nothing


def test_the_server_stays_responsive_during_a_long_generation(server):
    results: dict[int, tuple] = {}
    t = threading.Thread(target=stream, args=(server, {**LONG, "max_tokens": 150}, results, 0))
    t.start()
    time.sleep(0.5)
    worst = 0.0
    for _ in range(10):
        started = time.monotonic()
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - started)
    assert t.is_alive(), "the generation should still be running"
    assert worst < 0.5
    t.join(timeout=60)


def test_usage_chunk_tokens_match_what_was_streamed(server):
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={**LONG, "max_tokens": 25, "stream": True, "stream_options": {"include_usage": True}},
                   headers={"Authorization": f"Bearer {server.key}"}, timeout=60)
    payloads = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    usage_chunk = json.loads(payloads[-2])
    assert usage_chunk["usage"]["completion_tokens"] == 25
    assert usage_chunk["x_ratelimit"]["remaining"] == 100_000 - 1


@pytest.mark.parametrize(
    "pieces, stops, shown, stopped",
    [
        (["Hello", " wor", "ld"], (), "Hello world", False),
        (["Hel", "lo ST", "OP there"], ("STOP",), "Hello ", True),
        (["abc S", "T", "x"], ("STOP",), "abc STx", False),
        (["one\n\n", "two"], ("\n\n", "zz"), "one", True),
    ],
)
def test_stop_scanner_holds_back_only_possible_stop_prefixes(pieces, stops, shown, stopped):
    scanner, out, hit = StopScanner(stops), "", False
    for piece in pieces:
        text, hit = scanner.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += scanner.flush()
    assert (out, hit) == (shown, stopped)
