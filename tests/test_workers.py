"""`aimichat serve --workers N`: several processes on one port, the cores split among their engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from aimichat.app import prepare_database
from aimichat.config import Settings
from aimichat.store.db import Database
from conftest import free_port, make_account, make_key, wait_ready


def test_workers_share_the_cores_and_all_answer(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    prepare_database(db, Settings(data_dir=tmp_path))
    make_account(db)
    key = make_key(db)
    port = free_port()
    env = {**os.environ, "AIMICHAT_DATA_DIR": str(tmp_path), "AIMICHAT_CONTEXT_LENGTH": "512", "AIMICHAT_PARALLEL": "2"}
    env.pop("AIMICHAT_THREADS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready([url], [proc], timeout=120)
        # llama.cpp's threads spin while they wait: two workers of all cores each would slow both several-fold.
        engines = [httpx.get(f"{url}/readyz", timeout=10).json()["engine"] for _ in range(6)]
        assert {e["threads"] for e in engines} == {max(1, len(os.sched_getaffinity(0)) // 2)}
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        db.dispose()
