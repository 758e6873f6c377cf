"""SIGTERM while a stream is running: the stream completes, its charge is recorded once, exit status 0.

A real `aimichat serve` process (with the real model): the signal and the process's exit are what is tested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from sqlalchemy import select

from aimichat.store.models import UsageEvent
from conftest import free_port, iter_sse, make_account, make_key, migrated, wait_ready


def test_sigterm_drains_a_running_stream(tmp_path):
    db = migrated(f"sqlite:///{tmp_path / 'aimichat.db'}")
    make_account(db)
    key = make_key(db)
    port = free_port()
    # A drain time far above what 20 tokens take, so a busy machine cannot turn the drain into a cut.
    env = {
        **os.environ,
        "AIMICHAT_DATA_DIR": str(tmp_path),
        "AIMICHAT_PARALLEL": "1",
        "AIMICHAT_CONTEXT_LENGTH": "512",
        "AIMICHAT_THREADS": "1",  # llama.cpp's threads spin while they wait: on a busy machine, one is fastest
        "AIMICHAT_DRAIN_TIMEOUT": "120",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready([url], [proc])
        body = {
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 20,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as r:
            events = iter_sse(r.iter_text())
            first = next(events)
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = list(events)
        assert first["choices"][0]["delta"]["role"] == "assistant" and rest[-1] == "[DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with db.session() as s:
        rows = s.scalars(select(UsageEvent)).all()
    assert [(r.status, r.credits) for r in rows] == [("charged", 1)]
    assert rows[0].completion_tokens > 1
