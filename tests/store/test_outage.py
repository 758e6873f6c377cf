"""When the database goes away, chat requests fail closed (503 + Retry-After, nothing charged, no
engine call) and service resumes by itself when it returns."""

from __future__ import annotations

import secrets

import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import REDIS_URL, make_account, make_key, new_postgres_database, serve_app
from tcp_proxy import TCPProxy

HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def test_postgresql_outage_fails_closed_and_recovers_without_restart(engine, tmp_path):
    url, drop = new_postgres_database()
    real = make_url(url)
    proxy = TCPProxy(real.host, real.port or 5432).start()
    direct = Database(url)
    direct.upgrade()
    make_account(direct, daily=100)
    key = make_key(direct)
    via_proxy = Database(real.set(port=proxy.port).render_as_string(hide_password=False))
    try:
        with serve_app(engine, via_proxy, tmp_path) as server:
            chat = lambda: requests.post(f"{server.url}/v1/chat/completions", json=HELLO,  # noqa: E731
                                         headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert chat().status_code == 200

            proxy.stop()
            for _ in range(3):
                r = chat()
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
            ready = requests.get(f"{server.url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["database"]["ok"] is False

            proxy.start()  # same port: the database is back
            assert chat().status_code == 200
            assert requests.get(f"{server.url}/readyz", timeout=30).status_code == 200
        with direct.session() as s:
            assert s.scalar(select(func.count(UsageEvent.id))) == 2  # the refused requests left no trace
    finally:
        proxy.stop()
        via_proxy.dispose()
        direct.dispose()
        drop()


def test_redis_outage_fails_closed_and_recovers_without_restart(engine, database, tmp_path):
    make_account(database, daily=100)
    key = make_key(database)
    admin = redis.Redis.from_url(REDIS_URL)
    with serve_app(engine, database, tmp_path, redis_url=REDIS_URL, redis_prefix=f"aimichat-test-{secrets.token_hex(4)}") as server:
        chat = lambda: requests.post(f"{server.url}/v1/chat/completions", json=HELLO,  # noqa: E731
                                     headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert chat().status_code == 200
        admin.execute_command("CLIENT", "PAUSE", 4000, "WRITE")  # Redis stops answering writes for 4 s
        try:
            r = chat()
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        assert chat().status_code == 200
    with database.session() as s:
        rows = s.scalars(select(UsageEvent)).all()
    assert [(r.status, r.credits) for r in rows] == [("charged", 1), ("charged", 1)]
    admin.close()
