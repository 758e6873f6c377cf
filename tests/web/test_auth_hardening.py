"""Issue 15's red-team findings on sign-up and log-in (finding 4: account enumeration; finding 9: locking a
known email out of log-in), over HTTP in-process and as plain functions.

- Sign-up answers the same for a taken email as for a free one (for a taken one it creates and changes
  nothing) and logs nobody in either way; it is limited per client address (10 an hour) with a 429 page
  and ``Retry-After``.
- Log-in for an unknown email verifies against a dummy hash of the real hasher's parameters, so it takes
  as long as a wrong password for a real account.
- Failed log-ins lock the address they come from; an email is locked only for browsers that never logged
  in to it, and only when failures come from several addresses. A browser that logged in to the account
  before (its signed "known device" cookie) is held back by its own failures alone.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time

import argon2
import httpx
import pytest
from web_helpers import PASSWORD, Browser

from aimichat.accounts import service as accounts
from aimichat.store.clock import utcnow
from aimichat.store.models import Account, LoginAttempt
from aimichat.web import auth, devices, throttle
from conftest import MutableClock, app_client, make_account
from scripted_engine import ScriptedEngine

CHOSEN = "a brand new password"  # what the person signing up types


def at(address: str) -> dict[str, dict[str, str]]:
    """Request options that make the app see ``address`` as the client (it trusts X-Forwarded-For from 127.0.0.1)."""
    return {"headers": {"X-Forwarded-For": address}}


def account_count(db) -> int:
    with db.session() as s:
        return s.query(Account).count()


def shape(response: httpx.Response) -> list[tuple[str, str]]:
    """A response's headers, but for those that differ on every answer: the date, the request id, and the values
    of cookies (a fresh CSRF token)."""
    out = []
    for name, value in response.headers.multi_items():
        if name in ("date", "x-request-id"):
            continue
        if name == "set-cookie":
            value = re.sub(r"=[^;]*", "=…", value, count=1)
        out.append((name, value))
    return sorted(out)


def sign_up_as(server, email: str, password: str = CHOSEN, address: str = "198.51.100.1") -> httpx.Response:
    """A sign-up from a fresh browser (that has just loaded the form), asserting it leaves nobody logged in."""
    with Browser(server) as b:
        b.get("/signup")
        response = b.post("/signup", {"email": email, "password": password}, **at(address))
        assert b.session_cookie() is None, "a sign-up logs nobody in"
        assert b.get("/keys").headers["location"].startswith("/login")
        return response


# -- finding 4: sign-up does not tell which emails have accounts ----------------------------------


def test_sign_up_answers_alike_for_a_taken_and_a_free_email(server):
    make_account(server.db, "taken@example.com", password=PASSWORD)
    taken = sign_up_as(server, "Taken@Example.com")
    free = sign_up_as(server, "free@example.com")
    assert taken.status_code == free.status_code == 303
    assert shape(taken) == shape(free) and taken.text == free.text
    assert "already" not in taken.text and "taken" not in taken.headers["location"].lower()
    # Both go on to the same log-in page, which says what to do either way.
    with Browser(server) as b:
        landing = [b.get(r.headers["location"]) for r in (taken, free)]
    assert landing[0].status_code == 200 and landing[0].text == landing[1].text
    assert "log in" in landing[0].text.lower()

    # Nothing of the taken account changed: its owner's password works, the newcomer's does not.
    assert account_count(server.db) == 2
    with Browser(server) as owner:
        assert owner.log_in("taken@example.com", PASSWORD).status_code == 303
    with Browser(server) as someone:
        assert someone.log_in("taken@example.com", CHOSEN).status_code == 400
    # The free one is made, with the password chosen.
    with Browser(server) as newcomer:
        assert newcomer.log_in("free@example.com", CHOSEN).status_code == 303


def test_refused_sign_ups_read_the_same_for_a_taken_and_a_free_email(server):
    make_account(server.db, "taken@example.com", password=PASSWORD)
    with Browser(server) as b:
        b.get("/signup")
        emails = ("taken@example.com", "fresh@example.com")  # as long as each other: the pages' lengths match
        pages = [b.post("/signup", {"email": email, "password": "short"}) for email in emails]
        assert [p.status_code for p in pages] == [400, 400]
        assert "at least 8 characters" in pages[0].text
        assert pages[0].text.replace(emails[0], "E") == pages[1].text.replace(emails[1], "E")
        assert shape(pages[0]) == shape(pages[1])
    assert account_count(server.db) == 1


def test_sign_up_hashes_the_password_whether_or_not_the_email_is_taken(database, monkeypatch):
    """The same work on both paths (one argon2 hash), so the answer's timing does not tell either."""
    make_account(database, "taken@example.com")
    hashed: list[str] = []
    real_hash = argon2.PasswordHasher.hash
    monkeypatch.setattr(argon2.PasswordHasher, "hash", lambda self, pw, **kw: hashed.append(pw) or real_hash(self, pw))
    now = utcnow()
    with database.session() as s:
        assert auth.sign_up(s, "taken@example.com", CHOSEN, tier="free", now=now, address="10.9.0.1") is None
        assert auth.sign_up(s, "new@example.com", CHOSEN, tier="free", now=now, address="10.9.0.1") is not None
        s.commit()
    assert hashed == [CHOSEN, CHOSEN]
    with database.session() as s:
        assert accounts.verify_password(accounts.get_account(s, "taken@example.com"), "correct horse")


