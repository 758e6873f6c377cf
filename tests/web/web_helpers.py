"""Helpers for the account-page tests: a cookie-keeping HTTP client that knows the forms' CSRF rule."""

from __future__ import annotations

import re

import httpx

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
_NEW_KEY = re.compile(r'<code id="new-key">([^<]+)</code>')
_SHOWN_ID = re.compile(r'data-shown-id="(\d+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "every page carries the CSRF token in a meta tag"
    return match.group(1)


def new_key_of(html: str) -> str:
    match = _NEW_KEY.search(html)
    assert match, "the page shows the new key"
    return match.group(1)


class Browser:
    """An httpx client with a cookie jar, reading the CSRF token from the last page it fetched."""

    def __init__(self, server, **kwargs):
        self.http = server.client(follow_redirects=False, **kwargs)
        self.token = ""

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        if "text/html" in response.headers.get("content-type", ""):
            self.token = csrf_of(response.text)
        return response

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, **kwargs) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.token)
        response = self.http.post(path, data=data, **kwargs)
        if "text/html" in response.headers.get("content-type", ""):
            self.token = csrf_of(response.text)
        return response

    def api(self, method: str, path: str, *, csrf: bool = True, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if csrf:
            headers.setdefault("X-CSRF-Token", self.token)
        return self.http.request(method, path, headers=headers, **kwargs)

    def session_cookie(self) -> str | None:
        return self.http.cookies.get("aimichat_session")

    def sign_up(self, email: str, password: str = PASSWORD) -> httpx.Response:
        """Sign up, then log in (a sign-up logs nobody in): the log-in's response."""
        self.get("/signup")
        response = self.post("/signup", {"email": email, "password": password})
        assert response.status_code == 303 and response.headers["location"] == "/login?signed_up=1", response.text
        logged_in = self.log_in(email, password)
        assert logged_in.status_code == 303, logged_in.text
        return logged_in

    def log_in(self, email: str, password: str = PASSWORD, **kwargs) -> httpx.Response:
        self.get("/login")  # as a browser would: the form's token comes from the page
        response = self.post("/login", {"email": email, "password": password}, **kwargs)
        if response.status_code == 303:
            self.get("/keys")  # the new session's token
        return response

    def generate_key(self, name: str = "laptop", **limits: str | list[str]) -> tuple[int, str]:
        """POST /keys (post/redirect/get: a 303 to the page that shows the key once), then that page."""
        return shown_key(self.follow(self.post("/keys", {"name": name, **limits})))

    def regenerate(self, key_id: int, grace: str = "") -> tuple[int, str, httpx.Response]:
        """Regenerate (confirmed) and follow the redirect: the key's id, its new secret and the page."""
        page = self.follow(self.post(f"/keys/{key_id}/regenerate", {"confirm": "yes", "grace": grace}))
        return (*shown_key(page), page)

    def follow(self, response: httpx.Response) -> httpx.Response:
        """The page a POST redirected to (asserting that it did, and never with a secret in the URL)."""
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert "aimichat_" not in location
        return self.get(location)


def shown_key(page: httpx.Response) -> tuple[int, str]:
    """The id and secret of the key a page shows once."""
    assert page.status_code == 200, page.text
    match = _SHOWN_ID.search(page.text)
    assert match, "the page shows a new key"
    return int(match.group(1)), new_key_of(page.text)


def chat(server, key: str, **kwargs) -> httpx.Response:
    return server.chat({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3, **kwargs}, key)
