"""When the database goes away, chat requests fail closed (503 + Retry-After, nothing charged, no
engine call) and service resumes by itself when it returns.

The app runs in-process with the scripted engine; the database really goes away (a TCP proxy in front of
PostgreSQL stops, Redis pauses its writes).
"""

from __future__ import annotations

import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import REDIS_URL, app_client, make_account, make_key, migrated, new_postgres_database
from scripted_engine import ScriptedEngine
from tcp_proxy import TCPProxy

HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def test_postgresql_outage_fails_closed_and_recovers_without_restart(tmp_path):
    url, drop = new_postgres_database()
    real = make_url(url)
    proxy = TCPProxy(real.host, real.port or 5432).start()
    direct = migrated(url)
    make_account(direct, daily=100)
    key = make_key(direct)
    via_proxy = Database(real.set(port=proxy.port).render_as_string(hide_password=False))
    try:
        engine = ScriptedEngine()
        with app_client(engine, via_proxy, tmp_path) as server:
            server.key = key
            assert server.chat(HELLO).status_code == 200

            proxy.stop()
            for _ in range(3):
                r = server.chat(HELLO)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
            ready = server.http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"]["ok"] is False
            assert len(engine.generations) == 1, "no engine call without the database"

            proxy.start()  # same port: the database is back
            assert server.chat(HELLO).status_code == 200
            assert server.http.get("/readyz").status_code == 200
        with direct.session() as s:
            assert s.scalar(select(func.count(UsageEvent.id))) == 2  # the refused requests left no trace
    finally:
        proxy.stop()
        via_proxy.dispose()
        direct.dispose()
        drop()


def test_redis_outage_fails_closed_and_recovers_without_restart(database, tmp_path, redis_prefix):
    make_account(database, daily=100)
    key = make_key(database)
    admin = redis.Redis.from_url(REDIS_URL)
    engine = ScriptedEngine()
    with app_client(engine, database, tmp_path, redis_url=REDIS_URL, redis_prefix=redis_prefix) as server:
        server.key = key
        assert server.chat(HELLO).status_code == 200
        admin.execute_command("CLIENT", "PAUSE", 4000, "WRITE")  # Redis stops answering writes for 4 s
        try:
            r = server.chat(HELLO)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        assert len(engine.generations) == 1, "no engine call without the counters"
        assert server.chat(HELLO).status_code == 200
    with database.session() as s:
        rows = s.scalars(select(UsageEvent)).all()
    assert [(r.status, r.credits) for r in rows] == [("charged", 1), ("charged", 1)]
    admin.close()