# -- finding 4: log-in takes as long for an unknown email -----------------------------------------


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # a timing: one database is enough
def test_log_in_verifies_a_hash_of_the_same_parameters_for_an_unknown_email(database, monkeypatch):
    make_account(database, "owner@example.com", password="correct horse")
    with database.session() as s:
        real = argon2.extract_parameters(accounts.get_account(s, "owner@example.com").password_hash)

    verified: list[tuple[str, argon2.Parameters]] = []
    real_verify = argon2.PasswordHasher.verify

    def spy(self, hash, password):
        verified.append((password, argon2.extract_parameters(hash)))
        return real_verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    attempt = iter(range(10_000))

    def timed(email: str) -> float:
        n = next(attempt)  # each from its own address, so no throttle cuts a path short
        with database.session() as s:
            start = time.perf_counter()
            with pytest.raises(auth.Refused) as refused:
                auth.log_in(s, email, "wrong password", address=f"10.8.{n // 200}.{n % 200}", now=utcnow())
            elapsed = time.perf_counter() - start
        assert refused.value.status == 400 and refused.value.message == "Wrong email or password."
        return elapsed

    timed("nobody@example.com")
    timed("owner@example.com")  # warm-up: the dummy hash is made once, on first use
    assert [params for _, params in verified] == [real, real], "both paths verify, with the real parameters"
    assert [password for password, _ in verified] == ["wrong password"] * 2

    # A loose check of the time itself (the finding: ~167 ms against ~32 ms). Interleaved, so a loaded machine
    # slows both alike; medians of 10 each; a second and third try before calling it a difference.
    for _ in range(3):
        unknown, known = [], []
        for i in range(10):
            unknown.append(timed(f"nobody{i}@example.com"))
            known.append(timed("owner@example.com"))
        ratio = statistics.median(unknown) / statistics.median(known)
        if 0.8 <= ratio <= 1.25:
            break
        with database.session() as s:  # the owner's failures would throttle the next round
            s.query(LoginAttempt).delete()
            s.commit()
    medians = f"unknown email {statistics.median(unknown):.3f} s, known {statistics.median(known):.3f} s"
    assert 0.8 <= ratio <= 1.25, medians


def test_a_hash_of_older_parameters_is_redone_at_log_in(database):
    """So that every account's check takes as long as the dummy's (an old 64 MiB hash took five times as long)."""
    make_account(database, "old@example.com", password="correct horse")
    with database.session() as s:
        accounts.get_account(s, "old@example.com").password_hash = argon2.PasswordHasher().hash("correct horse")
        s.commit()
    with database.session() as s:
        auth.log_in(s, "old@example.com", "correct horse", address="10.6.0.1", now=utcnow())
        s.commit()
    with database.session() as s:
        stored = accounts.get_account(s, "old@example.com").password_hash
    assert argon2.extract_parameters(stored) == argon2.extract_parameters(accounts.dummy_hash())
    with database.session() as s:
        assert accounts.verify_password(accounts.get_account(s, "old@example.com"), "correct horse")


# -- finding 4: sign-ups are limited per address --------------------------------------------------


