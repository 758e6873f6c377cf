"""The model registry on the web pages, in-process on SQLite and PostgreSQL: the admin's models and prices
pages (every form, its CSRF rule, who may use it, what it refuses), the playground's model picker, the
models and prices on /plan and /docs, and usage by model (page, CSV, account API).

Each registry model is answered by a ScriptedEngine that says its own name ("This is second speaking."),
so an answer shows which model wrote it. The app does not poll the registry (``registry_poll_seconds=0``):
a page that shows a change right after it was made proves the pages read the registry themselves.
"""

from __future__ import annotations

import html
import re

import pytest
from sqlalchemy import select, update
from web_helpers import PASSWORD, Browser

from aimichat.accounts import service as accounts
from aimichat.registry.catalog import read_version
from aimichat.store.models import ModelRecord, UsageEvent
from conftest import app_client, make_account, make_key, sse_events, sse_text
from scripted_engine import REPLY, ScriptedEngine

ADMIN = "admin@example.com"
USER = "member@example.com"


def speaking(name: str) -> str:
    return f"This is {name} speaking."


def factory(spec, threads):
    return ScriptedEngine(speaking(spec.name), model_id=spec.name)


@pytest.fixture
def server(database, tmp_path):
    with app_client(ScriptedEngine(), database, tmp_path, engine_factory=factory, registry_poll_seconds=0) as client:
        with database.session() as s:
            accounts.create_account(s, ADMIN, PASSWORD, is_admin=True)
            accounts.create_account(s, USER, PASSWORD)
            s.commit()
        yield client


def logged_in(server, email: str) -> Browser:
    b = Browser(server)
    assert b.log_in(email).status_code == 303
    return b


def version(server) -> int:
    with server.db.sql_engine.connect() as conn:
        return read_version(conn)


def text_of(response) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", response.text))


def models_table(page: str) -> str:
    return re.search(r'<table class="responsive models">.*?</table>', page, re.S).group(0)


def row(page: str, model: str) -> str | None:
    """The models table's row of ``model`` (None when it is not listed)."""
    found = re.search(rf'<tr data-model="{re.escape(model)}">.*?</tr>', models_table(page), re.S)
    return found.group(0) if found else None


def tier_card(page: str, tier: str) -> str:
    return re.search(rf'<section class="card tier-card"[^>]*data-tier="{tier}">.*?</section>', page, re.S).group(0)


def listed(page: str) -> list[str]:
    """The models a plan, docs or usage table lists, in order."""
    return re.findall(r'<tr data-model="([^"]+)">', page)


def add_second(admin: Browser, **fields) -> None:
    admin.get("/admin/models")
    r = admin.post("/admin/models/embedded", {"name": "second", **fields})
    assert r.status_code == 303 and r.headers["location"] == "/admin/models?done=saved&name=second", r.text


def ask(server, key: str, model: str | None = None):
    body = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 20}
    return server.chat(body | ({"model": model} if model else {}), key)


# -- the admin's models page ---------------------------------------------------------------------


def test_the_models_page_lists_the_catalog(server):
    with logged_in(server, ADMIN) as admin:
        assert 'href="/admin/models"' in admin.get("/admin").text
        page = admin.get("/admin/models")
        assert page.status_code == 200
        builtin = row(page.text, "aimichat-1")
        assert builtin is not None
        assert '<td data-label="Engine" class="engine">embedded</td>' in builtin and ">settings<" in builtin
        assert ">ready</span>" in builtin and ">4,096</td>" in builtin
        assert "Add an embedded model" in page.text and "Add an upstream model" in page.text
        assert "1 credit per request" in tier_card(page.text, "free")


