"""Per-model default sampling: a request that sends no temperature or top_p gets its model's (the settings'
for aimichat-1, the registry's for the others), and OpenAI's 1.0 where a model sets none. The rules
(ranges, `models set`, the TOML file) and the CLI run over a real database; the answers through the app
with scripted engines, which record the sampling each request reached them with."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from aimichat.cli import cli
from aimichat.config import Settings
from aimichat.engines.configs import EmbeddedConfig, UpstreamConfig
from aimichat.registry import service as registry
from aimichat.registry.catalog import settings_model
from aimichat.store.db import Database
from fixtures import app_client, make_account, make_key, migrated, scripted_factory
from scripted_engine import ScriptedEngine

HI = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 3}


def change(db: Database, fn, *args, **kwargs):
    with db.session() as session:
        result = fn(session, *args, **kwargs)
        session.commit()
        return result


@pytest.fixture
def db(tmp_path):
    database = migrated(f"sqlite:///{tmp_path / 'aimichat.db'}")
    yield database
    database.dispose()


# -- the rules -----------------------------------------------------------------------------------


def test_configs_keep_their_sampling_through_the_registry_row():
    for config in (
        EmbeddedConfig(temperature=0.3, top_p=0.9),
        UpstreamConfig(urls=("http://gpu-1:8000/v1",), temperature=0.0, top_p=1.0),
    ):
        stored = config.as_json()
        assert (stored["temperature"], stored["top_p"]) == (config.temperature, config.top_p)
        assert type(config).from_json(stored) == config
    assert "temperature" not in EmbeddedConfig().as_json(), "unset stays unset: OpenAI's default applies"


def test_aimichat_1_takes_the_settings_defaults(tmp_path):
    spec = settings_model(Settings(data_dir=tmp_path, default_temperature=0.2, default_top_p=0.8))
    assert (spec.config.temperature, spec.config.top_p) == (0.2, 0.8)
    # Measured on the bundled model: an upstream's model keeps its server's defaults unless they are set.
    upstream = Settings(data_dir=tmp_path, engine="upstream", upstream_url="http://127.0.0.1:9/v1")
    assert (settings_model(upstream).config.temperature, settings_model(upstream).config.top_p) == (None, None)
    chosen = Settings(
        data_dir=tmp_path, engine="upstream", upstream_url="http://127.0.0.1:9/v1", default_temperature=0.5
    )
    assert (settings_model(chosen).config.temperature, settings_model(chosen).config.top_p) == (0.5, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": 2.5}, "temperature must be a number between 0 and 2"),
        ({"temperature": -0.1}, "temperature must be a number between 0 and 2"),
        ({"temperature": math.nan}, "temperature must be a number between 0 and 2"),
        ({"temperature": True}, "temperature must be a number between 0 and 2"),
        ({"top_p": 0}, "top_p must be a number above 0 and at most 1"),
        ({"top_p": 1.5}, "top_p must be a number above 0 and at most 1"),
    ],
)
def test_sampling_out_of_range_is_refused_and_nothing_is_stored(db, values, message):
    with db.session() as s, pytest.raises(ValueError, match=message):
        registry.add_embedded(s, "small", **values)
    with db.session() as s, pytest.raises(ValueError, match=message):
        registry.add_upstream(s, "far", "http://127.0.0.1:9/v1", **values)
    with db.session() as s:
        assert registry.export_registry(s)["models"] == []


def test_set_sampling_changes_only_the_sampling(db):
    change(db, registry.add_upstream, "far", "http://127.0.0.1:9/v1", upstream_model="llama", context_length=8192)
    change(db, registry.set_sampling, "far", {"temperature": 0.4, "top_p": 0.9})
    change(db, registry.set_sampling, "far", {"top_p": None})  # None removes one; the other stays
    with db.session() as s:
        (row,) = registry.export_registry(s)["models"]
    assert row == {
        "name": "far",
        "engine": "upstream",
        "urls": ["http://127.0.0.1:9/v1"],
        "upstream_model": "llama",
        "context_length": 8192,
        "temperature": 0.4,
    }
    with db.session() as s, pytest.raises(ValueError, match="AIMICHAT_DEFAULT_TEMPERATURE"):
        registry.set_sampling(s, "aimichat-1", {"temperature": 0.5})
    with db.session() as s, pytest.raises(ValueError, match="no model named 'nope'"):
        registry.set_sampling(s, "nope", {"temperature": 0.5})
    with db.session() as s, pytest.raises(ValueError, match="not a sampling setting: seed"):
        registry.set_sampling(s, "far", {"seed": 1})


def test_the_registry_file_carries_sampling_both_ways(db):
    change(db, registry.add_embedded, "small", temperature=0.3, top_p=0.95)
    with db.session() as s:
        text = registry.export_toml(s)
    assert "temperature = 0.3" in text and "top_p = 0.95" in text
    change(db, registry.import_toml, 'models = [{name = "other", engine = "embedded"}]')
    change(db, registry.import_toml, text)
    with db.session() as s:
        assert registry.export_toml(s) == text
    with db.session() as s, pytest.raises(ValueError, match="temperature must be a number between 0 and 2"):
        registry.import_toml(
            s, '[[models]]\nname = "hot"\nengine = "upstream"\nurls = ["http://x/v1"]\ntemperature = "high"'
        )


# -- the CLI -------------------------------------------------------------------------------------


def test_models_add_and_set_take_sampling(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", db_url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output + result.stderr
        return result

    added = run("models", "add", "far", "--upstream", "http://127.0.0.1:9/v1", "--temperature", "0.2", "--top-p", "0.9")
    assert "temperature 0.2, top_p 0.9" in added.stdout
    assert run("models", "set", "far", "--temperature", "0.7").stdout.strip().endswith("temperature 0.7, top_p 0.9")
    assert run("models", "set", "far", "--top-p", "").stdout.strip().endswith("temperature 0.7")
    exported = run("models", "export").stdout
    assert "temperature = 0.7" in exported and "top_p" not in exported
    refused = run("models", "set", "far", "--temperature", "3", ok=False)
    assert "temperature must be a number between 0 and 2" in refused.stderr
    assert "is not a number" in run("models", "set", "far", "--top-p", "warm", ok=False).stderr
    assert "give --temperature or --top-p" in run("models", "set", "far", ok=False).stderr
    assert "AIMICHAT_DEFAULT_TEMPERATURE" in run("models", "set", "aimichat-1", "--temperature", "0", ok=False).stderr
    listed = {row["name"]: row for row in json.loads(run("models", "list", "--json").stdout)}
    assert (listed["far"]["temperature"], listed["far"]["top_p"]) == (0.7, None)
    assert listed["aimichat-1"]["temperature"] == Settings.model_fields["default_temperature"].default


# -- the answers ---------------------------------------------------------------------------------


def test_a_request_without_sampling_gets_its_models_defaults(db, tmp_path):
    change(db, registry.add_embedded, "cool", temperature=0.25, top_p=0.5)
    change(db, registry.add_embedded, "plain")
    factory = scripted_factory()
    default = ScriptedEngine()
    settings = {"default_temperature": 0.3, "default_top_p": 0.9}
    with app_client(default, db, tmp_path, engine_factory=factory, **settings) as client:
        make_account(db)
        key = make_key(db)

        def sampled(engine: ScriptedEngine, body: dict) -> tuple[float, float]:
            answer = client.chat({**HI, **body}, key)
            assert answer.status_code == 200, answer.text
            params = engine.generations[-1].params
            return params.temperature, params.top_p

        assert sampled(default, {}) == (0.3, 0.9), "aimichat-1: AIMICHAT_DEFAULT_TEMPERATURE and _TOP_P"
        assert sampled(default, {"stream": True}) == (0.3, 0.9)
        assert sampled(default, {"temperature": 1.2, "top_p": 0.2}) == (1.2, 0.2), "what a request sends wins"
        assert sampled(default, {"temperature": 0}) == (0.0, 0.9), "0 is a temperature, not 'unset'"
        assert sampled(factory.built["cool"], {"model": "cool"}) == (0.25, 0.5)
        assert sampled(factory.built["plain"], {"model": "plain"}) == (1.0, 1.0), "none set: OpenAI's 1.0"
        responses = client.http.post(
            "/v1/responses", json={"input": "Hi", "model": "cool"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert responses.status_code == 200, responses.text
        assert factory.built["cool"].generations[-1].params.temperature == 0.25, "the Responses API too"
