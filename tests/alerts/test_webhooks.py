"""Webhook endpoints: Standard Webhooks signatures, the page that adds one (secret shown once) and sends a
test event, retries with backoff after the receiver fails, and the URLs refused (SSRF)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import time

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select
from webhook_receiver import Dripping, Receiver

from aimichat.alerts import delivery, signing, urls
from aimichat.alerts import service as alerts
from aimichat.alerts.delivery import MAX_ATTEMPTS, backoff
from aimichat.alerts.watch import AlertWorker
from aimichat.config import Settings
from aimichat.mail.mailer import SmtpConfig, SmtpMailer
from aimichat.store.clock import utcnow
from aimichat.store.models import AlertDelivery
from conftest import LiveServer, app_client, make_account, make_key, migrated
from scripted_engine import ScriptedEngine
from web.web_helpers import Browser


def test_the_signature_is_standard_webhooks():
    # The example of the Standard Webhooks specification (and of its reference libraries' tests).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, timestamp, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signing.sign(secret, msg_id, timestamp, body) == expected
    assert signing.verify(secret, msg_id, str(timestamp), body, f"v1,bogus {expected}")
    assert not signing.verify(secret, msg_id, str(timestamp), body + " ", expected)
    assert not signing.verify(signing.new_secret(), msg_id, str(timestamp), body, expected)
    new = signing.new_secret()
    assert new.startswith("whsec_") and new != signing.new_secret()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "https://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data",  # a cloud metadata service
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "ftp://example.com/hook",
        "https://user:pass@example.com/hook",
        "not a url",
        "",
    ],
)
def test_urls_into_the_servers_own_network_are_refused(url):
    with pytest.raises(urls.BadWebhookUrl):
        urls.check_url(url, allow_private=False)


def test_a_public_address_is_accepted_and_the_setting_allows_private_ones():
    assert urls.is_public("93.184.216.34") and not urls.is_public("192.168.1.1")
    assert urls.check_url(" http://127.0.0.1:9/hook ", allow_private=True) == "http://127.0.0.1:9/hook"


def test_the_page_adds_an_endpoint_shows_its_secret_once_and_sends_a_signed_test_event(database, tmp_path):
    receiver = Receiver()
    with (
        LiveServer(receiver.app) as hook,
        app_client(ScriptedEngine(), database, tmp_path, webhook_allow_private=True) as server,
        Browser(server) as browser,
    ):
        browser.sign_up("hooks@example.com")
        page = browser.get("/webhooks")
        assert page.status_code == 200 and "No webhook endpoints yet" in page.text
        forged = browser.post("/webhooks", {"url": hook.url + "/hook", "csrf_token": "forged"})
        assert forged.status_code == 403
        added = browser.post("/webhooks", {"url": hook.url + "/hook"})
        assert added.status_code == 200
        receiver.secret = added.text.split('<code class="secret">')[1].split("</code>")[0]
        assert receiver.secret.startswith("whsec_")
        assert receiver.secret not in browser.get("/webhooks").text  # shown once
        with database.session() as s:
            endpoint_id = alerts.list_endpoints(s, 1)[0].id

        sent = browser.post(f"/webhooks/{endpoint_id}/test")
        assert sent.status_code == 303
        delivered = receiver.wait(1, timeout=5)[0]
        assert delivered.valid and delivered.headers["webhook-id"].startswith("msg_")
        assert abs(int(delivered.headers["webhook-timestamp"]) - time.time()) < 30
        assert json.loads(delivered.body)["type"] == "test"
        deadline = time.monotonic() + 5
        while 'data-status="sent"' not in (listing := browser.get("/webhooks").text):
            assert time.monotonic() < deadline, listing
            time.sleep(0.05)
        assert "<code>test</code>" in listing


def test_the_page_refuses_a_private_address_by_default(server):
    with Browser(server) as browser:
        browser.sign_up("ssrf@example.com")
        browser.get("/webhooks")
        refused = browser.post("/webhooks", {"url": "http://127.0.0.1:6379/"})
        assert refused.status_code == 400 and "loopback, private or reserved" in refused.text
        unknown = browser.post("/webhooks", {"url": "http://example.invalid./hook"})
        assert unknown.status_code == 400 and "could not be resolved" in unknown.text
        with server.db.session() as s:
            assert alerts.list_endpoints(s, 1) == []


def test_a_failed_delivery_is_retried_with_backoff_and_recorded(database, tmp_path):
    """The receiver fails twice: the event arrives a third time, after pauses that grow 4-fold, with the
    same webhook-id; the failures' reason is recorded until it is sent."""
    receiver = Receiver()
    receiver.fail_next = 2
    base = 0.3
    with (
        LiveServer(receiver.app) as hook,
        app_client(
            ScriptedEngine(), database, tmp_path, webhook_allow_private=True, alert_retry_seconds=base
        ) as server,
    ):
        account = make_account(database, "retry@example.com")
        now = utcnow()
        with database.session() as s:
            receiver.secret = alerts.add_endpoint(s, account, hook.url + "/hook", now, allow_private=True).secret
            alerts.queue_event(s, account, alerts.test_event(now), now, email=False)
            s.commit()
        server.app.state.alerts.wake()
        first, second, third = receiver.wait(3, timeout=10)
        assert all(r.valid for r in (first, second, third))
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == third.headers["webhook-id"]
        assert first.body == third.body
        assert second.at - first.at >= base and third.at - second.at >= 4 * base
        deadline = time.monotonic() + 5
        while True:
            with database.session() as s:
                row = s.scalars(select(AlertDelivery)).one()
            if row.status == "sent" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (row.status, row.attempts, row.last_error) == ("sent", 3, None)
        time.sleep(2 * base)
        assert len(receiver.received) == 3  # sent: never again


