"""A webhook receiver for tests: served by a LiveServer, it checks each delivery's Standard Webhooks
signature as a real receiver would (with the secret the endpoint was given) and can fail on purpose."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aimichat.alerts import signing


@dataclass
class Received:
    headers: dict[str, str]
    body: str
    valid: bool  # the signature verified with the endpoint's secret
    host: str = ""  # the Host header
    at: float = field(default_factory=time.monotonic)


class Receiver:
    """``app`` takes POST /hook. ``secret`` (set once the endpoint exists) verifies each delivery;
    ``fail_next`` answers that many deliveries with a 500 before accepting; ``received`` lists them all."""

    def __init__(self) -> None:
        self.secret = ""
        self.fail_next = 0
        self.received: list[Received] = []
        self._lock = threading.Condition()
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = (await request.body()).decode()
        headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
        valid = signing.verify(
            self.secret,
            headers.get("webhook-id", ""),
            headers.get("webhook-timestamp", ""),
            body,
            headers.get("webhook-signature", ""),
        )
        with self._lock:
            self.received.append(Received(headers, body, valid, request.headers.get("host", "")))
            failing = self.fail_next > 0
            self.fail_next -= 1 if failing else 0
            self._lock.notify_all()
        return Response(status_code=500 if failing else 204)

    def wait(self, count: int, timeout: float = 10) -> list[Received]:
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.received) >= count, timeout), (
                f"expected {count} deliveries, got {len(self.received)}"
            )
            return list(self.received)


class Dripping:
    """A receiver that never finishes its answer: a raw TCP server that reads the request, then sends one byte
    every ``every`` seconds, for ever. ``head=True`` drips the status line itself (an answer never begins);
    ``head=False`` sends a 200 with its headers at once, then drips an endless body. ``url`` ends in ``/hook``."""

    def __init__(self, *, head: bool, every: float = 0.1) -> None:
        self.head, self.every = head, every
        self.connections = 0
        self.sent = 0  # bytes sent to every connection together
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"

    def __enter__(self) -> Dripping:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        start = (
            b"HTTP/1.1 200 OK\r\nX-Drip: " if self.head else b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"
        )
        with conn:
            conn.recv(65536)  # the request (enough of it)
            if not self.head:
                conn.sendall(start)
                start = b""
            while not self._stop.is_set():
                try:
                    conn.sendall(start[:1] or b"x")
                except OSError:  # the sender hung up: what it should do at its deadline
                    return
                start = start[1:]
                self.sent += 1
                time.sleep(self.every)
