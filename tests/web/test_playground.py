"""The playground's settings without a browser: the rule (:func:`playground.chat_settings`) called directly,
then both paths that use it against the real app (SQLite, then PostgreSQL) with the scripted engine, which
records what it received. Also: the vendored Markdown libraries are served from this origin, as the CSP
requires. (The browser side, Markdown, Stop, View code and the rest, is test_playground_browser.py.)

And how long a conversation may grow (:func:`playground.conversation`): a person's turns up to 8,000
characters, the model's replies up to ``MAX_REPLY_CHARS``, so a long reply never blocks the next turn; the
rule called directly, then over HTTP, then in Chromium: what the page says when a conversation cannot go on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from browser_kit import DESKTOP, Watched, chromium, log_in
from playwright.sync_api import expect
from sqlalchemy import func, select
from web_helpers import PASSWORD, Browser

from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from aimichat.web import playground
from aimichat.web.playground import (
    MAX_CHARS,
    MAX_REPLY_CHARS,
    MAX_TOKENS,
    ChatSettings,
    ConversationTooLong,
    SettingsRefused,
    chat_settings,
    conversation,
)
from aimichat.web.render import CSP
from conftest import make_account, serve_app, sse_events, sse_text
from scripted_engine import ScriptedEngine

TEMPERATURE_ERROR = "Temperature must be a number from 0 to 2."
MAX_TOKENS_ERROR = "Max tokens must be a whole number from 1 to 2,048."
SYSTEM_ERROR = "The system prompt must be text of at most 8,000 characters."

# -- the rule ------------------------------------------------------------------------------------


def test_nothing_or_blanks_take_the_defaults():
    assert chat_settings({}) == ChatSettings("", 0.7, 512)
    assert chat_settings({"system": None, "temperature": "  ", "max_tokens": ""}) == ChatSettings("", 0.7, 512)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"temperature": 0, "max_tokens": 1}, ChatSettings("", 0.0, 1)),
        ({"temperature": 2, "max_tokens": 2048}, ChatSettings("", 2.0, 2048)),
        ({"temperature": "0.25", "max_tokens": "64"}, ChatSettings("", 0.25, 64)),  # as a form sends them
        ({"temperature": " 1.5 ", "max_tokens": "12.0"}, ChatSettings("", 1.5, 12)),  # a whole number, written so
        ({"system": "  Be brief.  "}, ChatSettings("Be brief.", 0.7, 512)),
    ],
)
def test_good_settings(raw, expected):
    assert chat_settings(raw) == expected


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ({"temperature": 2.01}, "temperature", TEMPERATURE_ERROR),
        ({"temperature": -0.1}, "temperature", TEMPERATURE_ERROR),
        ({"temperature": "warm"}, "temperature", TEMPERATURE_ERROR),
        ({"temperature": "nan"}, "temperature", TEMPERATURE_ERROR),
        ({"temperature": True}, "temperature", TEMPERATURE_ERROR),  # JSON's true is no number
        ({"temperature": [1]}, "temperature", TEMPERATURE_ERROR),
        ({"max_tokens": 0}, "max_tokens", MAX_TOKENS_ERROR),
        ({"max_tokens": 2049}, "max_tokens", MAX_TOKENS_ERROR),
        ({"max_tokens": 2.5}, "max_tokens", MAX_TOKENS_ERROR),
        ({"max_tokens": "1e999"}, "max_tokens", MAX_TOKENS_ERROR),
        ({"max_tokens": 10**400}, "max_tokens", MAX_TOKENS_ERROR),  # too large for a float: no OverflowError
        ({"system": "x" * 8001}, "system", SYSTEM_ERROR),
        ({"system": 7}, "system", SYSTEM_ERROR),
        ({"system": "\ud800"}, "system", SYSTEM_ERROR),  # JSON can carry a lone surrogate; it is no text
    ],
)
def test_bad_settings_name_their_field(raw, field, message):
    assert chat_settings(raw) == SettingsRefused({field: message})


def test_every_bad_field_is_named_at_once():
    refused = chat_settings({"system": 1, "temperature": 9, "max_tokens": 0})
    assert isinstance(refused, SettingsRefused)
    assert set(refused.errors) == {"system", "temperature", "max_tokens"}


def test_the_request_carries_the_settings_with_the_system_prompt_first():
    turns = [{"role": "user", "content": "Hi"}]
    request = playground.chat_request(turns, True, None, ChatSettings("Be brief.", 0.2, 40))
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.temperature == 0.2 and request.max_tokens == 40
    plain = playground.chat_request(turns, False)  # no system prompt: none is sent
    assert [m.role for m in plain.messages] == ["user"] and plain.temperature == 0.7 and plain.max_tokens == 512


# -- the stream (the page with script) -----------------------------------------------------------


def _charged(server) -> int:
    with server.db.session() as s:
        return s.scalar(select(func.count()).select_from(UsageEvent)) or 0


def test_the_stream_sends_the_settings_and_refuses_bad_ones_by_field(server):
    with Browser(server) as b:
        b.sign_up("stream-settings@example.com")
        hello = [{"role": "user", "content": "Hi"}]
        body = {"messages": hello, "system": "Be brief.", "temperature": 0.3, "max_tokens": 4}
        r = b.api("POST", "/playground/stream", json=body)
        assert r.status_code == 200 and '"finish_reason":"length"' in r.text  # 4 tokens, then cut
        generation = server.engine.generations[-1]
        assert [(m.role, m.content) for m in generation.messages] == [("system", "Be brief."), ("user", "Hi")]
        assert generation.params.temperature == 0.3 and generation.params.max_tokens == 4

        for field, value, message in (
            ("temperature", 5, TEMPERATURE_ERROR),
            ("temperature", "hot", TEMPERATURE_ERROR),
            ("max_tokens", 0, MAX_TOKENS_ERROR),
            ("system", ["a list"], SYSTEM_ERROR),
        ):
            refused = b.api("POST", "/playground/stream", json={"messages": hello, field: value})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == field and refused.json()["error"]["message"] == message
        assert _charged(server) == 1, "refused settings cost nothing"


# -- the form (the page without script) ----------------------------------------------------------


def test_the_form_sends_the_settings_and_shows_bad_ones_next_to_their_field(server):
    with Browser(server) as b:
        b.sign_up("form-settings@example.com")
        page = b.post("/playground", {"message": "Hi", "system": "Be brief.", "temperature": "0.4", "max_tokens": "3"})
        assert page.status_code == 200
        generation = server.engine.generations[-1]
        assert [(m.role, m.content) for m in generation.messages] == [("system", "Be brief."), ("user", "Hi")]
        assert generation.params.temperature == 0.4 and generation.params.max_tokens == 3
        assert re.search(r'<input id="max_tokens"[^>]* value="3"', page.text), "the settings stay as chosen"
        assert ">Be brief.</textarea>" in page.text

        refused = b.post(
            "/playground",
            {"role": ["user", "assistant"], "content": ["Hi", "Hello"], "message": "Again", "temperature": "7"},
        )
        assert refused.status_code == 400
        html = refused.text
        error = re.search(r'<p class="alert error field-error" id="temperature-error" role="alert">([^<]*)</p>', html)
        assert error and error.group(1) == TEMPERATURE_ERROR
        field = re.search(r'<input id="temperature"[^>]*>', html)
        assert field and 'value="7"' in field.group(0) and 'aria-invalid="true"' in field.group(0)
        assert "autofocus" in field.group(0), "the field to fix has focus"
        assert re.search(r'<details class="settings" id="settings" open>', html), "the settings are unfolded"
        assert ">Again</textarea>" in html, "the message is not lost"
        assert html.count('class="msg ') == 2, "the earlier turns stay, and nothing was added"
        assert 'id="max_tokens-error" role="alert" hidden' in html, "only the wrong field is named"
        assert _charged(server) == 1, "nothing was sent"


# -- the vendored libraries ----------------------------------------------------------------------


def test_the_markdown_libraries_are_served_from_this_origin(server):
    assert "script-src 'self'" in CSP
    with Browser(server) as b:
        b.sign_up("vendor@example.com")
        page = b.get("/playground").text
        scripts = re.findall(r'<script src="([^"]+)" defer></script>', page)
        assert [s.split("?")[0] for s in scripts] == [
            "/static/app.js",
            "/static/vendor/marked-18.2.1.umd.js",
            "/static/vendor/purify-3.5.0.min.js",
            "/static/playground.js",
        ]
        for src in scripts:
            r = b.get(src)
            assert r.status_code == 200 and "javascript" in r.headers["content-type"], src
        assert "marked v18.2.1" in b.get(scripts[1]).text and "DOMPurify 3.5.0" in b.get(scripts[2]).text


# -- how long a conversation may grow: the rule ---------------------------------------------------------


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def test_a_reply_of_the_most_tokens_a_person_may_ask_for_goes_back_whole():
    assert MAX_REPLY_CHARS == 16_384 and MAX_REPLY_CHARS >= 4 * MAX_TOKENS * 2, "twice English's 4 characters a token"
    reply = "x" * MAX_REPLY_CHARS  # longer than anything a person may type, as a 2,048-token reply can be
    turns = conversation([user("Write a lot"), assistant(reply), user("Thanks. And now?")])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"] and turns[1]["content"] == reply


def test_a_person_still_types_at_most_8000_characters():
    assert conversation([user("y" * MAX_CHARS)])[0]["content"] == "y" * MAX_CHARS
    with pytest.raises(ValueError, match=r"^Your message is longer than 8,000 characters") as refused:
        conversation([user("Hi"), assistant("Hello"), user("y" * (MAX_CHARS + 1))])
    assert not isinstance(refused.value, ConversationTooLong), "shortening the message helps: no new chat needed"
    assert isinstance(chat_settings({"system": "s" * (MAX_CHARS + 1)}), SettingsRefused), "nor the system prompt"


@pytest.mark.parametrize(
    "earlier",
    [assistant("x" * (MAX_REPLY_CHARS + 1)), user("y" * (MAX_CHARS + 1))],
    ids=["reply", "message"],
)
def test_an_earlier_turn_too_long_to_send_again_asks_for_a_new_chat(earlier):
    with pytest.raises(ConversationTooLong, match=r"too long to send again: start a new chat to go on\.$"):
        conversation([user("Hi"), earlier, user("Next")])


# -- how long a conversation may grow: over HTTP ------------------------------------------------------------


LONG_WORD = "abcdefghijklm"  # the scripted engine's tokens are words: 14 characters each, with the space


def long_reply(words: int) -> str:
    return " ".join([LONG_WORD] * words)


def test_the_stream_takes_a_long_reply_back_and_names_a_conversation_too_long(server):
    server.engine.reply = long_reply(1000)  # 13,999 characters: refused before, as over 8,000
    with Browser(server) as b:
        b.sign_up("long-stream@example.com")
        first = b.api("POST", "/playground/stream", json={"messages": [user("Write a lot")], "max_tokens": 2048})
        assert first.status_code == 200, first.text
        reply = sse_text(sse_events(first.text))
        assert MAX_CHARS < len(reply) <= MAX_REPLY_CHARS

        server.engine.reply = "Short answer."
        history = [user("Write a lot"), assistant(reply), user("Thanks")]
        second = b.api("POST", "/playground/stream", json={"messages": history, "max_tokens": 8})
        assert second.status_code == 200, second.text
        assert sse_text(sse_events(second.text)) == "Short answer."
        assert server.engine.generations[-1].messages[1].content == reply, "the reply went back whole"

        too_long = [user("Write a lot"), assistant("x" * (MAX_REPLY_CHARS + 1)), user("Thanks")]
        refused = b.api("POST", "/playground/stream", json={"messages": too_long})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("conversation_too_long", "messages")
        assert error["message"].endswith("start a new chat to go on.")
        typed = b.api("POST", "/playground/stream", json={"messages": [user("y" * (MAX_CHARS + 1))]})
        assert typed.status_code == 400 and typed.json()["error"]["code"] is None
    assert _charged(server) == 2, "refusals cost nothing"


def test_the_form_takes_a_long_reply_back_too(server):
    server.engine.reply = "Short answer."
    reply = long_reply(1000)
    with Browser(server) as b:
        b.sign_up("long-form@example.com")
        page = b.post(
            "/playground", {"role": ["user", "assistant"], "content": ["Write a lot", reply], "message": "And?"}
        )
        assert page.status_code == 200, page.text
        assert server.engine.generations[-1].messages[1].content == reply
        assert page.text.count('class="msg ') == 4

        too_long = "x" * (MAX_REPLY_CHARS + 1)
        refused = b.post("/playground", {"role": ["user", "assistant"], "content": ["Hi", too_long], "message": "And?"})
        assert refused.status_code == 400
        assert "too long to send again: start a new chat to go on." in refused.text
        assert 'id="new-chat" href="/playground"' in refused.text, "the way out is on the page"
    assert _charged(server) == 1


# -- how long a conversation may grow: in Chromium ------------------------------------------------------------

REFUSED = "Failed to load resource: the server responded with a status of 400"  # Chromium logs each refusal
SLOW = 60_000  # ms: how long a reply may take on a loaded machine


def _replies(messages: Sequence[Any]) -> list[str]:
    """The scripted engine's reply: long for "Write a lot" (the reply that used to block the next turn)."""
    asked = messages[-1].content
    if asked == "Write a lot":
        return [LONG_WORD] * 1000  # 13,999 characters
    if asked == "Fill the context":
        return ["word"] * MAX_TOKENS  # 2,048 tokens: the next prompt is past the engine's 2,048
    return ["Short", "answer."]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("playground-long")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(ScriptedEngine(_replies), db, tmp) as server:
        yield server
    db.dispose()


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def chat_page(chromium_browser, live) -> Iterator[Any]:
    context = chromium_browser.new_context(base_url=live.url, viewport=DESKTOP)
    watched = Watched(context.new_page())
    yield watched
    context.close()
    assert [e for e in watched.errors if not e.startswith(REFUSED)] == [], "no console errors or CSP violations"


def _enter(page: Any, live: Any, email: str) -> int:
    account_id = make_account(live.db, email, password=PASSWORD)
    log_in(page, email)
    page.goto("/playground")
    return account_id


def _send(page: Any, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def _max_tokens(page: Any, value: str) -> None:
    page.locator("details#settings summary").click()
    page.get_by_label("Max tokens", exact=True).fill(value)


@pytest.mark.browser
def test_in_the_page_a_long_reply_no_longer_blocks_the_next_turn(chat_page, live):
    page = chat_page.page
    _enter(page, live, "long-page@example.com")
    _max_tokens(page, "2048")
    _send(page, "Write a lot")
    replies = page.locator(".msg.assistant:not(.pending)")
    expect(replies).to_have_count(1, timeout=SLOW)
    _send(page, "Thanks")
    expect(replies).to_have_count(2, timeout=SLOW)
    expect(replies.nth(1).locator(".text")).to_have_text("Short answer.")
    page.reload()  # the conversation kept in localStorage goes back just as well
    _send(page, "Once more")
    expect(replies).to_have_count(3, timeout=SLOW)
    expect(page.locator("#chat-error")).to_be_hidden()
    assert not chat_page.errors, "nothing was refused"


def _plant_a_reply_too_long(page: Any, account_id: int) -> None:
    """A conversation kept from before (localStorage) holding a reply longer than the server takes back."""
    kept = {"v": 1, "turns": [user("Hi"), assistant("x" * (MAX_REPLY_CHARS + 1))], "settings": {}}
    page.evaluate(
        "([key, value]) => localStorage.setItem(key, value)", [f"aimichat.playground.{account_id}", json.dumps(kept)]
    )
    page.reload()


@pytest.mark.browser
@pytest.mark.parametrize("how", ["reply over the limit", "context window full"])
def test_a_conversation_too_long_to_go_on_says_so_and_offers_a_new_chat(chat_page, live, how):
    page = chat_page.page
    account_id = _enter(page, live, f"too-long-{how.replace(' ', '-')}@example.com")
    replies = page.locator(".msg.assistant:not(.pending)")
    if how == "reply over the limit":
        _plant_a_reply_too_long(page, account_id)
        expected = f"longer than {MAX_REPLY_CHARS:,} characters, too long to send again"
    else:
        _max_tokens(page, "2048")
        _send(page, "Fill the context")
        expect(replies).to_have_count(1, timeout=SLOW)
        expected = "This conversation has grown too long to send again."
    expect(replies).to_have_count(1)

    _send(page, "Next question")
    alert = page.locator("#chat-error")
    expect(alert).to_contain_text(expected, timeout=SLOW)
    expect(alert).to_contain_text("Your message is still in the box: start a new chat to send it.")
    expect(page.get_by_label("Message")).to_have_value("Next question")
    expect(replies).to_have_count(1)  # the refused turn left the log

    alert.get_by_role("button", name="New chat").click()
    expect(alert).to_be_hidden()
    expect(page.locator("#log li")).to_have_count(0)
    expect(page.get_by_label("Message")).to_be_focused()
    page.get_by_label("Message").press("Enter")  # the message waiting in the box, in the new chat
    expect(replies).to_have_count(1, timeout=SLOW)
    expect(replies.first.locator(".text")).to_have_text("Short answer.")
    expect(page.locator(".msg.user .text")).to_have_text(["Next question"])
