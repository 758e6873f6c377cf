"""What the hostile-client tests share: the app served by uvicorn as ``aimichat serve`` serves it (with the
guarded protocol of ``aimichat.server``), and the app's chat service with per-account fairness."""

from __future__ import annotations

import dataclasses
import socket
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

from aimichat.api.chat.serving import ChatService
from aimichat.keys.service import Principal
from aimichat.quota.fairness import Fairness
from aimichat.registry.live import Served
from aimichat.server import guarded_protocol
from conftest import LiveServer


class GuardedServer(LiveServer):
    """A LiveServer whose uvicorn uses the protocol ``aimichat serve`` gives it (header and send timeouts,
    connections per address), with the limits of the app's settings."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(app)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=guarded_protocol(app.state.settings),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)


@dataclasses.dataclass
class _FairChat(ChatService):
    """ChatService binding each request's engine with ``Fairness.bind``: what serving.py does once its
    ``complete`` calls it (see docs/reliability.md); until then the tests wire it here."""

    fair: Fairness | None = None

    async def _model(self, name: str | None, principal: Principal) -> Served:
        served = await super()._model(name, principal)
        assert self.fair is not None and served.engine is not None
        return dataclasses.replace(served, engine=await self.fair.bind(served.engine, principal))


def with_fairness(app: FastAPI, **options: Any) -> Fairness:
    """Make ``app``'s chat service apply its Fairness (``options`` replace some of its fields); returns it."""
    fairness: Fairness = dataclasses.replace(app.state.fairness, **options)
    app.state.fairness = fairness
    chat: ChatService = app.state.chat
    fields = {f.name: getattr(chat, f.name) for f in dataclasses.fields(ChatService)}
    if "fairness" in fields:  # serving.py binds the engine itself
        app.state.chat = ChatService(**{**fields, "fairness": fairness})
    else:
        app.state.chat = _FairChat(**fields, fair=fairness)
    return fairness


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the server from the loopback address ``source`` (127.0.0.2, …): another client."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock
