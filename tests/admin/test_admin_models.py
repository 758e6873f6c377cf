"""The model registry through the admin API (/admin/v1/models): models added (upstream and embedded),
listed with their settings, aliased, used by alias on /v1/chat/completions, their sampling changed,
removed and hidden; aliases, discovered sources, the registry as TOML; 400s in OpenAI's shape, an API
key's 403, and the audit rows naming the admin key."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import Admin, assert_error, make_admin_key

from aimichat.store.db import Database
from conftest import AppClient, app_client, make_account, make_key, migrated
from fixtures import scripted_factory
from scripted_engine import ScriptedEngine

HELLO = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}
UPSTREAM = {
    "name": "remote",
    "engine": "upstream",
    "urls": ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"],
    "upstream_model": "meta/llama",
    "api_key_env": "REMOTE_KEY",
    "context_length": 32768,
    "strip_fields": ["seed"],
    "temperature": 0.3,
}
EMBEDDED = {"name": "local", "engine": "embedded", "gguf": "/models/local.gguf", "parallel": 2, "top_p": 0.9}


@pytest.fixture
def sqlite_server(sqlite_url: str, tmp_path: Path) -> Iterator[AppClient]:
    """The app over a new SQLite database, for what the database does not change."""
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path) as client:
        yield client
    db.dispose()


@pytest.fixture
def admin(sqlite_server: AppClient) -> Admin:
    return Admin(sqlite_server.http, make_admin_key(sqlite_server.db)[1])


def listed(admin: Admin) -> dict[str, dict[str, Any]]:
    answer = admin.get("/models")
    assert answer.status_code == 200, answer.text
    return {m["name"]: m for m in answer.json()["data"]}


def test_models_added_through_the_api_are_listed_served_by_alias_and_removed(database: Database, tmp_path: Path):
    factory = scripted_factory()
    with app_client(ScriptedEngine(), database, tmp_path, engine_factory=factory) as client:
        admin_id, secret = make_admin_key(database)
        admin = Admin(client.http, secret)
        make_account(database)
        key = make_key(database)

        remote = admin.post("/models", json=UPSTREAM)
        assert remote.status_code == 201, remote.text
        assert remote.json() | {"ready": None, "state": None} == {
            "object": "model",
            "name": "remote",
            "engine": "upstream",
            "origin": "registry",
            "aliases": [],
            "context_length": 32768,
            "source": None,
            "urls": UPSTREAM["urls"],
            "upstream_model": "meta/llama",
            "api_key_env": "REMOTE_KEY",
            "system_prompt": None,
            "multimodal": False,
            "strip_fields": ["seed"],
            "refuse_fields": [],
            "temperature": 0.3,
            "top_p": None,
            "ready": None,
            "state": None,
            "error": None,
        }
        local = admin.post("/models", json=EMBEDDED)
        assert local.status_code == 201, local.text
        assert local.json()["engine"] == "embedded" and local.json()["gguf"] == "/models/local.gguf"

        models = listed(admin)
        assert list(models) == ["aimichat-1", "remote", "local"]
        assert models["local"]["parallel"] == 2 and models["local"]["top_p"] == 0.9
        assert models["local"]["context_length"] == client.app.state.settings.context_length  # the server's
        assert models["remote"]["urls"] == UPSTREAM["urls"] and models["remote"]["temperature"] == 0.3

        alias = admin.post("/models/aliases", json={"alias": "gpt-4o-mini", "model": "local"})
        assert alias.status_code == 201, alias.text
        assert listed(admin)["local"]["aliases"] == ["gpt-4o-mini"]
        chat = client.chat({**HELLO, "model": "gpt-4o-mini"}, key)
        assert chat.status_code == 200, chat.text
        assert len(factory.built["local"].generations) == 1, "the alias is answered by the model it names"
        assert factory.built["local"].generations[-1].params.top_p == 0.9

        patched = admin.patch("/models/local", json={"top_p": None, "temperature": 0.5})
        assert patched.status_code == 200, patched.text
        assert (patched.json()["temperature"], patched.json()["top_p"]) == (0.5, None)
        assert patched.json()["parallel"] == 2, "its other settings stay"
        assert client.chat({**HELLO, "model": "local"}, key).status_code == 200
        assert factory.built["local"].generations[-1].params.temperature == 0.5

        removed = admin.delete("/models/local")
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"object": "model", "name": "local", "deleted": True, "hidden": False}
        assert_error(client.chat({**HELLO, "model": "gpt-4o-mini"}, key), 404, code="model_not_found")
        hidden = admin.delete("/models/aimichat-1")
        assert hidden.status_code == 200 and hidden.json()["hidden"] is True
        after = admin.get("/models").json()
        assert [m["name"] for m in after["data"]] == ["remote"] and after["hidden"] == ["aimichat-1"]
        assert admin.post("/models/aimichat-1/restore").status_code == 200
        assert list(listed(admin)) == ["aimichat-1", "remote"]

        audit = admin.get("/audit", params={"actor": f"admin_key:{admin_id}", "per_page": 200})
        assert audit.status_code == 200, audit.text
        rows = [(e["action"], e["target"]) for e in reversed(audit.json()["data"])]
        assert rows == [
            ("model.saved", "model:remote"),
            ("model.saved", "model:local"),
            ("alias.added", "alias:gpt-4o-mini"),
            ("model.saved", "model:local"),
            ("model.removed", "model:local"),
            ("model.hidden", "model:aimichat-1"),
            ("model.restored", "model:aimichat-1"),
        ]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"name": "m", "engine": "magic"}, "engine", "embedded"),
        ({"name": "m", "engine": "embedded", "api_key_env": "KEY"}, None, "api_key_env"),
        ({"name": "m", "engine": "upstream", "urls": ["http://x:1/v1"], "gguf": "a.gguf"}, None, "gguf"),
        ({"name": "m", "engine": "upstream"}, None, "url"),
        ({"name": "m", "engine": "embedded", "colour": "red"}, "colour", ""),
        ({"name": "bad name", "engine": "embedded"}, None, "Invalid model name"),
        ({"name": "m", "engine": "embedded", "temperature": 3}, None, "temperature"),
        ({"name": "m", "engine": "embedded", "parallel": "4"}, "parallel", ""),
        ({"name": "m", "engine": "embedded", "parallel": 0}, None, "parallel"),
        ({"name": "m", "engine": "upstream", "urls": ["http://x:1/v1"], "api_key_env": "sk-abc123 x"}, None, "NAME"),
        ({"name": "m", "engine": "upstream", "urls": ["http://x:1/v1"], "refuse_fields": ["model"]}, None, "model"),
    ],
)
def test_a_refused_model_is_a_400_in_openais_shape_and_adds_nothing(admin, body, param, words):
    message = assert_error(admin.post("/models", json=body), 400, param=param)
    assert words.lower() in message.lower()
    assert list(listed(admin)) == ["aimichat-1"]


def test_other_refusals_are_400s_naming_what_is_wrong(admin):
    assert "No model named 'nope'" in assert_error(admin.patch("/models/nope", json={"temperature": 1}), 400)
    assert "Send temperature" in assert_error(admin.patch("/models/aimichat-1", json={}), 400)
    assert "AIMICHAT_DEFAULT_TEMPERATURE" in assert_error(admin.patch("/models/aimichat-1", json={"top_p": 1}), 400)
    assert_error(admin.patch("/models/aimichat-1", json={"temperature": "hot"}), 400, param="temperature")
    assert "No model named 'nope'" in assert_error(admin.delete("/models/nope"), 400, param="name")
    assert "is not hidden" in assert_error(admin.post("/models/aimichat-1/restore"), 400, param="name")
    assert "No model named" in assert_error(admin.post("/models/aliases", json={"alias": "a", "model": "nope"}), 400)
    assert "already a model's name" in assert_error(
        admin.post("/models/aliases", json={"alias": "aimichat-1", "model": "aimichat-1"}), 400
    )
    assert_error(admin.post("/models/aliases", json={"alias": "a"}), 400, param="model")
    assert "No alias named 'a'" in assert_error(admin.delete("/models/aliases/a"), 400, param="alias")
    assert "Invalid prefix" in assert_error(
        admin.post("/models/sources", json={"urls": ["http://x:1/v1"], "prefix": " x"}), 400
    )
    assert_error(admin.post("/models/sources", json={"urls": []}), 400, param="urls")
    assert "No discovered upstream" in assert_error(admin.delete("/models/sources/lab/"), 400, param="prefix")


def test_api_keys_and_no_key_are_refused(sqlite_server, admin):
    make_account(sqlite_server.db)
    api_key = make_key(sqlite_server.db)
    for method, path in [("GET", "/models"), ("POST", "/models"), ("GET", "/models/export"), ("DELETE", "/models/x")]:
        response = sqlite_server.http.request(
            method, "/admin/v1" + path, headers={"Authorization": f"Bearer {api_key}"}, json=EMBEDDED
        )
        assert_error(response, 403, code="admin_key_required")
        assert_error(sqlite_server.http.request(method, "/admin/v1" + path, json=EMBEDDED), 401)
    assert list(listed(admin)) == ["aimichat-1"]


def test_sources_and_the_registry_file_round_trip(sqlite_server, admin):
    made = admin.post(
        "/models/sources", json={"urls": ["http://127.0.0.1:9/v1"], "prefix": "lab/", "api_key_env": "LAB"}
    )
    assert made.status_code == 201, made.text
    source = {"object": "model_source", "prefix": "lab/", "urls": ["http://127.0.0.1:9/v1"], "api_key_env": "LAB"}
    assert made.json() == {**source, "models": []}
    assert admin.post("/models/sources", json={"urls": ["http://127.0.0.1:11434/v1"]}).status_code == 201
    sources = admin.get("/models/sources").json()["data"]
    assert [s["prefix"] for s in sources] == ["lab/", ""]
    assert admin.post("/models", json=UPSTREAM).status_code == 201
    assert admin.post("/models/aliases", json={"alias": "gpt-4o-mini", "model": "remote"}).status_code == 201

    exported = admin.get("/models/export")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/toml")
    data = tomllib.loads(exported.text)
    assert [s["prefix"] for s in data["sources"]] == ["lab/", ""]
    (remote,) = data["models"]
    assert remote["name"] == "remote" and remote["aliases"] == ["gpt-4o-mini"] and remote["urls"] == UPSTREAM["urls"]

    assert admin.delete("/models/sources/").status_code == 204  # the one without a prefix
    assert admin.delete("/models/aliases/gpt-4o-mini").status_code == 204
    assert admin.delete("/models/remote").status_code == 200
    assert [s["prefix"] for s in admin.get("/models/sources").json()["data"]] == ["lab/"]

    imported = admin.post("/models/import", content=exported.content, headers={"Content-Type": "application/toml"})
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"object": "registry_import", "models": 1, "aliases": 1, "sources": 2, "prices": 0}
    assert admin.get("/models/export").text == exported.text
    assert listed(admin)["remote"]["aliases"] == ["gpt-4o-mini"]

    for bad, words in [
        (b"[[models]\n", "Not valid TOML"),
        (b'[[models]]\nname = "m"\nengine = "magic"\n', "engine must be 'embedded' or 'upstream'"),
        (b"\xff\xfe", "UTF-8"),
    ]:
        assert words in assert_error(admin.post("/models/import", content=bad), 400)
    assert admin.get("/models/export").text == exported.text, "a refused file changes nothing"
    actions = [e["action"] for e in admin.get("/audit", params={"target": "registry"}).json()["data"]]
    assert actions == ["registry.imported"]

    emptied = admin.post("/models/import", content=b"")
    assert emptied.json() == {"object": "registry_import", "models": 0, "aliases": 0, "sources": 0, "prices": 0}
    assert list(listed(admin)) == ["aimichat-1"] and admin.get("/models/sources").json()["data"] == []