def test_sign_ups_are_limited_per_address_an_hour(database, tmp_path):
    clock = MutableClock(utcnow())
    make_account(database, "taken@example.com", password=PASSWORD)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as server:
        for i in range(10):  # taken emails count like free ones: the limit must not tell them apart either
            email = "taken@example.com" if i % 3 == 0 else f"new{i}@example.com"
            assert sign_up_as(server, email, address="192.0.2.10").status_code == 303
        before = account_count(server.db)
        refused = sign_up_as(server, "one-more@example.com", address="192.0.2.10")
        assert refused.status_code == 429
        assert "Too many sign-ups from your network" in refused.text and "Try again in 60 minutes" in refused.text
        assert 3500 <= int(refused.headers["Retry-After"]) <= 3600
        assert '<p class="alert error" role="alert">' in refused.text, "the sign-up form, with the message"
        assert account_count(server.db) == before

        # Another address may still sign up; after 20 minutes the first still may not; after an hour it may.
        assert sign_up_as(server, "elsewhere@example.com", address="192.0.2.11").status_code == 303
        clock.advance(minutes=20)
        again = sign_up_as(server, "one-more@example.com", address="192.0.2.10")
        assert again.status_code == 429 and "Try again in 40 minutes" in again.text
        clock.advance(minutes=40)
        assert sign_up_as(server, "one-more@example.com", address="192.0.2.10").status_code == 303
        # Log-ins from that address were never limited by its sign-ups.
        with Browser(server) as b:
            assert b.log_in("taken@example.com", PASSWORD, **at("192.0.2.10")).status_code == 303


# -- finding 9: nobody can lock the owner out ------------------------------------------------------


def fail_until_refused(server, email: str, address: str) -> list[int]:
    """Wrong passwords for ``email`` from ``address`` (a browser that never logged in) until a 429."""
    codes = []
    with Browser(server) as attacker:
        while not codes or codes[-1] != 429:
            codes.append(attacker.log_in(email, "guess" + str(len(codes)), **at(address)).status_code)
            assert len(codes) <= 20
    return codes


