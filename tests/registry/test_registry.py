"""Many models behind one API, in-process: the registry's models answer under their own names, tiers see
only their models, aliases resolve, each model has its price, and a change reaches another replica.

Engines are scripted (the model is not what is tested here); tests/registry/test_real_models.py runs
real embedded models and a real llama.cpp server side by side.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimichat.config import Settings
from aimichat.engines.configs import build_engine
from aimichat.quota.pricing import Price, charge
from aimichat.registry import service as registry
from aimichat.store.db import Database
from aimichat.store.models import UsageCounter, UsageEvent
from fixtures import LiveServer, app_client, make_account, make_key, scripted_factory, serve_app
from scripted_engine import ScriptedEngine

HI = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5}


def change(db: Database, fn, *args, **kwargs):
    """Change the registry as the CLI or an admin page does: in a session of its own, committed."""
    with db.session() as session:
        result = fn(session, *args, **kwargs)
        session.commit()
        return result


def test_the_default_install_serves_aimichat_1_alone(server):
    make_account(server.db)
    key = make_key(server.db)
    listed = server.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["aimichat-1"]
    assert listed[0]["context_length"] == 4096 and "pricing" not in listed[0]  # prices are per tier: a key's
    mine = server.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert mine[0]["pricing"] == {"per_request": 1}
    answer = server.chat(HI, key)
    assert answer.status_code == 200 and answer.json()["model"] == "aimichat-1"
    with server.db.session() as s:
        assert s.scalars(select(UsageEvent.model)).all() == ["aimichat-1"]


def test_models_added_to_the_registry_answer_under_their_own_names(database, tmp_path):
    factory = scripted_factory()
    change(database, registry.add_embedded, "alpha", system_prompt="You are Alpha.")
    change(database, registry.add_embedded, "beta", system_prompt="You are Beta, who talks a lot.")
    with app_client(ScriptedEngine(), database, tmp_path, engine_factory=factory) as client:
        make_account(database)
        key = make_key(database)
        listed = [m["id"] for m in client.http.get("/v1/models", headers={"X-API-Key": key}).json()["data"]]
        assert listed == ["aimichat-1", "alpha", "beta"]
        for name, prompt in (("alpha", "You are Alpha."), ("beta", "You are Beta, who talks a lot.")):
            for stream in (False, True):
                answer = client.chat({**HI, "model": name, "stream": stream}, key)
                assert answer.status_code == 200, answer.text
                assert f'"model":"{name}"' in answer.text.replace(" ", "")
            assert factory.built[name].generations[-1].messages[0].content == prompt
        assert client.chat({**HI, "model": "gamma"}, key).json()["error"]["code"] == "model_not_found"
        with database.session() as s:
            models = s.execute(select(UsageEvent.model, func.count()).group_by(UsageEvent.model)).all()
        assert dict(models) == {"alpha": 2, "beta": 2}
        usage = client.http.get("/v1/usage", headers={"X-API-Key": key}).json()["models_today"]
        assert {u["model"]: u["requests"] for u in usage} == {"alpha": 2, "beta": 2}
        assert all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 for u in usage)


def test_an_alias_answers_as_its_model(server):
    make_account(server.db)
    key = make_key(server.db)
    change(server.db, registry.add_alias, "aimichat-1", "gpt-4o-mini")
    answer = server.chat({**HI, "model": "gpt-4o-mini"}, key)
    assert answer.status_code == 200 and answer.json()["model"] == "aimichat-1"
    model = server.http.get("/v1/models/gpt-4o-mini").json()
    assert model["id"] == "aimichat-1" and model["aliases"] == ["gpt-4o-mini"]


def test_a_tier_limited_to_one_model_sees_and_uses_only_it(database, tmp_path):
    change(database, registry.add_embedded, "alpha")
    with app_client(ScriptedEngine(), database, tmp_path) as client:
        make_account(database, daily=100, tier="basic")
        key = make_key(database)
        change(database, registry.set_tier_models, "basic", ["alpha"])
        auth = {"Authorization": f"Bearer {key}"}
        assert [m["id"] for m in client.http.get("/v1/models", headers=auth).json()["data"]] == ["alpha"]
        refused = client.chat({**HI, "model": "aimichat-1"}, key)
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "not available on your plan (basic)" in error["message"]
        assert client.http.get("/v1/models/aimichat-1", headers=auth).status_code == 404
        default = client.chat(HI, key)  # no model named: the tier's first
        assert default.status_code == 200 and default.json()["model"] == "alpha"
        assert [m["id"] for m in client.http.get("/v1/models").json()["data"]] == ["aimichat-1", "alpha"]


def test_each_model_is_charged_its_own_price(database, tmp_path):
    change(database, registry.add_embedded, "flat")
    change(database, registry.add_embedded, "metered")
    with app_client(ScriptedEngine(), database, tmp_path) as client:
        make_account(database, daily=1000, tier="pro")
        key = make_key(database)
        change(database, registry.set_price, "pro", "flat", per_request=7)
        change(database, registry.set_price, "pro", "metered", prompt_per_1m=250_000, completion_per_1m=1_000_000)
        auth = {"Authorization": f"Bearer {key}"}
        prices = {m["id"]: m["pricing"] for m in client.http.get("/v1/models", headers=auth).json()["data"]}
        assert prices == {
            "aimichat-1": {"per_request": 1},
            "flat": {"per_request": 7},
            "metered": {"prompt_per_1m": 250_000, "completion_per_1m": 1_000_000},
        }
        for model in ("flat", "metered", "aimichat-1"):
            assert client.chat({**HI, "model": model, "max_tokens": 50}, key).status_code == 200
        with database.session() as s:
            rows = {r.model: r for r in s.scalars(select(UsageEvent))}
        assert rows["flat"].credits == 7 and rows["aimichat-1"].credits == 1
        metered = rows["metered"]
        # the reply's 14 tokens at 1 credit each, plus the prompt at a quarter credit a token, rounded up
        assert metered.completion_tokens == 14
        assert metered.credits == charge(Price.per_token(250_000, 1_000_000), metered.prompt_tokens, 14)
        assert metered.credits == -(-metered.prompt_tokens // 4) + 14
        assert metered.reserved_credits == -(-metered.prompt_tokens // 4) + 50  # the budget, then refunded
        assert client.http.get("/v1/usage", headers=auth).json()["daily"]["used"] == 8 + metered.credits


@pytest.mark.parametrize("counters", ["sql", "redis"])
def test_concurrent_mixed_requests_are_never_oversold(database, tmp_path, counters, redis_prefix):
    """100 requests at once, over two replicas and three prices, against 60 credits: the ledger never
    passes the limit, equals the counters, and every charge is its price times its usage."""
    from fixtures import REDIS_URL

    change(database, registry.add_embedded, "flat")
    change(database, registry.add_embedded, "metered")
    redis = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if counters == "redis" else {}
    replicas = [
        serve_app(
            ScriptedEngine(token_delay=0.002),
            database,
            tmp_path / name,
            engine_factory=scripted_factory(token_delay=0.002),
            **redis,
        )
        for name in ("a", "b")
    ]
    with replicas[0] as first, replicas[1] as second:
        make_account(database, daily=60, tier="small")
        key = make_key(database)
        change(database, registry.set_price, "small", "flat", per_request=3)
        change(database, registry.set_price, "small", "metered", prompt_per_1m=100_000, completion_per_1m=500_000)
        prices = {"flat": Price(per_request=3), "metered": Price.per_token(100_000, 500_000), "aimichat-1": Price(1)}
        models = ["flat", "metered", "aimichat-1"]
        clients = [httpx.Client(base_url=live.url, timeout=60) for live in (first, second)]
        for http in clients:
            assert http.get("/v1/models").status_code == 200  # each replica has read the prices by now

        def call(i: int) -> int:
            body = {**HI, "model": models[i % 3], "max_tokens": 8}
            answer = clients[i % 2].post("/v1/chat/completions", json=body, headers={"X-API-Key": key})
            return answer.status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(call, range(100)))
        for http in clients:
            http.close()
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 10 and 429 in statuses
    with database.session() as s:
        rows = s.scalars(select(UsageEvent)).all()
        counter = s.scalar(select(UsageCounter.used).where(UsageCounter.period == "day"))
    charged = [r for r in rows if r.status == "charged"]
    assert len(charged) == statuses.count(200) and all(r.status != "reserved" for r in rows)
    total = sum(r.credits for r in rows)
    assert total <= 60
    if counters == "sql":
        assert counter == total
    else:
        import redis as redis_lib

        client = redis_lib.Redis.from_url(REDIS_URL)
        (day_key,) = client.keys(f"{redis_prefix}:q:*:d:*")
        assert int(client.get(day_key)) == total
        client.close()
    for r in charged:
        exact = charge(prices[r.model], r.prompt_tokens, r.completion_tokens)
        assert r.credits == min(r.reserved_credits, exact), (r.model, r.credits, exact)
        assert r.credits == exact or r.completion_tokens < 8  # clamped only where credits ran short


def test_a_model_missing_its_gguf_is_unready_alone(database, tmp_path):
    settings = Settings(data_dir=tmp_path)
    real = lambda spec, threads: build_engine(spec.name, spec.config, settings, threads=threads)  # noqa: E731
    change(database, registry.add_embedded, "ghost", gguf=tmp_path / "missing.gguf")
    with app_client(ScriptedEngine(), database, tmp_path, engine_factory=real) as client:
        make_account(database)
        key = make_key(database)
        ready = client.http.get("/readyz")
        assert ready.status_code == 200
        models = {m["model"]: m for m in ready.json()["models"]}
        assert models["aimichat-1"]["ready"] is True
        assert models["ghost"]["ready"] is False and models["ghost"]["state"] == "failed"
        assert "missing.gguf" in models["ghost"]["error"]
        refused = client.chat({**HI, "model": "ghost"}, key)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        assert "Retry-After" in refused.headers
        assert client.chat(HI, key).status_code == 200


def test_hiding_aimichat_1_and_showing_it_again(server):
    make_account(server.db)
    key = make_key(server.db)
    change(server.db, registry.remove_model, "aimichat-1")
    assert server.http.get("/v1/models").json()["data"] == []
    assert server.chat(HI, key).status_code == 404
    assert server.http.get("/readyz").status_code == 503  # no model can answer here
    change(server.db, registry.restore_model, "aimichat-1")
    assert server.chat(HI, key).json()["model"] == "aimichat-1"


def test_a_model_loads_on_demand_and_unloads_when_idle(database, tmp_path):
    factory = scripted_factory()
    change(database, registry.add_embedded, "sleepy", load_on_demand=True, idle_unload=0.3)
    with app_client(ScriptedEngine(), database, tmp_path, engine_factory=factory, registry_poll_seconds=0.1) as client:
        make_account(database)
        key = make_key(database)
        state = lambda: {m["model"]: m["state"] for m in client.http.get("/readyz").json()["models"]}["sleepy"]  # noqa: E731
        assert state() == "unloaded" and "sleepy" not in factory.built
        assert client.chat({**HI, "model": "sleepy"}, key).status_code == 200
        assert state() == "ready"
        deadline = time.monotonic() + 5
        while state() != "unloaded":
            assert time.monotonic() < deadline, "the idle model was never unloaded"
            time.sleep(0.05)
        assert factory.built["sleepy"].loaded is False
        assert client.chat({**HI, "model": "sleepy"}, key).status_code == 200  # loaded again


def _wait_for(what, predicate, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_change_made_anywhere_reaches_another_replica_within_5_seconds(database, tmp_path):
    """Two replicas over one database; the change comes from a third party (as the CLI would): only
    polling can tell the replicas."""
    with (
        serve_app(ScriptedEngine(), database, tmp_path / "a") as first,
        serve_app(ScriptedEngine(), database, tmp_path / "b") as second,
    ):
        make_account(database)
        key = make_key(database)
        operator = Database(database.url)  # another process's connection pool and session factory
        change(operator, registry.add_upstream, "far", "http://127.0.0.1:9/v1")
        change(operator, registry.add_embedded, "near")
        for live in (first, second):
            took = _wait_for(
                "the new model", lambda live=live: live.chat({**HI, "model": "near"}, key).status_code == 200
            )
            assert took < 5
        change(operator, registry.remove_model, "near")
        for live in (first, second):
            _wait_for("the removal", lambda live=live: live.chat({**HI, "model": "near"}, key).status_code == 404)
        operator.dispose()


def _fake_upstream(models: list[str]) -> Starlette:
    async def listing(request):
        return JSONResponse(
            {"object": "list", "data": [{"id": m, "object": "model", "max_model_len": 8192} for m in models]}
        )

    return Starlette(routes=[Route("/v1/models", listing)])


def test_a_discovered_upstream_serves_what_it_lists_and_only_its_models_go_unready(database, tmp_path):
    factory = scripted_factory()
    with LiveServer(_fake_upstream(["llama3:8b", "qwen2:0.5b"])) as upstream:
        change(database, registry.add_source, upstream.url + "/v1", prefix="ollama/")
        with app_client(
            ScriptedEngine(),
            database,
            tmp_path,
            engine_factory=factory,
            discovery_interval=0.2,
            registry_poll_seconds=0.1,
        ) as client:
            make_account(database)
            key = make_key(database)
            listed = {m["id"]: m for m in client.http.get("/v1/models").json()["data"]}
            assert set(listed) == {"aimichat-1", "ollama/llama3:8b", "ollama/qwen2:0.5b"}
            assert listed["ollama/qwen2:0.5b"]["context_length"] == 8192
            answer = client.chat({**HI, "model": "ollama/qwen2:0.5b"}, key)
            assert answer.json()["model"] == "ollama/qwen2:0.5b"
            upstream.__exit__(None, None, None)  # the upstream goes away

            def states():
                return {m["model"]: m["ready"] for m in client.http.get("/readyz").json()["models"]}

            _wait_for("the upstream's models to go unready", lambda: not states()["ollama/llama3:8b"])
            assert states() == {"aimichat-1": True, "ollama/llama3:8b": False, "ollama/qwen2:0.5b": False}
            assert client.http.get("/readyz").status_code == 200


def test_an_upstream_discovered_while_serving_is_served_within_5_seconds(database, tmp_path):
    with (
        LiveServer(_fake_upstream(["mistral:7b"])) as upstream,
        app_client(ScriptedEngine(), database, tmp_path, registry_poll_seconds=0.5) as client,
    ):
        make_account(database)
        key = make_key(database)
        operator = Database(database.url)
        change(operator, registry.add_source, upstream.url, prefix="far/")
        took = _wait_for(
            "the discovered model", lambda: client.chat({**HI, "model": "far/mistral:7b"}, key).status_code == 200
        )
        assert took < 5
        operator.dispose()
