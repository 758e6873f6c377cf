"""Helpers of the email tests: a cookie-keeping client that knows the forms' CSRF rule, and links read from mail."""

from __future__ import annotations

import re
from email.message import EmailMessage
from urllib.parse import urlsplit

import httpx

PASSWORD = "correct horse"  # make_account's
NEW_PASSWORD = "a much newer secret"
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
_URL = re.compile(r"https?://\S+")


class Visit:
    """One browser: an httpx client with a cookie jar, posting forms with the CSRF token of the last page."""

    def __init__(self, server, **kwargs) -> None:
        self.http: httpx.Client = server.client(follow_redirects=False, **kwargs)
        self.token = ""

    def __enter__(self) -> Visit:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        self._keep_token(response)
        return response

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, **kwargs) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.token)
        response = self.http.post(path, data=data, **kwargs)
        self._keep_token(response)
        return response

    def _keep_token(self, response: httpx.Response) -> None:
        match = _CSRF.search(response.text) if "text/html" in response.headers.get("content-type", "") else None
        if match:
            self.token = match.group(1)

    def log_in(self, email: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/login")
        response = self.post("/login", {"email": email, "password": password})
        if response.status_code == 303:
            self.get("/account")  # the new session's CSRF token
        return response

    def sign_up(self, email: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/signup")
        response = self.post("/signup", {"email": email, "password": password})
        assert response.status_code == 303 and response.headers["location"] == "/login?signed_up=1", response.text
        return response

    def forgot(self, email: str, **kwargs) -> httpx.Response:
        self.get("/password/forgot")
        return self.post("/password/forgot", {"email": email}, **kwargs)


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None, "every mail has a plain-text part"
    return part.get_content()


def link_in(message: EmailMessage, path: str) -> str:
    """The one URL in the mail's text whose path is ``path``."""
    urls = [u for u in _URL.findall(text_of(message)) if urlsplit(u).path == path]
    assert len(urls) == 1, text_of(message)
    return urls[0]


def local(url: str) -> str:
    """A link's path and query, to request it from an in-process app."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def token_of(url: str) -> str:
    return urlsplit(url).query.removeprefix("token=")
