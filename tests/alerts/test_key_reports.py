"""POST /v1/keys/report: the same 202 whatever the key, a live key revoked on every replica within a second,
its owner told by email and webhook, the report kept and audited, and a rate limit per client address."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import select
from webhook_receiver import Receiver

from aimichat.alerts import service as alerts
from aimichat.keys import admin_keys, tokens
from aimichat.keys import service as keys
from aimichat.store.clock import utcnow
from aimichat.store.models import AdminKey, ApiKey, AuditEvent, KeyReport
from conftest import (
    LiveServer,
    app_client,
    free_port,
    make_account,
    make_key,
    migrated,
    new_postgres_database,
    wait_ready,
)
from scripted_engine import ScriptedEngine

ACCEPTED = {"object": "key_report", "received": 1}


def test_the_answer_is_202_for_valid_unknown_revoked_and_malformed_keys_alike(database, tmp_path, smtp_server):
    receiver = Receiver()
    with (
        LiveServer(receiver.app) as hook,
        app_client(
            ScriptedEngine(), database, tmp_path, webhook_allow_private=True, smtp_url=smtp_server.url
        ) as server,
    ):
        account = make_account(database, "owner@example.com")
        live = make_key(database, "owner@example.com", "ci key")
        with database.session() as s:
            receiver.secret = alerts.add_endpoint(s, account, hook.url + "/hook", utcnow(), allow_private=True).secret
            s.commit()
        assert server.http.get("/v1/key", headers={"X-API-Key": live}).status_code == 200
        unknown = tokens.generate_key()  # well formed, checksum right, issued by nobody
        malformed = live[:-1] + ("A" if live[-1] != "A" else "B")  # one character off: the checksum fails
        found_at = "https://github.com/someone/repo/blob/main/.env"
        answers = [
            server.http.post("/v1/keys/report", json=body)
            for body in (
                {"key": unknown},
                {"key": malformed},
                {"key": "hello"},
                [{"token": live, "type": "aimichat_api_key", "url": found_at, "source": "content"}],
                {"key": live},  # revoked by now
            )
        ]
        assert [(a.status_code, a.json()) for a in answers] == [(202, ACCEPTED)] * 5
        assert server.http.get("/v1/key", headers={"X-API-Key": live}).status_code == 401  # at once, here

        mail = smtp_server.wait(1, timeout=5)[0]
        assert mail["To"] == "owner@example.com" and "reported leaked" in mail["Subject"]
        assert "ci key" in mail.get_content() and found_at in mail.get_content() and live not in mail.as_string()
        hooked = receiver.wait(1, timeout=5)[0]
        event = json.loads(hooked.body)
        assert hooked.valid and event["type"] == "key.reported_leaked"
        assert event["data"]["source"] == found_at and event["data"]["key_name"] == "ci key"
        assert live not in hooked.body
        with database.session() as s:
            reports = s.scalars(select(KeyReport).order_by(KeyReport.id)).all()
            key_id = s.scalars(select(ApiKey.id)).one()
            audited = s.scalars(select(AuditEvent).where(AuditEvent.action == "key.reported_leaked")).all()
        assert [(r.outcome, r.key_id, r.source) for r in reports] == [
            ("unknown", None, None),
            ("malformed", None, None),
            ("malformed", None, None),
            ("revoked", key_id, found_at),
            ("inactive", key_id, None),
        ]
        assert {r.address for r in reports} == {"127.0.0.1"}
        assert [(a.actor, a.target, a.detail) for a in audited] == [
            ("report", f"key:{key_id}", {"reported_from": found_at})
        ]
        time.sleep(1.2)
        assert len(smtp_server.messages) == 1 and len(receiver.received) == 1  # the second report told nobody


def test_a_rotated_out_secret_reported_during_its_grace_stops_and_the_new_one_works(server):
    make_account(server.db, "rotated@example.com")
    old = make_key(server.db, "rotated@example.com")
    with server.db.session() as s:
        key = s.scalars(select(ApiKey)).one()
        new = keys.rotate_key(s, key.id, grace=dt.timedelta(hours=1)).secret
        s.commit()
    assert server.http.get("/v1/key", headers={"X-API-Key": old}).status_code == 200
    assert server.http.post("/v1/keys/report", json={"key": old}).status_code == 202
    assert server.http.get("/v1/key", headers={"X-API-Key": old}).status_code == 401
    assert server.http.get("/v1/key", headers={"X-API-Key": new}).status_code == 200


def test_bad_bodies_get_a_400_and_too_many_reports_a_429(tmp_path, sqlite_url):
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path, key_reports_per_minute=3) as server:
        for body in (
            b"not json",
            b'{"nothing": 1}',
            b"[]",
            b'[{"token": 5}]',
            b"[" + b'{"key":"x"},' * 100 + b'{"key":"x"}]',
            b"[" * 50000 + b"]" * 50000,  # deeper than Python's parser recurses
            b'{"key": {"key": "x"}}',
            b'{"key": "x", "url": 5}',
            b'{"key": "x", "url": "https://example.com/\\u0000"}',  # NUL: no text column takes it
            b'{"key": "x", "url": "https://example.com/\\ud800"}',  # half a surrogate pair: not UTF-8
            b'[{"token": "x"}, null]',
            b"\xff\xfe{",
        ):
            bad = server.http.post("/v1/keys/report", content=body, headers={"Content-Type": "application/json"})
            assert bad.status_code == 400, body
            assert (
                bad.json()["error"]["type"] == "invalid_request_error"
                and bad.json()["error"]["code"] == "invalid_report"
            )
        many = [{"key": "x"}, {"key": "y"}, {"key": "z"}]
        assert server.http.post("/v1/keys/report", json=many).status_code == 202
        refused = server.http.post("/v1/keys/report", json={"key": "x"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        other = server.http.post("/v1/keys/report", json={"key": "x"}, headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 202  # the limit is per client address
    db.dispose()


def test_a_reported_key_is_refused_by_two_server_processes_within_a_second(tmp_path):
    url, drop = new_postgres_database()
    db = migrated(url)
    procs = []
    try:
        make_account(db, "fleet@example.com")
        key = make_key(db, "fleet@example.com")
        ports = [free_port(), free_port()]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIMICHAT_")},
            "AIMICHAT_DATABASE_URL": url,
            "AIMICHAT_DATA_DIR": str(tmp_path),
            "AIMICHAT_ENGINE": "upstream",  # no model to load: /v1/key is what is asked
            "AIMICHAT_UPSTREAM_URL": "http://127.0.0.1:9/v1",
        }
        for port in ports:
            command = [sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        wait_ready(urls, procs)
        for target in urls:  # each replica has the key cached now
            assert httpx.get(f"{target}/v1/key", headers={"X-API-Key": key}).status_code == 200
        assert httpx.post(f"{urls[0]}/v1/keys/report", json={"key": key}).status_code == 202
        reported_at = time.monotonic()
        for target in urls:
            while httpx.get(f"{target}/v1/key", headers={"X-API-Key": key}).status_code != 401:
                assert time.monotonic() - reported_at < 1.0
                time.sleep(0.05)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
        db.dispose()
        drop()


def test_the_scanning_snippet_and_rules_in_docs_security_md_find_real_keys_only():
    doc = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet, namespace)
    live = [tokens.generate_key() for _ in range(50)]
    text = " ".join(f'API_KEY="{k}"' for k in live)
    assert namespace["aimichat_keys"](text) == live
    admin = [admin_keys.generate() for _ in range(5)]
    assert namespace["aimichat_keys"](" ".join(f"ADMIN={k}" for k in admin)) == admin
    look_alikes = [k[:-1] + ("A" if k[-1] != "A" else "B") for k in live + admin]
    look_alikes += ["aimichat_admin_" + live[0][9:-1], "aimichat_" + admin[0][15:] + "x"]
    assert namespace["aimichat_keys"](" ".join(look_alikes)) == []
    # The rules: one pattern per kind of key, the same in gitleaks' TOML and trufflehog's YAML.
    gitleaks = re.findall(r"regex = '''(.+?)'''", doc)
    trufflehog = re.findall(r"^ {6}(?:key|admin_key): '(.+?)'$", doc, re.MULTILINE)
    assert len(gitleaks) == 2 and gitleaks == trufflehog
    api_rule, admin_rule = gitleaks
    text = " ".join(live + admin + ["aimichat_" + "a" * 39, "xaimichat_" + live[0][9:]])
    assert re.findall(api_rule, text) == live and re.findall(admin_rule, text) == admin
    assert re.fullmatch(api_rule, live[0]) and re.fullmatch(admin_rule, admin[0])


def test_a_reported_admin_key_is_revoked_and_recorded_with_the_same_202(server):
    with server.db.session() as s:
        created = admin_keys.create(s, "ops")
        s.commit()
    admin = {"Authorization": f"Bearer {created.secret}"}
    assert server.http.get("/admin/v1/accounts", headers=admin).status_code == 200
    found_at = "https://gist.github.com/someone/1"
    reported = server.http.post("/v1/keys/report", json=[{"token": created.secret, "url": found_at}])
    assert (reported.status_code, reported.json()) == (202, ACCEPTED)
    assert server.http.get("/admin/v1/accounts", headers=admin).status_code == 401  # at once
    again = server.http.post("/v1/keys/report", json={"key": created.secret})
    unknown = server.http.post("/v1/keys/report", json={"key": admin_keys.generate()})
    assert [a.status_code for a in (again, unknown)] == [202, 202]
    with server.db.session() as s:
        reports = s.scalars(select(KeyReport).order_by(KeyReport.id)).all()
        audited = s.scalars(select(AuditEvent).where(AuditEvent.action == "admin_key.reported_leaked")).all()
        key = s.get(AdminKey, created.key.id)
        assert key is not None and key.revoked_at is not None
    assert [(r.outcome, r.key_id, r.source) for r in reports] == [
        ("admin_revoked", None, found_at),
        ("admin_inactive", None, None),
        ("unknown", None, None),
    ]
    assert [(a.actor, a.target, a.detail) for a in audited] == [
        ("report", f"admin_key:{created.key.id}", {"reported_from": found_at})
    ]


def test_a_key_with_non_ascii_characters_is_malformed_not_an_error(server):
    odd = "é" * 6  # the right length with the rest; compare_digest refuses non-ASCII text
    for key in ("aimichat_" + "a" * 32 + odd, "aimichat_admin_" + "a" * 32 + odd):
        assert server.http.post("/v1/keys/report", json={"key": key}).status_code == 202
    with server.db.session() as s:
        assert [r.outcome for r in s.scalars(select(KeyReport))] == ["malformed", "malformed"]
