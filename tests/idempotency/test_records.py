"""The idempotency table's rules, called directly: claims, lost claims, takeovers, expiry and cleaning."""

from __future__ import annotations

import datetime as dt
import time

import anyio
import pytest
from sqlalchemy import func, select

from aimichat.api.errors import APIError
from aimichat.idempotency import records
from aimichat.idempotency.records import Claimed, Mismatch, Running, Stored
from aimichat.idempotency.retries import Retries, check_key, sse_complete
from aimichat.store.models import IdempotencyRecord
from conftest import migrated

NOW = dt.datetime(2026, 3, 1, 12, 0)
DAY, LEASE = dt.timedelta(hours=24), dt.timedelta(minutes=15)
OP = "POST /v1/chat/completions"
ANSWER = Stored(200, {"content-type": "application/json"}, b'{"id":"chatcmpl-1"}')


def claim(database, key="k", body=b"{}", now=NOW, owner="account:1", operation=OP):
    return records.claim(database, owner, key, operation, body, now, ttl=DAY, lease=LEASE)


def stored_rows(database) -> list[tuple[str, str]]:
    with database.session() as s:
        return [tuple(row) for row in s.execute(select(IdempotencyRecord.key_hash, IdempotencyRecord.state))]


def test_a_claim_is_kept_replayed_and_refused_for_another_request(database):
    first = claim(database)
    assert isinstance(first, Claimed)
    assert isinstance(claim(database), Running)
    assert records.keep(database, first, ANSWER)
    assert claim(database) == ANSWER
    assert claim(database, body=b'{"x":1}') == Mismatch()
    assert claim(database, operation="POST /admin/v1/accounts") == Mismatch()
    assert isinstance(claim(database, owner="account:2"), Claimed)  # keys are per owner
    # Neither the key nor the body is stored as sent.
    assert stored_rows(database)[0] == (records.digest("k"), records.DONE)


def test_a_released_claim_lets_the_next_attempt_run(database):
    first = claim(database)
    records.release(database, first)
    second = claim(database)
    assert isinstance(second, Claimed) and second.attempt != first.attempt


def test_a_claim_left_running_past_the_lease_is_taken_over_and_the_old_attempt_cannot_finish(database):
    stale = claim(database)
    assert isinstance(claim(database, now=NOW + LEASE - dt.timedelta(seconds=1)), Running)
    fresh = claim(database, now=NOW + LEASE)
    assert isinstance(fresh, Claimed) and fresh.record_id == stale.record_id
    assert not records.keep(database, stale, ANSWER)  # its replica came back too late
    records.release(database, stale)  # and cannot give away the new attempt's claim
    assert isinstance(claim(database, now=NOW + LEASE), Running)
    assert records.keep(database, fresh, ANSWER)


def test_expired_answers_count_as_absent_and_are_cleaned(database):
    records.keep(database, claim(database, "old"), ANSWER)
    records.keep(database, claim(database, "new", now=NOW + dt.timedelta(hours=12)), ANSWER)
    later = NOW + DAY
    assert isinstance(claim(database, "old", body=b"another body", now=later), Claimed)  # expired: free again
    assert records.clean(database, later + dt.timedelta(hours=1)) == 0  # "old" was claimed anew
    assert records.clean(database, NOW + dt.timedelta(hours=36)) == 1  # "new" expires at 36 h
    assert [state for _, state in stored_rows(database)] == ["running"]


def test_cleaning_deletes_in_batches(database, monkeypatch):
    monkeypatch.setattr(records, "CLEAN_BATCH", 2)
    for n in range(5):
        claim(database, f"k{n}")
    assert records.clean(database, NOW + DAY) == 5
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0


@pytest.mark.parametrize(
    "values, expected",
    [([], None), (["abc"], "abc"), (["abc", "abc"], "abc"), (["x" * 255], "x" * 255)],
)
def test_check_key_accepts(values, expected):
    assert check_key(values) == expected


@pytest.mark.parametrize("values", [[""], ["  "], ["x" * 256], ["a", "b"]])
def test_check_key_refuses(values):
    with pytest.raises(APIError) as refused:
        check_key(values)
    assert (refused.value.status, refused.value.code) == (400, "invalid_idempotency_key")


def test_sse_complete_means_done_without_an_error_event():
    chunk = b'data: {"choices":[{"delta":{"content":"error"}}]}\n\n'
    error = b'data: {"error":{"message":"The model stopped answering"}}\n\n'
    done = b"data: [DONE]\n\n"
    assert sse_complete([chunk, done])
    assert not sse_complete([chunk])
    assert not sse_complete([chunk, error, done])


@pytest.fixture
def sqlite_db(sqlite_url):
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def test_begin_waits_for_a_running_claim_then_409(sqlite_db):
    retries = Retries(sqlite_db, lambda: NOW, wait=0.3)
    claim(sqlite_db, "busy")
    started = time.monotonic()
    with pytest.raises(APIError) as busy:
        anyio.run(retries.begin, "account:1", "busy", OP, b"{}")
    assert (busy.value.status, busy.value.code) == (409, "idempotency_key_in_progress")
    assert 0.2 <= time.monotonic() - started < 2


def test_each_replica_cleans_expired_rows_in_the_background(sqlite_db):
    records.keep(sqlite_db, claim(sqlite_db, "old"), ANSWER)
    claim(sqlite_db, "recent", now=NOW + dt.timedelta(hours=12))
    retries = Retries(sqlite_db, lambda: NOW + DAY)

    async def run_a_while() -> None:
        with anyio.move_on_after(0.5):
            await retries.clean_every(0.05)

    anyio.run(run_a_while)
    assert stored_rows(sqlite_db) == [(records.digest("recent"), records.RUNNING)]