def test_a_delivery_that_keeps_failing_is_given_up_after_the_last_attempt(database):
    account = make_account(database, "gone@example.com")
    now = utcnow()
    with database.session() as s:
        alerts.add_endpoint(s, account, "http://127.0.0.1:9/hook", now, allow_private=True)
        alerts.queue_event(s, account, alerts.test_event(now), now, email=False)
        s.commit()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            claimed = delivery.claim_due(s, now)
            assert len(claimed) == 1, attempt
            assert delivery.claim_due(s, now) == []  # claimed: nobody else may try it meanwhile
            assert delivery.record(s, claimed[0], "the receiver answered HTTP 503", now, 5.0)
            s.commit()
            row = s.scalars(select(AlertDelivery).execution_options(populate_existing=True)).one()
            if attempt < MAX_ATTEMPTS:
                assert row.status == "pending" and row.next_attempt_at == now + backoff(attempt, 5.0)
                now = row.next_attempt_at
        assert (row.status, row.attempts, row.last_error) == ("failed", MAX_ATTEMPTS, "the receiver answered HTTP 503")
        assert delivery.claim_due(s, now + backoff(MAX_ATTEMPTS, 5.0)) == []


# -- review of issue 16: slow receivers, claims, DNS rebinding, the test button -----------------------


def _wait_for_row(database, done, timeout: float = 5.0) -> AlertDelivery:
    deadline = time.monotonic() + timeout
    while True:
        with database.session() as s:
            row = s.scalars(select(AlertDelivery).order_by(AlertDelivery.id)).first()
        if row is not None and done(row):
            return row
        assert time.monotonic() < deadline, f"still {row.status if row else None}: {row.last_error if row else ''}"
        time.sleep(0.05)


def _queue_test_event(database, account: int, url: str) -> None:
    now = utcnow()
    with database.session() as s:
        alerts.add_endpoint(s, account, url, now, allow_private=True)
        alerts.queue_event(s, account, alerts.test_event(now), now, email=False)
        s.commit()


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline(tmp_path, sqlite_url):
    """httpx's timeout is per read: a byte every 0.1 s would keep the post open for ever without a total
    deadline on the attempt."""
    db = migrated(sqlite_url)
    with (
        Dripping(head=True) as hook,
        app_client(ScriptedEngine(), db, tmp_path, webhook_allow_private=True, webhook_timeout=0.5) as server,
    ):
        _queue_test_event(db, make_account(db, "drip@example.com"), hook.url)
        started = time.monotonic()
        server.app.state.alerts.wake()
        row = _wait_for_row(db, lambda r: r.last_error is not None, timeout=3)
        assert time.monotonic() - started < 2
        assert (row.status, row.attempts, row.last_error) == ("pending", 1, "no answer within 0.5 s")
        assert row.claimed_until is None and hook.connections == 1
    db.dispose()


def test_an_endless_answer_body_is_not_read(tmp_path, sqlite_url):
    """The status line is the answer: a 200 followed by a body that never ends is a delivery, at once."""
    db = migrated(sqlite_url)
    with (
        Dripping(head=False) as hook,
        app_client(ScriptedEngine(), db, tmp_path, webhook_allow_private=True, webhook_timeout=3) as server,
    ):
        _queue_test_event(db, make_account(db, "endless@example.com"), hook.url)
        server.app.state.alerts.wake()
        row = _wait_for_row(db, lambda r: r.status != "pending", timeout=2)
        assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    db.dispose()


