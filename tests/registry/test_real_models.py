"""Real engines side by side: two embedded models from the same GGUF with different system prompts,
and a real llama.cpp server (llama-cpp-python's, two models from its --config_file) registered by
discovery, all answering concurrently, streaming and not, each answer naming its own model."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_registry import _wait_for, change

from aimichat.config import Settings
from aimichat.engines.configs import build_engine
from aimichat.engines.llama import default_model_path
from aimichat.registry import service as registry
from aimichat.store.db import Database
from fixtures import free_port, iter_sse, make_account, make_key, serve_app

PEERS = ("peer-a", "peer-b")


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> str:
    """llama-cpp-python's server with two models (the same GGUF under two names); its base URL."""
    from engines.test_upstream_peer import _wait_until_serving

    folder = tmp_path_factory.mktemp("multi_peer")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "interrupt_requests": False,  # its default cuts a running answer short when another request arrives
        "models": [
            {"model": str(default_model_path()), "model_alias": name, "n_ctx": 1024, "n_threads": 1} for name in PEERS
        ],
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--config_file", str(folder / "config.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_serving(process, f"http://127.0.0.1:{port}/v1/models", log)
        yield process, f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_embedded_and_discovered_models_answer_side_by_side(engine, peer, tmp_path):
    process, url = peer
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    db.upgrade()
    settings = Settings(data_dir=tmp_path)
    real = lambda spec, threads: build_engine(spec.name, spec.config, settings, threads=threads)  # noqa: E731
    change(db, registry.add_embedded, "alpha", parallel=2, context_length=512, system_prompt="You are Alpha.")
    change(
        db,
        registry.add_embedded,
        "beta",
        parallel=2,
        context_length=512,
        system_prompt="You are Beta, a pirate who answers every question in the voice of a pirate.",
    )
    change(db, registry.add_source, url, prefix="llamacpp/")
    with serve_app(engine, db, tmp_path, engine_factory=real, discovery_interval=1, registry_poll_seconds=0.2) as live:
        make_account(db, daily=10_000)
        key = make_key(db)
        models = [m["id"] for m in live.http.get("/v1/models").json()["data"]]
        assert models == ["aimichat-1", "alpha", "beta", "llamacpp/peer-a", "llamacpp/peer-b"]
        # the two embedded models share the host's cores with aimichat-1 (which has its own threads here)
        served = live.app.state.models
        assert [served.served(n).engine.threads for n in ("alpha", "beta")] == [1, 1]

        def ask(job: tuple[str, bool]) -> tuple[str, str, int]:
            model, stream = job
            body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=live.url, timeout=120) as http:
                if not stream:
                    answer = http.post("/v1/chat/completions", json=body, headers=headers)
                    assert answer.status_code == 200, answer.text
                    data = answer.json()
                    return data["model"], data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"]
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer:
                    assert answer.status_code == 200
                    events = list(iter_sse(answer.iter_text()))
                chunks = [e for e in events if isinstance(e, dict)]
                assert events[-1] == "[DONE]" and {c["model"] for c in chunks} == {model}
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
                return chunks[0]["model"], text, chunks[-1]["usage"]["prompt_tokens"]

        jobs = [(m, s) for m in models for s in (False, True)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (model, _), (named, text, _prompt) in zip(jobs, answers, strict=True):
            assert named == model and text.strip(), (model, answers)
        prompts = {model: prompt for (model, _), (_, _, prompt) in zip(jobs, answers, strict=True)}
        assert prompts["beta"] > prompts["alpha"]  # its longer system prompt, counted by the real tokenizer

        process.terminate()  # the llama.cpp server goes away: its models, and only they, become unready
        process.wait(timeout=10)

        def ready() -> dict[str, bool]:
            return {m["model"]: m["ready"] for m in live.http.get("/readyz").json()["models"]}

        _wait_for("the peer's models to be unready", lambda: not ready()["llamacpp/peer-a"], timeout=10)
        assert ready() == {
            "aimichat-1": True,
            "alpha": True,
            "beta": True,
            "llamacpp/peer-a": False,
            "llamacpp/peer-b": False,
        }
        assert live.http.get("/readyz").status_code == 200
        alpha = live.chat({"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, key)
        assert alpha.status_code == 200
    db.dispose()
