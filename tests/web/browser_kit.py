"""What the browser tests share: Debian's Chromium (launched once per module), a live server over SQLite, a
page whose console errors are collected, a log-in through the form, and axe-core from npm."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from web_helpers import PASSWORD

from aimichat.store.db import Database
from conftest import serve_app, tool_missing
from scripted_engine import ScriptedEngine

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NODE_MODULES = Path(__file__).parents[1] / "node" / "node_modules"  # `make browser` runs npm install there
AXE = NODE_MODULES / "axe-core" / "axe.min.js"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium through Playwright (a module's ``browser`` fixture yields it)."""
    if not CHROMIUM.exists():
        tool_missing("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield launched
        launched.close()


def browser_fixture(name: str = "browser") -> Any:
    """A module-scoped fixture called ``name`` that yields Debian's Chromium: ``browser = browser_fixture()``."""

    @pytest.fixture(scope="module", name=name)
    def launched_browser() -> Iterator[Any]:
        with chromium() as launched:
            yield launched

    return launched_browser


@contextmanager
def live_server(tmp_path_factory: Any, folder: str, engine: Any = None) -> Iterator[Any]:
    """The app on a real socket over a fresh SQLite file, answered by ``engine`` (a default ScriptedEngine)."""
    tmp = tmp_path_factory.mktemp(folder)
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(engine if engine is not None else ScriptedEngine(), db, tmp) as live:
        yield live
    db.dispose()


def require_axe() -> None:
    if not AXE.exists():
        tool_missing("axe-core is not installed (make browser)")


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """What axe-core finds on the page as it stands. The pages' CSP forbids axe's injected script, so the
    page's context must be opened with ``bypass_csp=True`` (the pages themselves are unchanged)."""
    require_axe()
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate("() => axe.run(document, { resultTypes: ['violations'] })")
    return list(result["violations"])


class Watched:
    """A page whose console errors and script exceptions (CSP violations among them) are collected."""

    def __init__(self, page: Any):
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))


def log_in(page: Any, email: str, password: str = PASSWORD) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/keys")
