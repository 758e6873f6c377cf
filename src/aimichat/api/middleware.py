"""One pure-ASGI middleware for what every request needs: a body size limit and read timeout, a request id
and an access log line with secrets redacted (``?api_key=`` never reaches a log)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from urllib.parse import parse_qsl, urlencode

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_type
from .responses import error_body

access_log = logging.getLogger("aimichat.access")

_SECRET_PARAMS = {"api_key", "key", "token", "password"}


class BodyTooLarge(HTTPException):
    """A body over the limit; raised from ``receive``, answered 413 ``request_too_large`` by the handlers."""

    def __init__(self, limit: int) -> None:
        # Connection: close, or the connection would wait for the rest of a body nobody will read.
        super().__init__(413, f"Request body too large: the limit is {limit} bytes.", headers={"Connection": "close"})


class BodyTimeout(HTTPException):
    """A body still incomplete ``seconds`` after its headers (a slow client holding a request open);
    raised from ``receive``, answered 408 ``request_timeout``, and the connection is closed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"The request body was not received within {seconds:g} seconds.", headers={"Connection": "close"}
        )


def redact_query(query: str) -> str:
    """Decode names before matching (``api%5Fkey`` is ``api_key`` to the app) and re-encode."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "[REDACTED]" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="[]")


class RequestMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = 1024 * 1024, body_timeout: float = 30.0):
        self.app = app
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or "req-" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(send)
            self._log(scope, 413, start)
            return

        received = 0
        body_deadline = asyncio.get_running_loop().time() + self.body_timeout
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # what comes now is a disconnect, which may take as long as it likes
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):  # the whole body, not each piece: slow drips too
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in response_headers):
                    response_headers.append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        finally:
            self._log(scope, status, start)
            self._observe(scope, status, start)

    async def _too_large(self, send: Send) -> None:
        # The same answer as a chunked body that goes over the limit gets from the handlers (BodyTooLarge).
        exc = BodyTooLarge(self.max_body)
        body = json.dumps(error_body(exc.detail, type=error_type(413), code="request_too_large")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _observe(scope: Scope, status: int, start: float) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if metrics is not None:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # templates, not raw paths
            metrics.observe_request(route, scope["method"], status, time.perf_counter() - start)

    def _log(self, scope: Scope, status: int, start: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        state = scope.get("state", {})
        principal = state.get("principal")
        call = state.get("call")  # api.chat.serving.CallRecord, on chat requests
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope["path"] + ("?" + redact_query(query) if query else "")
        record = {
            "request_id": state.get("request_id"),
            "method": scope["method"],
            "path": path,
            "status": status,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
            "account_id": getattr(principal, "account_id", None),
            "key_prefix": getattr(principal, "key_prefix", None),
            "completion_id": getattr(call, "completion_id", None),
            "credits": getattr(call, "credits", None),
            "client": (scope.get("client") or ("-",))[0],
        }
        access_log.info(json.dumps(record, separators=(",", ":")))
