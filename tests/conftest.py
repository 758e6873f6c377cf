"""pytest's entry point to the shared test fixtures.

The fixtures and helpers live in ``fixtures.py`` (read its docstring); this file registers them with pytest,
re-exports them for ``from conftest import ...``, and holds the session's one real model:

- ``engine``: the real SmolLM2 model, loaded once for the whole session. Only the tests of the model use it
  (tests/engines, the end-to-end answers and the spec's examples); every other app runs a ``ScriptedEngine``.
"""

from __future__ import annotations

import os

import pytest

from aimichat.config import Settings
from aimichat.engines.llama import LlamaEngine
from fixtures import (  # noqa: F401 (fixtures registered for pytest, helpers re-exported)
    API_EMAIL,
    OUTPUT,
    PG_URL,
    REDIS_URL,
    AppClient,
    LiveServer,
    MutableClock,
    api_server,
    app_client,
    build_app,
    database,
    db_url,
    free_port,
    iter_sse,
    make_account,
    make_key,
    migrated,
    migration_diff,
    new_postgres_database,
    no_reserved_rows,
    redis_prefix,
    reused_postgres,
    serve_app,
    server,
    settled,
    smtp_server,
    sqlite_url,
    sse_events,
    sse_text,
    tool_missing,
    wait_ready,
)

# -- model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> LlamaEngine:
    """The llama.cpp engine with one slot (one request at a time), shared by every app in the session."""
    eng = LlamaEngine(
        slots=1,
        context_length=2048,
        threads=os.cpu_count() or 1,
        system_prompt=Settings().system_prompt,
        max_queue=64,
    )
    eng.load()
    return eng
