"""The HTTP client of the upstream engine: a small interface (post a request and stream its answer, get a
status, close) over aiohttp's connection pool, or over httpx's.

The engine needs little of an HTTP client: post JSON bytes and read the answer's body as it comes, in
chunks (the engine splits the SSE lines itself), or read the first bytes of an error answer. Going
through httpx's request and response objects to reach aiohttp's pool (``httpx-aiohttp``) cost about a
fifth of the gateway's CPU a request in the issue-14 profile (httpx's layer ~11 %, aiohttp ~10 % of
2.4 ms); aiohttp used directly skips httpx's half. ``bench/upstream_client.py`` measures both clients
(the numbers are in docs/engines.md).

``AIMICHAT_UPSTREAM_HTTP=httpx`` puts httpx's own pool back (httpcore over anyio): the tests run on both.
Either way a failed exchange (refused, reset, dropped, a socket timeout) is a :class:`TransportError` named
as httpx names it (``ConnectError``, ``ReadError``, ``RemoteProtocolError``…), never a client-specific error
type the engine does not know (it would become a 500).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import httpx
from aiohttp.payload import BytesPayload
from yarl import URL

HttpClientKind = Literal["aiohttp", "httpx"]

_KEEPALIVE = 30.0  # seconds an idle pooled connection is kept


class TransportError(Exception):
    """An exchange with an upstream failed below HTTP; ``kind`` is httpx's name for the failure."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail)
        self.kind = kind

    @property
    def reason(self) -> str:
        """What /readyz and the logs say: ``ConnectError: <detail>``."""
        return f"{self.kind}: {self}" if str(self) else self.kind


def split_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``https://user:pass@host/v1`` as the URL without credentials and the Basic Authorization header they
    stand for (as httpx sends them); a URL without userinfo comes back as it is, with no header."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, {"Authorization": f"Basic {token}"}


