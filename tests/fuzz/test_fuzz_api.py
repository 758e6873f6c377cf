"""The standing fuzz suite (issue 15): schemathesis against the app's own /openapi.json, with a valid key.

Every operation of the API (``/v1/…``, health) gets its documented examples and a bounded number of
generated requests, valid and invalid, against a real uvicorn server with a ScriptedEngine. Each answer must
be no 5xx, a status code the document lists, and a body that fits the document's schema for it (errors in
OpenAI's shape). Bounded to stay within ~30 s on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from aimichat.store.db import Database
from conftest import LiveServer, build_app, make_account, make_key
from scripted_engine import ScriptedEngine

MAX_EXAMPLES = 30  # generated requests per operation (the red-team run's 20,000 are for a long run, not CI)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("fuzz")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with LiveServer(build_app(ScriptedEngine(), db, Path(tmp))) as server:
        make_account(db, "fuzz@example.com", daily=10_000_000)
        server.key = make_key(db, "fuzz@example.com")
        yield server
    db.dispose()


# What every answer is checked for. Left out: schemathesis's "a schema-valid request must be accepted"
# (positive_data_acceptance): the chat schema is looser than its validators (an empty ``messages``, an empty
# ``role`` pass the schema and get the server's 400); reported to api/chat/protocol.py's owner (issue 15).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_5xx_and_every_answer_is_documented(live: LiveServer, mode: GenerationMode) -> None:
    """Valid requests (the document's examples first) and invalid ones, for every operation."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json").include(path_regex=r"^/(v1/|healthz|readyz)")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, [op.label for op in operations]
    headers = {"Authorization": f"Bearer {live.key}"}
    for operation in operations:
        strategies = [operation.as_strategy(mode)]
        if mode is GenerationMode.POSITIVE:
            strategies += schema.get_strategies_from_examples(operation)

        @given(case=st.one_of(strategies))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS, timeout=10)

        try:
            answers_as_documented()
        except Unsatisfiable:  # an operation without parameters or body has no invalid request to make
            assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query, operation.label
