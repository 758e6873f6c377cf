"""The soak (bench/soak.py) for 20 seconds: two `aimichat serve` processes on PostgreSQL at ~80% of
their measured capacity, mixed streaming and non-streaming requests, clients hanging up mid-stream and an
account running out of credits. No answer but 200, 429 and 503; memory and descriptors do not climb;
the ledger is exact at the end. The figures of the last long run are in docs/reliability.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.timeout(120)
def test_a_short_soak_keeps_the_invariants():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # (dataclasses look their module up there)
    spec.loader.exec_module(soak)

    report = soak.run(seconds=20, capacity_seconds=4)

    assert report.requests >= 10 * report.seconds, report  # it did run at some load
    assert report.unexpected == {}, report.statuses
    assert report.statuses.get("429", 0) > 0  # the small account ran out, and was told so
    assert report.hung_up > 0
    assert report.ledger_exact and report.reserved_left == 0, report.mismatches
    for server, (before, after) in report.memory_kb.items():
        assert after - before < 30 * 1024, f"{server}: resident memory grew {before} -> {after} KiB"
    for server, (before, after) in report.fds.items():
        assert after <= before + 10, f"{server}: open descriptors grew {before} -> {after}"
