from conftest import make_account, make_key, serve_app


def test_plain_completion_smoke(engine, database, tmp_path):
    make_account(database)
    key = make_key(database)
    with serve_app(engine, database, tmp_path) as server, server.client() as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 5
