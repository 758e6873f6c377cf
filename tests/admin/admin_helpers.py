"""Helpers of the admin tests: an admin key, and calls to the admin API with it."""

from __future__ import annotations

import re
from typing import Any

import httpx

from aimichat.keys import admin_keys
from aimichat.store.db import Database

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def make_admin_key(db: Database, name: str = "ops") -> tuple[int, str]:
    """A new admin key's id and secret (made as the CLI makes one)."""
    with db.session() as s:
        created = admin_keys.create(s, name)
        s.commit()
        return created.key.id, created.secret


class Admin:
    """The admin API with one admin key: ``admin.post("/accounts", json=...)`` is ``POST /admin/v1/accounts``."""

    def __init__(self, http: httpx.Client, key: str):
        self.http, self.key = http, key

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **kwargs.pop("headers", {})}
        return self.http.request(method, "/admin/v1" + path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


def assert_error(response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None) -> str:
    """``response`` is an error of ``status`` in OpenAI's shape (with ``code``/``param`` when given); its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])


def log_in(http: httpx.Client, email: str, password: str = PASSWORD) -> str:
    """Log ``http`` in through the log-in form; the CSRF token of the pages that follow."""
    token = _CSRF.search(http.get("/login").text)
    assert token
    response = http.post("/login", data={"email": email, "password": password, "csrf_token": token.group(1)})
    assert response.status_code == 303, response.text
    page = _CSRF.search(http.get("/keys").text)
    assert page
    return page.group(1)
