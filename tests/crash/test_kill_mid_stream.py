"""kill -9 a server with 20 streams in flight, restart it: nothing is lost and nothing is overcharged.

A real `aimichat serve` process (its model an upstream that sends a token every 50 ms, so the streams are
mid-answer) serves 10 streams of a per-request account and 10 of a per-token one when it is killed with
SIGKILL: no drain, no settlement. Then, for SQL counters and for Redis counters:

- the 20 reservations stand in the ledger, still ``reserved``, and the counters say exactly what the
  ledger says (a reservation is counted where it is written, or rebuilt from where it is written);
- the restarted server serves at once;
- ``aimichat reservations sweep`` (``AIMICHAT_RESERVATION_TTL`` a couple of seconds here) settles all 20 by
  the documented rule (quota/sweeper.py): a per-request price keeps its credit, a per-token price charges
  the prompt recorded with the row and refunds the rest, so the tokens the callers saw before the crash
  cost nothing, and no row is left ``reserved``;
- afterwards the counters still equal the ledger.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from aimichat.accounts import service as accounts
from aimichat.app import prepare_database
from aimichat.cli import cli
from aimichat.config import Settings
from aimichat.keys import service as keys
from aimichat.quota.backends import RedisQuota
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import REDIS_URL, LiveServer, make_account
from faults.fleet import ServerProcess, check_ledger, quota_for, serve_env
from faults.slow_upstream import SlowUpstream

STREAMS = 10  # per account
TTL = 2  # AIMICHAT_RESERVATION_TTL for this test: seconds
MAX_TOKENS = 100
SEEN = 3  # content chunks every stream has delivered before the kill


def make_key(db: Database, email: str, **limits: Any) -> str:
    with db.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), "k", keys.KeyLimits(**limits))
        s.commit()
        return created.secret


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


class Stream(threading.Thread):
    """One streaming request read as it arrives: ``seen`` is set once ``SEEN`` content chunks came."""

    def __init__(self, url: str, key: str):
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.seen = threading.Event()
        self.chunks = 0
        self.done = False  # [DONE] arrived (it must not: the server dies first)
        self.status = 0

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": MAX_TOKENS}
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body | {"stream": True}, headers=headers, timeout=30
            ) as answer:
                self.status = answer.status_code
                for line in answer.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: ") and _content(json.loads(line[6:])):
                        self.chunks += 1
                        if self.chunks >= SEEN:
                            self.seen.set()
        except httpx.HTTPError:
            pass  # the connection dies with the server


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("db_url", "counters"),
    [("sqlite", "sql"), ("postgresql", "sql"), ("postgresql", "redis")],
    indirect=["db_url"],
)
def test_kill_9_with_20_streams_in_flight_then_restart_and_sweep(db_url, counters, tmp_path, redis_prefix):
    db = Database(db_url)
    prepare_database(db, Settings(data_dir=tmp_path, database_url=db_url))
    make_account(db, "req@example.com", daily=100, monthly=200)
    make_account(db, "tok@example.com", daily=10_000, monthly=20_000, cost_rule="per_token", per_1k=1000)
    by_request = make_key(db, "req@example.com", daily_cap=50)
    by_token = make_key(db, "tok@example.com", daily_cap=5_000)
    redis_settings = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if counters == "redis" else {}
    quota = quota_for(db, redis_settings.get("redis_url"), redis_prefix)
    with LiveServer(SlowUpstream(tokens=400, token_delay=0.05)) as upstream:  # 20 s a stream: killed mid-way
        env = serve_env(db_url, tmp_path, upstream.url, reservation_ttl=TTL, **redis_settings)
        server = ServerProcess(env, tmp_path / "server.log").start()
        try:
            server.wait_ready()
            streams = [Stream(server.url, key) for key in [by_request] * STREAMS + [by_token] * STREAMS]
            for stream in streams:
                stream.start()
            for stream in streams:
                assert stream.seen.wait(15), f"a stream did not get going: {stream.status}\n{server.log()}"
            server.kill()
            killed = time.monotonic()
            for stream in streams:
                stream.join(10)
            assert not any(s.done for s in streams) and all(s.status == 200 for s in streams)

            # Nothing was settled, and nothing is lost: 20 rows reserved, counted as the ledger counts them.
            with db.session() as s:
                rows = s.scalars(select(UsageEvent)).all()
            assert len(rows) == 2 * STREAMS and {r.status for r in rows} == {"reserved"}
            before = check_ledger(db, quota, [by_request, by_token])
            assert before.exact, before.mismatches
            assert before.reserved == 2 * STREAMS

            # The restarted server serves at once (the sweep is not what it waits for).
            server = ServerProcess(env, tmp_path / "server.log", port=server.port).start()
            server.wait_ready()
            hello = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            for key in (by_request, by_token):
                answer = httpx.post(
                    f"{server.url}/v1/chat/completions", json=hello, headers={"Authorization": f"Bearer {key}"}
                )
                assert answer.status_code == 200, answer.text

            time.sleep(max(0.0, TTL + 0.5 - (time.monotonic() - killed)))
            cli_env = {k: v for k, v in env.items() if k.startswith("AIMICHAT_")}
            result = CliRunner().invoke(cli, ["reservations", "sweep", "--json"], env=cli_env)
            assert result.exit_code == 0, result.output
            swept = {s["id"]: s for s in json.loads(result.stdout)}  # (its log line goes to stderr)
            assert server.stop() == 0, server.log()
        finally:
            server.kill()

    assert set(swept) == {r.id for r in rows}  # the 20 killed ones, each once; the finished ones untouched
    with db.session() as s:
        after = {r.id: r for r in s.scalars(select(UsageEvent))}
    tok_account = next(r.account_id for r in rows if r.reserved_credits > 1)
    for row in rows:
        settled = after[row.id]
        if row.account_id == tok_account:
            # per token: the prompt (recorded with the row) is charged; the tokens delivered before the crash
            # and the rest of the reservation are refunded
            assert row.prompt_tokens > 0 and row.reserved_credits == row.prompt_tokens + MAX_TOKENS
            assert (swept[row.id]["charged"], swept[row.id]["refunded"]) == (row.prompt_tokens, MAX_TOKENS)
        else:  # per request: the request ran, and its credit is its price
            assert (swept[row.id]["charged"], swept[row.id]["refunded"]) == (1, 0)
        assert (settled.status, settled.credits, settled.estimated) == ("charged", swept[row.id]["charged"], True)
    assert "reserved" not in {r.status for r in after.values()}
    final = check_ledger(db, quota, [by_request, by_token])
    assert final.exact, final.mismatches
    assert final.reserved == 0
    if isinstance(quota, RedisQuota):
        quota.redis.close()
    assert final.charged == STREAMS * 1 + sum(r.prompt_tokens for r in rows if r.account_id == tok_account) + sum(
        r.credits for r in after.values() if r.id not in swept
    )
    db.dispose()