def test_failures_from_one_address_lock_that_address_not_the_email(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    # The attacker's address is locked after 10 failures, even with the right password from it.
    assert fail_until_refused(server, "owner@example.com", "203.0.113.5") == [400] * 10 + [429]
    with Browser(server) as attacker:
        assert attacker.log_in("owner@example.com", PASSWORD, **at("203.0.113.5")).status_code == 429
    # The owner, even in a browser that never logged in before, is not.
    with Browser(server) as new_laptop:
        assert new_laptop.log_in("owner@example.com", PASSWORD, **at("198.51.100.20")).status_code == 303


def test_a_known_browser_is_not_locked_out_by_failures_from_elsewhere(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    with Browser(server) as owner, Browser(server) as other_browser:
        assert owner.log_in("owner@example.com", **at("198.51.100.7")).status_code == 303
        assert owner.post("/logout").status_code == 303 and owner.session_cookie() is None

        # Guessing from many addresses locks each of them, and then the email, for browsers it does not know.
        for i in range(4):
            fail_until_refused(server, "owner@example.com", f"203.0.113.{i}")
        for browser in (other_browser, Browser(server)):
            r = browser.log_in("owner@example.com", PASSWORD, **at("198.51.100.99"))
            assert r.status_code == 429 and "Too many failed log-in attempts" in r.text, "the right password waits"
            assert 1 <= int(r.headers["Retry-After"]) <= 900 and browser.session_cookie() is None

        # The owner's browser logs in, from home or from an address the attacker locked (a shared network).
        assert owner.log_in("owner@example.com", **at("198.51.100.7")).status_code == 303
        assert owner.post("/logout").status_code == 303
        assert owner.log_in("owner@example.com", **at("203.0.113.0")).status_code == 303


def test_a_known_browser_is_limited_by_its_own_failures(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    make_account(server.db, "second@example.com", password=PASSWORD)
    with Browser(server) as owner:
        assert owner.log_in("owner@example.com", **at("198.51.100.7")).status_code == 303
        owner.post("/logout")
        # A stolen copy of the cookie is no licence to guess: ten failures and that browser waits too ...
        codes = [owner.log_in("owner@example.com", f"guess{i}", **at(f"203.0.113.{i}")).status_code for i in range(11)]
        assert codes == [400] * 10 + [429]
        # ... though other browsers that never failed are not held back by those failures' addresses alone.
        with Browser(server) as elsewhere:
            assert elsewhere.log_in("owner@example.com", **at("198.51.100.8")).status_code == 303


def test_only_a_genuine_device_cookie_for_that_account_counts(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    make_account(server.db, "mallory@example.com", password=PASSWORD)
    for i in range(4):
        fail_until_refused(server, "owner@example.com", f"203.0.113.{i}")
    with Browser(server) as mallory:
        # Mallory's browser is known, for her own account only.
        assert mallory.log_in("mallory@example.com", **at("192.0.2.50")).status_code == 303
        mallory.post("/logout")
        assert mallory.log_in("owner@example.com", PASSWORD, **at("192.0.2.50")).status_code == 429
        # A cookie edited to name the owner's account is not genuine either.
        [cookie] = [c for c in mallory.http.cookies.jar if c.name == "aimichat_device"]
        assert cookie.value, "a log-in leaves a known-device cookie"
        with server.db.session() as s:
            owner_id = accounts.get_account(s, "owner@example.com").id
        cookie.value = re.sub(r"^\d+", str(owner_id), cookie.value)
        assert mallory.log_in("owner@example.com", PASSWORD, **at("192.0.2.50")).status_code == 429


def test_a_password_change_forgets_the_other_known_browsers(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    with Browser(server) as laptop, Browser(server) as phone:
        assert laptop.log_in("owner@example.com", **at("198.51.100.7")).status_code == 303
        assert phone.log_in("owner@example.com", **at("198.51.100.8")).status_code == 303
        changed = laptop.post("/account/password", {"current_password": PASSWORD, "new_password": CHOSEN})
        assert changed.status_code == 303
        laptop.get("/keys")
        laptop.post("/logout")
        for i in range(4):
            fail_until_refused(server, "owner@example.com", f"203.0.113.{i}")
        assert phone.log_in("owner@example.com", CHOSEN, **at("198.51.100.8")).status_code == 429
        assert laptop.log_in("owner@example.com", CHOSEN, **at("198.51.100.7")).status_code == 303


def test_throttle_rules_as_functions(database):
    """The rules on the throttle's own terms: 10 failures lock an address; 30, from any number of addresses,
    lock an email for browsers it does not know; a known device counts its own; a success forgives only
    that browser's failures."""
    now = dt.datetime(2026, 3, 14, 15, 9, 26)
    make_account(database, "owner@example.com", password="correct horse")
    with database.session() as s:
        owner, _ = auth.log_in(s, "owner@example.com", "correct horse", address="10.7.1.1", now=now)
        cookie = devices.remember(owner, None)
        assert devices.device_id(owner, cookie) and devices.remember(owner, cookie) == cookie
        for junk in ("", "x", "1.é.x", cookie + "x", cookie.replace(".", "~"), "~".join([cookie] * 99)):
            assert devices.device_id(owner, junk) is None, junk
        for i in range(29):
            with pytest.raises(auth.Refused):
                auth.log_in(s, "owner@example.com", "wrong", address=f"10.7.0.{i // 10}", now=now)
        with pytest.raises(auth.Refused) as refused:  # 10.7.0.0 and .1 are locked; .2 has 9 failures
            auth.log_in(s, "owner@example.com", "wrong", address="10.7.0.0", now=now)
        assert refused.value.status == 429
        auth.log_in(s, "owner@example.com", "correct horse", address="10.7.0.9", now=now)  # not locked yet
        with pytest.raises(auth.Refused):
            auth.log_in(s, "owner@example.com", "wrong", address="10.7.0.2", now=now)  # the 30th
        with pytest.raises(auth.Refused) as refused:
            auth.log_in(s, "owner@example.com", "correct horse", address="10.7.0.9", now=now)
        assert refused.value.status == 429 and refused.value.retry_after == 900
        assert "for this email or from your network" in refused.value.message
        # The known device gets in, even from a locked address; its own failures are what hold it back.
        auth.log_in(s, "owner@example.com", "correct horse", address="10.7.0.0", now=now, known=cookie)
        for _ in range(10):
            with pytest.raises(auth.Refused):
                auth.log_in(s, "owner@example.com", "wrong", address="10.7.1.1", now=now, known=cookie)
        with pytest.raises(auth.Refused) as refused:
            auth.log_in(s, "owner@example.com", "correct horse", address="10.7.1.1", now=now, known=cookie)
        assert refused.value.status == 429 and "from this browser" in refused.value.message
        # A window later everything is free again, and a success forgives that browser's failures only.
        later = now + throttle.WINDOW
        for _ in range(9):
            with pytest.raises(auth.Refused):
                auth.log_in(s, "owner@example.com", "wrong", address="10.7.1.1", now=later, known=cookie)
        auth.log_in(s, "owner@example.com", "correct horse", address="10.7.1.1", now=later, known=cookie)
        assert (
            throttle.retry_after(s, "owner@example.com", "10.7.1.1", later, device=devices.device_id(owner, cookie))
            is None
        )
        # The markers' rows cannot be reached by typing an email.
        assert throttle.email_key("#signup") != throttle.SIGNUP and not throttle.email_key("#device:x").startswith("#")
