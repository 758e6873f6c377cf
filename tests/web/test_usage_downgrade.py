"""After a plan change lowers the allowance, "6 of 5 credits used" on /usage says why (issue 17)."""

from __future__ import annotations

from web_helpers import PASSWORD, Browser, chat

from aimichat.accounts import service as accounts
from conftest import app_client, make_account, make_key
from scripted_engine import ScriptedEngine


def test_more_used_than_the_new_plan_allows_is_explained(database, tmp_path) -> None:
    make_account(database, "down@example.com", daily=10, monthly=100, password=PASSWORD)
    key = make_key(database, "down@example.com")
    with app_client(ScriptedEngine(), database, tmp_path) as server:
        b = Browser(server)
        assert b.log_in("down@example.com").status_code == 303
        for _ in range(6):
            assert chat(server, key).status_code == 200
        assert "more than your plan" not in b.get("/usage").text  # 6 of 10: nothing to explain
        with database.session() as s:
            accounts.set_tier(s, "small", daily_credits=5, monthly_credits=4)
            accounts.set_account_tier(s, "down@example.com", "small")
            s.commit()
        page = b.get("/usage").text
        assert '6</span> <span class="of">of 5 credits used' in page
        assert "You used more than your plan's 5 today" in page
        assert "You used more than your plan's 4 this month" in page
        assert chat(server, key).status_code == 429  # and nothing more is charged
