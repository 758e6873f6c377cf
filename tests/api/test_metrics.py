"""`GET /metrics` in Prometheus text format, counting what really happened."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_account, make_key, serve_app


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_credits_and_refusals(engine, database, tmp_path):
    make_account(database, daily=2)
    key = make_key(database)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with serve_app(engine, database, tmp_path) as server:
        statuses = [requests.post(f"{server.url}/v1/chat/completions", json=body, headers={"X-API-Key": key}, timeout=60).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        requests.get(f"{server.url}/v1/nothing-here", timeout=10)
        m = scrape(server.url)
    route = (("method", "POST"), ("route", "/v1/chat/completions"))
    assert m[("aimichat_requests_total", route + (("status", "200"),))] == 2
    assert m[("aimichat_requests_total", route + (("status", "429"),))] == 1
    assert m[("aimichat_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert m[("aimichat_quota_refusals_total", ())] == 1
    assert m[("aimichat_credits_charged_total", ())] == 2
    assert 0 < m[("aimichat_tokens_total", (("kind", "completion"),))] <= 6
    assert m[("aimichat_time_to_first_token_seconds_count", ())] == 2
    assert m[("aimichat_engine_queue_depth", ())] == 0
    assert m[("aimichat_request_duration_seconds_count", (("route", "/v1/chat/completions"),))] == 3
