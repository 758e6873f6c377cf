"""SIGTERM while a stream is running: the stream completes, its charge is recorded once, exit status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from sqlalchemy import select

from aimichat.accounts import service as accounts
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import free_port, make_account, make_key


def test_sigterm_drains_a_running_stream(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    db.upgrade()
    with db.session() as s:
        accounts.ensure_default_tier(s)
        s.commit()
    make_account(db)
    key = make_key(db)
    port = free_port()
    env = {**os.environ, "AIMICHAT_DATA_DIR": str(tmp_path), "AIMICHAT_PARALLEL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 40,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = [line for line in lines if line]
        assert first and rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with db.session() as s:
        rows = s.scalars(select(UsageEvent)).all()
    assert [(r.status, r.credits) for r in rows] == [("charged", 1)]
    assert rows[0].completion_tokens > 1