def test_a_slow_receiver_does_not_hold_back_other_alerts(tmp_path, sqlite_url):
    """One account's receiver takes its whole deadline; meanwhile another account crosses a threshold and its
    alert leaves at once: checks and other deliveries do not wait for the slow send."""
    db = migrated(sqlite_url)
    receiver = Receiver()
    with (
        Dripping(head=True) as slow,
        LiveServer(receiver.app) as hook,
        app_client(ScriptedEngine(), db, tmp_path, webhook_allow_private=True, webhook_timeout=10) as server,
    ):
        _queue_test_event(db, make_account(db, "slow@example.com"), slow.url)
        server.app.state.alerts.wake()
        deadline = time.monotonic() + 3
        while slow.sent == 0:  # the slow delivery is in flight
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fast = make_account(db, "fast@example.com", daily=10)
        key = make_key(db, "fast@example.com")
        with db.session() as s:
            receiver.secret = alerts.add_endpoint(s, fast, hook.url + "/hook", utcnow(), allow_private=True).secret
            s.commit()
        for _ in range(8):
            assert (
                server.chat({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, key).status_code == 200
            )
        crossed = time.monotonic()
        event = json.loads(receiver.wait(1, timeout=5)[0].body)
        assert time.monotonic() - crossed < 2
        assert event["data"]["threshold_percent"] == 80 and slow.connections == 1
    db.dispose()


def test_a_mail_server_that_never_answers_is_cut_off_at_the_deadline():
    """aiosmtplib's timeout is per step (up to 300 s here): the attempt's own deadline bounds the whole send."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts the connection, never greets
        port = silent.getsockname()[1]
        mailer = SmtpMailer(SmtpConfig.from_url(f"smtp://127.0.0.1:{port}?timeout=300"), "AimiChat <a@example.com>")
        mail = json.dumps({"subject": "s", "text": "t"})
        claimed = delivery.Claimed(1, "email", "msg_1", mail, None, None, "to@example.com", 1, utcnow())

        async def attempt() -> tuple[str | None, float]:
            started = time.monotonic()
            async with httpx.AsyncClient() as client:
                sent = delivery.send(claimed, client, mailer, timestamp=0, allow_private=False, deadline=0.5)
                error = await asyncio.wait_for(sent, 5)
            return error, time.monotonic() - started

        error, took = asyncio.run(attempt())
    assert error == "no answer within 0.5 s" and took < 2


def test_a_claim_outlasts_the_longest_attempt():
    """A claim must not lapse while its replica may still be sending, or another replica sends it too."""
    assert delivery.LEASE.total_seconds() > delivery.MAIL_DEADLINE
    longest = Settings(webhook_timeout=delivery.MAX_DEADLINE).webhook_timeout
    assert longest < delivery.LEASE.total_seconds()
    with pytest.raises(ValidationError):
        Settings(webhook_timeout=delivery.MAX_DEADLINE + 0.5)


def test_an_outcome_is_written_only_while_this_replicas_claim_holds(database):
    """A replica whose claim lapsed (a slow send) and was taken by another must not overwrite that one's
    claim and outcome."""
    account = make_account(database, "late@example.com")
    now = utcnow()
    with database.session() as s:
        alerts.add_endpoint(s, account, "http://127.0.0.1:9/hook", now, allow_private=True)
        alerts.queue_event(s, account, alerts.test_event(now), now, email=False)
        s.commit()
        (late,) = delivery.claim_due(s, now)
        s.commit()
        later = now + delivery.LEASE + dt.timedelta(seconds=1)
        (other,) = delivery.claim_due(s, later)  # the claim lapsed: another replica takes it
        s.commit()
        assert other.attempt == 2 and other.claimed_until > late.claimed_until
        assert not delivery.record(s, late, "no answer within 5 s", later, 5.0)
        s.commit()
        row = s.scalars(select(AlertDelivery)).one()
        assert (row.status, row.claimed_until, row.last_error) == ("pending", other.claimed_until, None)
        assert delivery.record(s, other, None, later, 5.0)
        assert not delivery.record(s, other, "twice", later, 5.0)  # once recorded, the claim is spent
        s.commit()
        s.expire_all()
        row = s.scalars(select(AlertDelivery)).one()
        assert (row.status, row.attempts, row.claimed_until, row.last_error) == ("sent", 2, None, None)


def _resolving(monkeypatch, host: str, *answers: str) -> list[str]:
    """Make ``host`` resolve to ``answers[0]``, then ``answers[1]`` ... (the last one for ever after), as a
    DNS server under an attacker's control would; other names resolve as usual. Returns the lookups made."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(name, port, *args, **kwargs):
        if name != host:
            return real(name, port, *args, **kwargs)
        address = answers[min(len(asked), len(answers) - 1)]
        asked.append(address)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, port or 0, 0, 0) if family == socket.AF_INET6 else (address, port or 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_name_that_resolves_to_a_loopback_address_is_refused(monkeypatch):
    _resolving(monkeypatch, "inside.example", "127.0.0.1")
    with pytest.raises(urls.BadWebhookUrl, match="loopback, private or reserved"):
        urls.check_url("https://inside.example/hook", allow_private=False)
    assert urls.check_url("https://inside.example/hook", allow_private=True) == "https://inside.example/hook"
    claimed = delivery.Claimed(
        1, "webhook", "msg_1", "{}", "https://inside.example/hook", "whsec_AAAA", "", 1, utcnow()
    )

    async def attempt() -> str | None:
        async with httpx.AsyncClient() as client:
            return await delivery.send(claimed, client, None, timestamp=0, allow_private=False, deadline=2)

    assert "loopback, private or reserved" in (asyncio.run(attempt()) or "")


def test_the_delivery_connects_to_the_address_that_was_checked(monkeypatch):
    """DNS rebinding: the name answers a public address to the check, then an internal one. The post goes to
    the address checked (one lookup), carrying the name in Host. Here 127.0.0.1 plays the public address,
    where the receiver listens, and 127.0.0.2 the internal one."""
    asked = _resolving(monkeypatch, "rebind.example", "127.0.0.1", "127.0.0.2")
    monkeypatch.setattr(urls, "is_public", lambda address: address == "127.0.0.1")
    receiver = Receiver()
    with LiveServer(receiver.app) as hook:
        receiver.secret = signing.new_secret()
        url = f"http://rebind.example:{hook.port}/hook"
        claimed = delivery.Claimed(1, "webhook", "msg_1", "{}", url, receiver.secret, "", 1, utcnow())

        async def attempt() -> str | None:
            async with httpx.AsyncClient() as client:
                return await delivery.send(
                    claimed, client, None, timestamp=int(time.time()), allow_private=False, deadline=2
                )

        assert asyncio.run(attempt()) is None
        (received,) = receiver.received
    assert received.valid and asked == ["127.0.0.1"]
    assert received.host == f"rebind.example:{hook.port}"


def test_an_https_delivery_pins_the_address_and_keeps_the_name_for_tls(monkeypatch):
    _resolving(monkeypatch, "hooks.example", "93.184.216.34")
    _resolving(monkeypatch, "v6.example", "2606:4700:4700::1111")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async def attempt(url: str) -> str | None:
        claimed = delivery.Claimed(1, "webhook", "msg_1", "{}", url, signing.new_secret(), "", 1, utcnow())
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await delivery.send(claimed, client, None, timestamp=0, allow_private=False, deadline=2)

    assert asyncio.run(attempt("https://hooks.example/a?b=c")) is None
    assert asyncio.run(attempt("https://v6.example:8443/hook")) is None
    first, second = seen
    assert str(first.url) == "https://93.184.216.34/a?b=c" and first.headers["host"] == "hooks.example"
    assert first.extensions["sni_hostname"] == "hooks.example"
    assert str(second.url) == "https://[2606:4700:4700::1111]:8443/hook"
    assert second.headers["host"] == "v6.example:8443" and second.extensions["sni_hostname"] == "v6.example"


def test_the_test_button_is_throttled_per_account(tmp_path, sqlite_url):
    db = migrated(sqlite_url)
    with (
        app_client(ScriptedEngine(), db, tmp_path, webhook_allow_private=True) as server,
        Browser(server) as browser,
    ):
        browser.sign_up("button@example.com")
        browser.get("/webhooks")
        assert browser.post("/webhooks", {"url": "http://127.0.0.1:9/hook"}).status_code == 200
        with db.session() as s:
            endpoint_id = alerts.list_endpoints(s, 1)[0].id
        answers = [browser.post(f"/webhooks/{endpoint_id}/test").status_code for _ in range(alerts.TESTS_PER_MINUTE)]
        assert answers == [303] * alerts.TESTS_PER_MINUTE
        refused = browser.post(f"/webhooks/{endpoint_id}/test")
        assert refused.status_code == 429 and "Too many test events" in refused.text
        with db.session() as s:
            assert len(s.scalars(select(AlertDelivery)).all()) == alerts.TESTS_PER_MINUTE
    db.dispose()


def test_the_worker_stops_even_when_woken_as_it_is_told_to_stop(sqlite_url):
    """A wake that lands just before close() must not swallow the cancellation (Python 3.11's wait_for
    did, and the app's shutdown then waited for the worker for ever)."""
    db = migrated(sqlite_url)

    async def woken_then_closed() -> None:
        worker = AlertWorker(db, utcnow, lambda: None)
        await worker.start()
        await asyncio.sleep(0.05)  # the worker waits for a wake
        worker.wake()
        await asyncio.sleep(0)  # the wake is delivered; close() comes in the same turn of the loop
        started = time.monotonic()
        # (Cancelled at the deadline, close() would cancel the worker again and return: the time tells.)
        await asyncio.wait_for(worker.close(), 3)
        assert time.monotonic() - started < 1

    asyncio.run(woken_then_closed())
    db.dispose()
