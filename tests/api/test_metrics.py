"""`GET /metrics` in Prometheus text format, counting what really happened."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conftest import AppClient, make_account, make_key


def scrape(server: AppClient) -> dict[tuple[str, tuple], float]:
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_credits_and_refusals(server):
    make_account(server.db, daily=2)
    key = make_key(server.db)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    statuses = [server.chat(body, key).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    server.http.get("/v1/nothing-here")
    m = scrape(server)
    route = (("method", "POST"), ("route", "/v1/chat/completions"))
    assert m[("aimichat_requests_total", (*route, ("status", "200")))] == 2
    assert m[("aimichat_requests_total", (*route, ("status", "429")))] == 1
    assert m[("aimichat_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert m[("aimichat_quota_refusals_total", ())] == 1
    assert m[("aimichat_credits_charged_total", ())] == 2
    assert m[("aimichat_tokens_total", (("kind", "completion"),))] == 6  # the scripted engine's 3 words, twice
    assert m[("aimichat_tokens_total", (("kind", "prompt"),))] == 2 * server.engine.generations[0].prompt_tokens
    assert m[("aimichat_time_to_first_token_seconds_count", ())] == 2
    assert m[("aimichat_engine_queue_depth", (("model", "aimichat-1"),))] == 0
    assert m[("aimichat_engine_running", (("model", "aimichat-1"),))] == 0
    assert m[("aimichat_model_ready", (("model", "aimichat-1"),))] == 1
    assert m[("aimichat_request_duration_seconds_count", (("route", "/v1/chat/completions"),))] == 3


def test_metrics_can_require_a_token(database, tmp_path):
    from fixtures import app_client
    from scripted_engine import ScriptedEngine

    with app_client(ScriptedEngine(), database, tmp_path, metrics_token="scrape-secret") as client:
        assert client.http.get("/metrics").status_code == 401
        assert client.http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = client.http.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert answer.status_code == 200 and "aimichat_requests_total" in answer.text
