"""How uvicorn serves the app: connection guards uvicorn does not have (issue 15, finding 6).

uvicorn's ``timeout_keep_alive`` only covers the idle time between two requests, and every byte received
resets it, so a client that sends its headers a byte at a time (slowloris) holds a connection forever;
it has no cap per client address (``limit_concurrency`` is one cap for everybody, answered after the
headers) and no limit on how long a response may sit unread. The protocol classes built here add:

- a **header timeout**: from a connection's start, and from the first byte of each later request, the
  request line and headers must be in within ``header_timeout`` seconds, else 408 and the connection closes;
- a **send timeout**: a client that leaves the answer unread (the socket's buffers full, uvicorn's writes
  paused) for ``send_timeout`` seconds is dropped, so its request ends and is settled for what was delivered;
- a **cap per address**: a client address holding ``max_per_address`` connections already gets a 429 and
  the new connection is closed; trusted proxies are not capped (the proxy caps its own clients).

The body read timeout is the app's (``api.middleware.RequestMiddleware``): it answers in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aimichat.config import Settings


def _refusal(status: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape, written before the request was read."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


def trusted(address: str, proxies: str) -> bool:
    """Is ``address`` one of ``proxies`` (AIMICHAT_TRUSTED_PROXIES: addresses or ranges, '*' for any)?"""
    entries = [p.strip() for p in proxies.split(",") if p.strip()]
    if "*" in entries:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in entries:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


class GuardedProtocol(asyncio.Protocol):
    """The guards, mixed into one of uvicorn's HTTP protocols (``guarded_protocol`` sets the limits)."""

    header_timeout: float = 10.0
    send_timeout: float = 60.0
    max_per_address: int = 0  # 0: no cap
    trusted_proxies: str = ""

    # What the uvicorn protocol it is mixed into has.
    cycle: Any
    client: tuple[str, int] | None
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _header_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._over_address_cap():
            self.transport.write(
                _refusal(
                    b"429 Too Many Requests",
                    f"Too many open connections from your address (at most {self.max_per_address}).",
                    "too_many_connections",
                )
            )
            self.transport.close()
            return
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request's headers are complete
            self._cancel_header_timer()
        elif self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            # The first bytes of the next request on a kept-alive connection: its headers' clock starts.
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def _over_address_cap(self) -> bool:
        if not self.max_per_address or self.client is None:
            return False
        host = self.client[0]
        if trusted(host, self.trusted_proxies):
            return False
        same = sum(1 for c in self.connections if (getattr(c, "client", None) or ("",))[0] == host)
        return same > self.max_per_address  # this connection is counted already

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        message = f"The request headers were not received within {self.header_timeout:g} seconds."
        self.transport.write(_refusal(b"408 Request Timeout", message, "request_timeout"))
        self.transport.close()

    def _not_reading(self) -> None:
        # abort, not close: close would wait for the unread buffer to drain, which is what never happens.
        self._send_timer = None
        self.transport.abort()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None


def guarded_protocol(settings: Settings, base: type[asyncio.Protocol] = HttpToolsProtocol) -> type[asyncio.Protocol]:
    """uvicorn's ``base`` HTTP protocol (httptools, or ``H11Protocol``) with the guards, limits from ``settings``."""
    limits = {
        "header_timeout": settings.header_timeout,
        "send_timeout": settings.send_timeout,
        "max_per_address": settings.max_connections_per_address,
        "trusted_proxies": settings.trusted_proxies,
    }
    return type(f"Guarded{base.__name__}", (GuardedProtocol, base), limits)


def __getattr__(name: str) -> type[asyncio.Protocol]:
    # Worker processes (`serve --workers N`) import the protocol by name (a class made at run time does not
    # pickle); they read the settings from the environment the CLI set for them.
    if name == "FromEnvironment":
        return guarded_protocol(Settings())
    raise AttributeError(name)
