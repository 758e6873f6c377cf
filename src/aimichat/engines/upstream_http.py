"""The HTTP client of the upstream engine: httpx's API over aiohttp's connection pool.

httpx's own pool (httpcore over anyio) costs more CPU a request than the rest of the request path put
together, and it scales badly with concurrent requests. Measured here (2 cores, uvloop, the zero-latency
stub of ``bench/stub_upstream.py``, a streamed answer read line by line, in one process, alternating):
httpx 0.79 ms of CPU a request and 770 requests/s at 32 at once; the same ``httpx.AsyncClient`` over
aiohttp's pool (``httpx-aiohttp``, the transport the openai SDK ships as ``DefaultAioHttpClient``) 0.49 ms
and 2,614 requests/s. The engine keeps httpx's API (requests, responses, errors); only the transport changes.

``AIMICHAT_UPSTREAM_HTTP=httpx`` puts httpx's own pool back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

HttpClientKind = Literal["aiohttp", "httpx"]


@contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    """Whatever aiohttp raises reaches the engine as the httpx error it already handles: a failed request
    is an ``httpx.TransportError``, never an error type the engine does not know (it would become a 500)."""
    try:
        try:
            yield
        except httpx.HTTPError as mapped:
            # httpx_aiohttp's own mapping calls a refused connection a ConnectTimeout: map its cause again.
            if isinstance(mapped.__cause__, aiohttp.ClientError | OSError | TimeoutError):
                raise mapped.__cause__ from None
            raise
    except httpx.HTTPError:
        raise
    except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:  # a reset, a server that hung up
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        with _as_httpx_errors(self._request):
            await self._stream.aclose()


class AiohttpPool(AiohttpTransport):
    """``httpx_aiohttp``'s transport with every aiohttp error turned into its httpx counterpart."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.userinfo:  # httpx made it the Authorization header already; aiohttp refuses both
            request.url = request.url.copy_with(userinfo=b"")
        with _as_httpx_errors(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream, request)
        return response


def transport(kind: HttpClientKind, limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """The transport of the upstream client (None: httpx's own)."""
    if kind == "httpx":
        return None
    return AiohttpPool(limits=limits)