class Response(ABC):
    """An upstream's answer, its body read as it arrives."""

    status: int
    headers: Mapping[str, str]  # looked up case-insensitively

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @abstractmethod
    async def next_chunk(self) -> bytes:
        """The next bytes of the body as they arrived (any size, lines cut anywhere); b"" at its end."""

    async def read(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (of an error answer: its start is enough)."""
        chunks, size = [], 0
        while size < limit:
            chunk = await self.next_chunk()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:limit]

    @abstractmethod
    async def aclose(self, drain: float = 0) -> None:
        """Close the answer. With ``drain``, first read what is left of the body for up to that many seconds,
        so the connection goes back to the pool; otherwise an unfinished body closes the connection (which
        tells the upstream to stop generating)."""


class Client(ABC):
    """A pooled HTTP client for the upstream engine."""

    @abstractmethod
    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *, fresh: bool = False) -> Response:
        """POST JSON bytes and return once the answer's headers are in. ``fresh``: over a new connection,
        closed afterwards (not the pool's: one that just broke may be returned to it half-dead)."""

    @abstractmethod
    async def get_status(self, url: str, headers: Mapping[str, str], timeout: float) -> int:
        """GET ``url`` and return its status, within ``timeout`` seconds."""

    @abstractmethod
    async def aclose(self) -> None: ...


def new_client(kind: HttpClientKind, headers: Mapping[str, str], connect: float, max_connections: int) -> Client:
    """The upstream client: ``headers`` on every request, ``connect`` seconds to connect (and, with httpx, to
    write), no read timeout (the engine enforces its own per event, so keep-alive pings cannot stretch it)."""
    if kind == "httpx":
        return HttpxClient(headers, connect, max_connections)
    return AiohttpClient(headers, connect, max_connections)


# -- aiohttp -------------------------------------------------------------------------------------


@contextmanager
def _aiohttp_errors() -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
        raise TransportError("ConnectError", str(exc)) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise TransportError("ConnectTimeout", str(exc)) from exc
    except aiohttp.ServerDisconnectedError as exc:
        # A close before the whole head arrived. httpx calls it RemoteProtocolError, with this text; aiohttp's
        # own text can be the repr of the half-received head (the upstream's headers, not for /readyz).
        raise TransportError("RemoteProtocolError", "Server disconnected without sending a response.") from exc
    except TimeoutError as exc:  # aiohttp's socket timeouts are TimeoutErrors: not the engine's own limits
        raise TransportError("ReadTimeout", str(exc)) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:  # a body cut short, a bad answer
        raise TransportError("RemoteProtocolError", str(exc)) from exc
    except (aiohttp.ClientError, OSError) as exc:  # a reset, a server that hung up
        raise TransportError("ReadError", str(exc)) from exc


class AiohttpResponse(Response):
    def __init__(self, response: aiohttp.ClientResponse, owner: aiohttp.ClientSession | None = None) -> None:
        self._response = response
        self._content = response.content
        self._owner = owner  # a session of its own (``fresh``), closed with the response
        self.status = response.status
        self.headers = response.headers

    async def next_chunk(self) -> bytes:
        # readany: whatever is buffered, with no line-length limit (readline refuses lines over 2**17
        # bytes, and a tool call's arguments can be one longer SSE line).
        with _aiohttp_errors():
            return await self._content.readany()

    async def aclose(self, drain: float = 0) -> None:
        try:
            if drain and not self._content.at_eof():
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout(drain):
                        while await self.next_chunk():
                            pass
            if self._content.at_eof():
                self._response.release()  # a whole body: the connection goes back to the pool
            else:
                self._response.close()  # a half-read one: the upstream sees the connection close
        finally:
            if self._owner is not None:
                await self._owner.close()


class AiohttpClient(Client):
    """aiohttp's pool, used directly: no per-request conversion to and from httpx's objects."""

    def __init__(self, headers: Mapping[str, str], connect: float, max_connections: int) -> None:
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect)
        self._session = self._new_session(aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=_KEEPALIVE))
        self._urls: dict[str, URL] = {}  # each upstream's URLs parsed once, not at every request

    def _new_session(self, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
        # trust_env=False: no HTTP(S)_PROXY, as with httpx here (docs/engines.md).
        return aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout, trust_env=False)

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = URL(url)
        return parsed

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *, fresh: bool = False) -> Response:
        session = self._new_session(aiohttp.TCPConnector(force_close=True)) if fresh else self._session
        payload = BytesPayload(body, content_type="application/json")
        # allow_redirects=False here and in get_status: as with httpx, a 3xx is the upstream's answer (a wrong
        # URL, an "HTTP 302" failure), never a POST silently re-sent elsewhere (as a GET, after a 302).
        try:
            with _aiohttp_errors():
                response = await session.post(
                    self._url(url), data=payload, headers=headers or None, allow_redirects=False
                )
        except BaseException:
            if fresh:
                await session.close()
            raise
        return AiohttpResponse(response, session if fresh else None)

    async def get_status(self, url: str, headers: Mapping[str, str], timeout: float) -> int:
        with _aiohttp_errors():
            async with self._session.get(
                url, headers=headers or None, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as response:
                return response.status

    async def aclose(self) -> None:
        await self._session.close()


# -- httpx ---------------------------------------------------------------------------------------


@contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise TransportError(type(exc).__name__, str(exc)) from exc


class HttpxResponse(Response):
    def __init__(self, response: httpx.Response, owner: httpx.AsyncClient | None = None) -> None:
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_bytes()
        self._owner = owner
        self.status = response.status_code
        self.headers = response.headers

    async def next_chunk(self) -> bytes:
        with _httpx_errors():
            return await anext(self._chunks, b"")

    async def aclose(self, drain: float = 0) -> None:
        try:
            if drain:
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout(drain):
                        while await self.next_chunk():
                            pass
            await self._response.aclose()
        finally:
            if self._owner is not None:
                await self._owner.aclose()


class HttpxClient(Client):
    """httpx's own pool (httpcore over anyio)."""

    def __init__(self, headers: Mapping[str, str], connect: float, max_connections: int) -> None:
        timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=None)
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=32, keepalive_expiry=_KEEPALIVE
        )
        # trust_env=False: no HTTP(S)_PROXY, as with aiohttp (docs/engines.md)
        self._client = httpx.AsyncClient(headers=dict(headers), timeout=timeout, limits=limits, trust_env=False)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *, fresh: bool = False) -> Response:
        client = self._client
        if fresh:
            client = httpx.AsyncClient(headers=client.headers, timeout=client.timeout, trust_env=False)
        request = client.build_request(
            "POST", url, content=body, headers={"Content-Type": "application/json", **headers}
        )
        try:
            with _httpx_errors():
                response = await client.send(request, stream=True)
        except BaseException:
            if fresh:
                await client.aclose()
            raise
        return HttpxResponse(response, client if fresh else None)

    async def get_status(self, url: str, headers: Mapping[str, str], timeout: float) -> int:
        with _httpx_errors():
            response = await self._client.get(url, headers=headers, timeout=timeout)
        return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()