def test_an_embedded_model_is_added_edited_and_removed(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin:
        add_second(admin, parallel="2", context_length="1024", system_prompt="Be brief.")
        page = admin.get("/admin/models?done=saved&name=second").text
        assert "Saved the model second." in page
        listed_row = row(page, "second")
        assert listed_row is not None and ">1,024</td>" in listed_row and ">registry<" in listed_row
        answer = ask(server, key, "second")
        assert answer.status_code == 200 and answer.json()["model"] == "second"
        assert answer.json()["choices"][0]["message"]["content"] == speaking("second")

        edit = admin.get("/admin/models/edit?name=second")
        assert edit.status_code == 200
        assert 'name="context_length" type="number" min="256" value="1024"' in edit.text
        assert 'value="2"' in edit.text and ">Be brief.</textarea>" in edit.text
        assert '<input type="hidden" name="name" value="second">' in edit.text
        saved = admin.post("/admin/models/embedded", {"name": "second", "context_length": "2048", "parallel": "2"})
        assert saved.status_code == 303
        assert ">2,048</td>" in row(admin.get("/admin/models").text, "second")
        with server.db.session() as s:
            config = s.scalar(select(ModelRecord.config).where(ModelRecord.name == "second"))
            assert config == {"context_length": 2048, "parallel": 2}, "the edit replaced the definition"

        # Without JavaScript, Remove asks first (and changes nothing until confirmed).
        before = version(server)
        confirm = admin.post("/admin/models/remove", {"name": "second"})
        assert confirm.status_code == 200 and "Remove the model “second”?" in html.unescape(confirm.text)
        assert version(server) == before
        assert admin.post("/admin/models/remove", {"name": "second", "confirm": "yes"}).status_code == 303
        assert row(admin.get("/admin/models").text, "second") is None
        assert ask(server, key, "second").status_code == 404
        assert admin.get("/admin/models/edit?name=second").status_code == 404


def test_an_upstream_model_is_added_with_the_name_of_its_key_variable(server):
    with logged_in(server, ADMIN) as admin:
        admin.get("/admin/models")
        fields = {
            "name": "remote",
            "urls": "http://127.0.0.1:9/v1, http://127.0.0.1:10/v1",
            "upstream_model": "llama3",
            "api_key_env": "REMOTE_API_KEY",
            "context_length": "8192",
        }
        assert admin.post("/admin/models/upstream", fields).status_code == 303
        remote = row(admin.get("/admin/models").text, "remote")
        assert remote is not None and ">upstream</td>" in remote and ">8,192</td>" in remote
        edit = admin.get("/admin/models/edit?name=remote").text
        for value in ("http://127.0.0.1:9/v1, http://127.0.0.1:10/v1", "llama3", "REMOTE_API_KEY", "8192"):
            assert f'value="{value}"' in edit, value

        # A key pasted where its variable's name belongs is refused, and not shown back in full.
        refused = admin.post("/admin/models/upstream", fields | {"name": "leak", "api_key_env": "sk-secret-123456"})
        assert refused.status_code == 400 and "environment variable" in text_of(refused)
        assert "sk-secret-123456" not in refused.text
        assert row(admin.get("/admin/models").text, "leak") is None


def test_aliases_are_added_and_removed(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin:
        admin.get("/admin/models")
        assert admin.post("/admin/models/alias", {"model": "aimichat-1", "alias": "gpt-4o-mini"}).status_code == 303
        assert "<code>gpt-4o-mini</code>" in row(admin.get("/admin/models").text, "aimichat-1")
        answer = ask(server, key, "gpt-4o-mini")
        assert answer.status_code == 200 and answer.json()["model"] == "aimichat-1"
        assert admin.post("/admin/models/unalias", {"alias": "gpt-4o-mini"}).status_code == 303
        assert "gpt-4o-mini" not in row(admin.get("/admin/models").text, "aimichat-1")
        assert ask(server, key, "gpt-4o-mini").status_code == 404


def test_the_builtin_model_is_hidden_and_served_again(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin:
        admin.get("/admin/models")
        assert admin.post("/admin/models/remove", {"name": "aimichat-1", "confirm": "yes"}).status_code == 303
        page = admin.get("/admin/models").text
        assert row(page, "aimichat-1") is None
        assert re.search(r'class="plain hidden-models">.*?<code>aimichat-1</code>.*?Serve again', page, re.S)
        assert ask(server, key, "aimichat-1").status_code == 404
        assert admin.post("/admin/models/restore", {"name": "aimichat-1"}).status_code == 303
        assert row(admin.get("/admin/models").text, "aimichat-1") is not None
        assert ask(server, key, "aimichat-1").status_code == 200


BAD_INPUT = [
    ("/admin/models/embedded", {"name": "bad name!"}, "invalid model name"),
    ("/admin/models/embedded", {"name": "x", "parallel": "many"}, "parallel must be a whole number"),
    ("/admin/models/embedded", {"name": "x", "parallel": "0"}, "parallel must be between 1 and 256"),
    ("/admin/models/embedded", {"name": "x", "context_length": "100"}, "at least 256 tokens"),
    ("/admin/models/embedded", {"name": "x", "threads": "99999999999"}, "threads is too large"),
    ("/admin/models/embedded", {"name": "x", "gguf": "models/x.gguf"}, "absolute path"),
    ("/admin/models/embedded", {"name": "x", "gguf": "~nosuchuser-aimichat/x.gguf"}, "home directory"),
    ("/admin/models/upstream", {"name": "y", "urls": "ftp://example.com"}, "http(s)://"),
    ("/admin/models/upstream", {"name": "y", "urls": " "}, "at least one server URL"),
    ("/admin/models/remove", {"name": "ghost", "confirm": "yes"}, "no model named 'ghost'"),
    ("/admin/models/restore", {"name": "ghost"}, "'ghost' is not hidden"),
    ("/admin/models/alias", {"model": "aimichat-1", "alias": "bad alias!"}, "invalid alias"),
    ("/admin/models/unalias", {"alias": "ghost"}, "no alias named 'ghost'"),
    ("/admin/prices", {"tier": "free", "model": "aimichat-1", "per_request": "-3"}, ("negative", "between 0")),
    (
        "/admin/prices",
        {"tier": "free", "model": "aimichat-1", "prompt_per_1m": "-1", "completion_per_1m": "2"},
        "cannot be negative",
    ),
    (
        "/admin/prices",
        {"tier": "free", "model": "aimichat-1", "prompt_per_1m": "nan", "completion_per_1m": "2"},
        "number of sensible size",
    ),
    ("/admin/prices", {"tier": "free", "model": "aimichat-1", "per_request": "two"}, "whole number"),
    ("/admin/prices", {"tier": "free", "model": "aimichat-1"}, "either a per-request price"),
    ("/admin/prices", {"tier": "free", "model": "bad name!", "per_request": "2"}, "invalid model name"),
    ("/admin/prices", {"tier": "nope", "model": "aimichat-1", "per_request": "2"}, "unknown tier 'nope'"),
    ("/admin/prices/remove", {"tier": "free", "model": "aimichat-1"}, "has no price"),
    ("/admin/tiers/models", {"tier": "free", "access": "maybe"}, "Choose every model"),
    ("/admin/tiers/models", {"tier": "free", "access": "some", "models": ["ok", "bad name!"]}, "invalid model name"),
    ("/admin/tiers/models", {"tier": "nope", "access": "all"}, "unknown tier"),
]


def test_bad_input_is_a_400_page_and_saves_nothing(server):
    with logged_in(server, ADMIN) as admin:
        admin.get("/admin/models")
        before = version(server)
        for path, data, message in BAD_INPUT:
            r = admin.post(path, data)
            assert r.status_code == 400, (path, data, r.status_code)
            shown = text_of(r).lower()
            wanted = (message,) if isinstance(message, str) else message  # alternatives
            assert r.headers["content-type"].startswith("text/html") and any(w.lower() in shown for w in wanted), (
                path,
                message,
            )
        assert version(server) == before, "nothing was saved"
        assert admin.get("/admin/models/edit?name=ghost").status_code == 404


VALID_POSTS = [
    ("/admin/models/embedded", {"name": "forged"}),
    ("/admin/models/upstream", {"name": "forged", "urls": "http://127.0.0.1:9/v1"}),
    ("/admin/models/remove", {"name": "aimichat-1", "confirm": "yes"}),
    ("/admin/models/alias", {"model": "aimichat-1", "alias": "forged"}),
    ("/admin/prices", {"tier": "free", "model": "aimichat-1", "per_request": "9"}),
    ("/admin/tiers/models", {"tier": "free", "access": "some"}),
]


def test_forms_without_the_csrf_token_are_refused(server):
    with logged_in(server, ADMIN) as admin:
        admin.get("/admin/models")
        before = version(server)
        for path, data in VALID_POSTS:
            for token in (None, "", "wrong"):
                sent = data if token is None else data | {"csrf_token": token}
                assert admin.post(path, sent, csrf=False).status_code == 403, (path, token)
        assert version(server) == before
        assert row(admin.get("/admin/models").text, "aimichat-1") is not None


def test_only_admins_reach_the_models_pages(server):
    with server.client() as anonymous:
        r = anonymous.get("/admin/models")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/admin/models&reason=login"
    with logged_in(server, USER) as member:
        assert member.get("/admin/models").status_code == 403
        assert member.get("/admin/models/edit?name=aimichat-1").status_code == 403
        before = version(server)
        for path, data in [*VALID_POSTS, ("/admin/models/unalias", {"alias": "x"}), ("/admin/prices/remove", {})]:
            member.get("/plan")  # a valid token of the member's own
            assert member.post(path, data).status_code == 403, path
        assert version(server) == before


# -- prices and access, as the admin sets them and the member sees them --------------------------


def test_prices_reach_the_plan_docs_and_the_charge(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin, logged_in(server, USER) as member:
        add_second(admin)
        assert admin.post("/admin/prices", {"tier": "free", "model": "second", "per_request": "5"}).status_code == 303
        card = tier_card(admin.get("/admin/models").text, "free")
        assert re.search(r'data-model="second">.*?5 credits per request.*?Remove price', card, re.S)

        plan = member.get("/plan").text
        assert listed(plan) == ["aimichat-1", "second"]
        assert re.search(r'data-model="second">.*?5 credits per request', plan, re.S)
        assert re.search(r'data-model="aimichat-1">.*?1 credit per request', plan, re.S)
        docs = member.get("/docs").text
        assert re.search(r'data-model="second">.*?5 credits per request', docs, re.S)
        assert "models of your plan (free)" in docs

        assert ask(server, key, "second").status_code == 200
        usage = server.http.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        assert usage["daily"]["used"] == 5, "charged at the model's price"

        tokens = {"tier": "free", "model": "aimichat-1", "prompt_per_1m": "1000", "completion_per_1m": "2000.5"}
        assert admin.post("/admin/prices", tokens).status_code == 303
        plan = member.get("/plan").text
        assert "1000 credits per 1M prompt tokens, 2000.5 per 1M completion tokens" in plan

        assert admin.post("/admin/prices/remove", {"tier": "free", "model": "second"}).status_code == 303
        assert re.search(r'data-model="second">.*?1 credit per request', member.get("/plan").text, re.S)
        assert (
            "Removed the price of second for free" in admin.get("/admin/models?done=unprice&name=second+for+free").text
        )


def test_tier_access_limits_what_the_pages_offer(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin, logged_in(server, USER) as member:
        add_second(admin)
        saved = admin.post("/admin/tiers/models", {"tier": "free", "access": "some", "models": ["second"]})
        assert saved.status_code == 303
        card = tier_card(admin.get("/admin/models").text, "free")
        assert 'value="some" checked' in card and 'value="second" checked' in card
        assert 'value="aimichat-1" checked' not in card

        assert listed(member.get("/plan").text) == ["second"]
        assert "a request without one uses <code>second</code>" in member.get("/plan").text
        assert listed(member.get("/docs").text) == ["second"]
        playground = member.get("/playground").text
        assert re.findall(r'<option value="([^"]+)"', playground) == ["second"]
        assert '<option value="second" selected>' in playground
        assert ask(server, key, "aimichat-1").status_code == 404
        assert ask(server, key).json()["model"] == "second", "the tier's first model is its default"

        with server.client() as anonymous:
            docs = anonymous.get("/docs").text
            assert listed(docs) == ["second"] and "a new account gets (the free plan)" in docs

        assert admin.post("/admin/tiers/models", {"tier": "free", "access": "all"}).status_code == 303
        assert listed(member.get("/plan").text) == ["aimichat-1", "second"]
        assert ask(server, key, "aimichat-1").status_code == 200


# -- the playground's model picker ---------------------------------------------------------------


def test_the_playground_answers_with_the_model_picked(server):
    with logged_in(server, ADMIN) as admin:
        add_second(admin)
    with logged_in(server, USER) as member:
        page = member.get("/playground").text
        assert re.findall(r'<option value="([^"]+)"', page) == ["aimichat-1", "second"]
        assert '<option value="aimichat-1" selected>' in page and "second · 1 credit per request" in page

        # Without JavaScript: the form posts the model; the reply is labelled with it, and stays picked.
        first = member.post("/playground", {"message": "Who are you?", "model": "second"})
        assert first.status_code == 200
        assert re.search(
            r'data-model="second"><span class="who">second</span><div class="text">This is second', first.text
        )
        assert '<option value="second" selected>' in first.text
        follow_up = member.post(
            "/playground",
            {
                "role": ["user", "assistant"],
                "content": ["Who are you?", speaking("second")],
                "turn_model": ["", "second"],
                "message": "And you?",
                "model": "aimichat-1",
            },
        )
        labels = re.findall(r'<li class="msg [^"]+"[^>]*><span class="who">([^<]+)</span>', follow_up.text)
        assert labels == ["You", "second", "You", "aimichat-1"]
        assert html.escape(REPLY) in follow_up.text, "the default model's own reply"

        # With JavaScript: the stream carries the model, as the API's does.
        stream = member.api(
            "POST", "/playground/stream", json={"messages": [{"role": "user", "content": "Hi"}], "model": "second"}
        )
        events = sse_events(stream.text)
        assert stream.status_code == 200 and sse_text(events) == speaking("second")
        assert {e["model"] for e in events if isinstance(e, dict)} == {"second"}

        bad = member.api(
            "POST", "/playground/stream", json={"messages": [{"role": "user", "content": "Hi"}], "model": 7}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        unknown = member.api(
            "POST", "/playground/stream", json={"messages": [{"role": "user", "content": "Hi"}], "model": "nope"}
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        page = member.post("/playground", {"message": "Hi", "model": "nope"})
        assert page.status_code == 404 and "The model 'nope' does not exist" in text_of(page)
    with server.db.session() as s:
        assert sorted(s.scalars(select(UsageEvent.model))) == ["aimichat-1", "second", "second"]


# -- usage by model ------------------------------------------------------------------------------


def test_usage_page_csv_and_account_api_break_usage_down_by_model(server):
    key = make_key(server.db, USER)
    with logged_in(server, ADMIN) as admin:
        add_second(admin)
        admin.post("/admin/prices", {"tier": "free", "model": "second", "per_request": "3"})
    for model in ("aimichat-1", "aimichat-1", "second"):
        assert ask(server, key, model).status_code == 200
    with server.db.session() as s:  # a row written before the registry existed names no model
        first = s.scalars(select(UsageEvent.id).order_by(UsageEvent.id)).first()
        s.execute(update(UsageEvent).where(UsageEvent.id == first).values(model=None))
        s.commit()
    with logged_in(server, USER) as member:
        page = member.get("/usage").text
        for table_id in ("models-today", "models-30-days"):
            table = re.search(rf'<table class="responsive by-model" id="{table_id}">.*?</table>', page, re.S).group(0)
            assert listed(table) == ["second", "aimichat-1"], "most credits first"
            assert re.search(r'data-model="second">.*?class="num credits">3<', table, re.S)
            assert re.search(r'data-model="aimichat-1">.*?class="num">2<.*?class="num credits">2<', table, re.S)

        lines = member.get("/usage.csv").text.strip().splitlines()
        assert lines[0].endswith(",completion_tokens,model")
        assert [line.rsplit(",", 1)[1] for line in lines[1:]] == ["aimichat-1", "aimichat-1", "second"]

        body = member.api("GET", "/api/account/usage?days=7").json()
        assert {m["model"]: m["credits"] for m in body["models"]} == {"second": 3, "aimichat-1": 2}
        assert {m["model"]: m["requests"] for m in body["models_today"]} == {"second": 1, "aimichat-1": 2}


def test_the_docs_list_models_for_a_visitor_without_an_account(server):
    make_account(server.db, "unused@example.com")
    with server.client() as anonymous:
        docs = anonymous.get("/docs").text
        assert listed(docs) == ["aimichat-1"]
        assert re.search(r'data-model="aimichat-1">.*?4,096 tokens.*?1 credit per request', docs, re.S)
        assert "a new account gets (the free plan)" in docs
