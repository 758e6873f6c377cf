"""Admin pages (accounts flagged ``is_admin``): find accounts (email search, a page at a time) with their use
today, an account's own page (its keys, revoke one; a new password or a reset mail; the admin right; tier;
disable, after a confirmation step that says what stops), and the tiers (edited with the function behind
``aimichat tiers set``).

Every change goes through the services the CLI and the admin API call (``accounts``, ``keys``,
``email_flows``); they write the audit log themselves, as the visitor (``admin_audit.WebActor``). A refused
change rolls the request's transaction back before its page is shown, so nothing of it is kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, BackgroundTasks, Form, Path, Query, Request
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.accounts import service as accounts
from aimichat.api.admin.protocol import TierSave
from aimichat.audit import service as audit
from aimichat.keys import service as keys
from aimichat.mail import links
from aimichat.quota import ledger, periods
from aimichat.store.models import Account, ApiKey, Tier, UsageEvent
from aimichat.store.text import control_refusal

from . import email_flows, sessions
from .deps import Admin, AdminForm, PostedForm, RequestSession, Visitor, WebError, client_address
from .key_actions import in_list_order
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]
LARGEST = 2**31 - 1  # the columns are 32-bit integers on PostgreSQL
PER_PAGE = 50
PAGE_SIZES = (25, 50, 100, accounts.MAX_PER_PAGE)
MAX_QUERY = 320  # no email is longer


# -- the accounts list: search and pages -----------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """What the accounts list shows: the accounts whose email contains ``q``, page ``page`` of ``per_page``."""

    q: str = ""
    page: int = 1
    per_page: int = PER_PAGE

    def url(self, page: int | None = None) -> str:
        """The list's address with these settings (the defaults left out), at ``page`` if given."""
        params: list[tuple[str, str | int]] = [("q", self.q)] if self.q else []
        number = self.page if page is None else page
        if number != 1:
            params.append(("page", number))
        if self.per_page != PER_PAGE:
            params.append(("per_page", self.per_page))
        return "/admin" + (f"?{urlencode(params)}" if params else "")


def read_listing(q: str, page: str, per_page: str) -> Listing:
    """The list's query as typed into the address bar; ValueError, with what to fix, for a bad one."""
    q = q.strip()
    if len(q) > MAX_QUERY:
        raise ValueError(f"Search for at most {MAX_QUERY} characters: no email is longer.")
    if (refused := control_refusal(q, "A search")) is not None:  # no email holds one (and NUL: a 500 on PostgreSQL)
        raise ValueError(refused + ".")
    return Listing(q, _count(page, "page", 1, LARGEST), _count(per_page, "per_page", PER_PAGE, accounts.MAX_PER_PAGE))


def _count(text: str, name: str, default: int, largest: int) -> int:
    text = text.strip()
    if not text:
        return default
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= largest:
        raise ValueError(f"{name} must be a whole number from 1 to {largest:,}.")
    return int(text)


@dataclass(frozen=True)
class AccountRow:
    """One account of the list, with its active keys and the credits it used today (the ledger's)."""

    account: Account
    live_keys: int
    used_today: int

    @property
    def daily_limit(self) -> int:
        return self.account.tier.daily_credits


def account_rows(session: Session, found: Sequence[Account], today: dt.date) -> list[AccountRow]:
    """The rows of a page of accounts: two grouped queries for the whole page, not two per account."""
    ids = [a.id for a in found]
    if not ids:
        return []
    live = session.execute(
        select(ApiKey.account_id, func.count(ApiKey.id))
        .where(ApiKey.account_id.in_(ids), ApiKey.revoked_at.is_(None))
        .group_by(ApiKey.account_id)
    )
    key_counts = {account_id: int(count) for account_id, count in live}
    used = credits_today(session, ids, today)
    return [AccountRow(a, key_counts.get(a.id, 0), used.get(a.id, 0)) for a in found]


def credits_today(session: Session, account_ids: Sequence[int], day: dt.date) -> dict[int, int]:
    """Credits each account's ledger counts on ``day`` (``ledger.ledger_sum`` for many accounts at once)."""
    rows = session.execute(
        select(UsageEvent.account_id, func.coalesce(func.sum(UsageEvent.credits), 0))
        .where(UsageEvent.account_id.in_(account_ids), UsageEvent.day == day)
        .group_by(UsageEvent.account_id)
    )
    return {account_id: int(total) for account_id, total in rows}


@router.get("/admin")
def admin_page(
    request: Request,
    session: RequestSession,
    visitor: Admin,
    q: str = "",
    page_number: Annotated[str, Query(alias="page")] = "",
    per_page: str = "",
    updated: str = "",
    tier_saved: str = "",
) -> Response:
    try:
        listing = read_listing(q, page_number, per_page)
    except ValueError as exc:
        raise WebError(400, "Bad search", str(exc)) from None
    found = accounts.search_accounts(session, listing.q, page=listing.page, per_page=listing.per_page)
    today = periods.day_start(request.app.state.clock())
    return page(
        request,
        visitor,
        "admin.html",
        title="Admin",
        listing=listing,
        found=found,
        rows=account_rows(session, found.accounts, today),
        last_page=max(1, -(-found.total // found.per_page)),
        page_sizes=sorted({*PAGE_SIZES, listing.per_page}),  # a size typed into the address stays chosen
        tiers=accounts.list_tiers(session),
        tier_limits=tier_limits,
        updated=_account_or_none(session, updated),
        tier_saved=tier_saved,
    )


def _account_or_none(session: Session, text: str) -> Account | None:
    """The account of the "Updated …" note (``?updated=ID``); a bad id is no note, not an error."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= LARGEST:
        return None
    return session.get(Account, int(text))


# -- where an account action goes back to ----------------------------------------------------------

# What an account's page says after an action (``?done=``): fixed texts, so a link cannot put words there.
NOTES = {
    "tier": "Moved to the tier {tier}.",
    "disabled": "Disabled: its keys stopped working and its browsers were logged out.",
    "enabled": "Enabled: its keys work again.",
    "admin_granted": "{email} is now an admin.",
    "admin_removed": "{email} is no longer an admin.",
    "password": "New password set: every browser logged in to {email} was logged out.",
    "reset_sent": "A password reset link is on its way to {email}: it works once, for 1 hour.",
    "revoked": "Key revoked: programs using it now get 401.",
}


def return_url(back: str, account_id: int, done: str | None = None) -> str:
    """Where an action on an account goes back to: the account's own page when it came from there (with the
    ``done`` note), else the accounts list as it was, its search and page kept (with the "Updated" note).
    Never anywhere else, whatever ``back`` says. Without ``done``: the same place, without a note (Cancel)."""
    parts = urlsplit(back)
    if not parts.scheme and not parts.netloc and parts.path == f"/admin/accounts/{account_id}":
        return parts.path + (f"?{urlencode({'done': done})}" if done else "")
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k in ("q", "page", "per_page")]
    if done:
        kept.append(("updated", str(account_id)))
    return "/admin" + (f"?{urlencode(kept)}" if kept else "")


def _account(session: Session, account_id: int) -> Account:
    try:
        return accounts.get_account_by_id(session, account_id)
    except accounts.UnknownAccount:
        raise WebError(404, "Account not found", "There is no account with that id.") from None


def _not_yourself(visitor: Visitor, account: Account, message: str) -> None:
    if account.id == visitor.user.id:
        raise WebError(400, "Not allowed", message)


# -- an account's page -----------------------------------------------------------------------------


@router.get("/admin/accounts/{account_id}")
def account_page(
    request: Request, session: RequestSession, visitor: Admin, account_id: AccountId, done: str = ""
) -> Response:
    person = _account(session, account_id)
    note = NOTES[done].format(email=person.email, tier=person.tier.name) if done in NOTES else None
    return _account_view(request, session, visitor, person, note=note)


def _account_view(
    request: Request, session: Session, visitor: Visitor, person: Account, *, status: int = 200, **context: Any
) -> Response:
    """The account's page: what it is, its use today and this month (``ledger.summary``, what its own usage
    page shows), its keys with their use today, and the forms of every action."""
    state = request.app.state
    usage = ledger.summary(session, keys.principal_for(person), state.clock())
    per_key = {use["id"]: use["credits"] for use in usage.per_key_today}
    return page(
        request,
        visitor,
        "admin_account.html",
        status=status,
        title=person.email,
        person=person,
        usage=usage,
        keys=in_list_order(keys.list_keys(session, person.id)),
        per_key=per_key,
        tiers=accounts.list_tiers(session),
        mail_on=state.mailer.enabled,
        here=f"/admin/accounts/{person.id}",
        **context,
    )


def _refused_on_page(
    request: Request, session: Session, visitor: Visitor, account_id: int, status: int, **errors: str
) -> Response:
    """The account's page again with what was refused (the change rolled back first: nothing of it is kept)."""
    session.rollback()
    return _account_view(request, session, visitor, _account(session, account_id), status=status, **errors)


@router.post("/admin/accounts/{account_id}/tier")
def admin_set_tier(
    session: RequestSession, account_id: AccountId, visitor: AdminForm, tier: str = Form(""), back: str = Form("")
) -> Response:
    account = _account(session, account_id)
    if tier and (refused := tier_name_refusal(tier)) is not None:  # (none chosen: the service says which exist)
        raise WebError(400, "Unknown tier", refused)
    try:
        accounts.set_account_tier(session, account.email, tier)
    except accounts.AccountError as exc:
        raise WebError(400, "Unknown tier", str(exc)) from None
    return redirect(return_url(back, account_id, "tier"))


@router.post("/admin/accounts/{account_id}/disable")
def admin_disable(
    request: Request,
    session: RequestSession,
    account_id: AccountId,
    visitor: AdminForm,
    confirm: str = Form(""),
    back: str = Form(""),
) -> Response:
    account = _account(session, account_id)
    _not_yourself(visitor, account, "You cannot disable your own account: ask another admin, or use the command line.")
    if confirm != "yes":  # the step before: what disabling stops, said before it happens
        return _confirm_disable(request, session, visitor, account, back)
    accounts.set_disabled(session, account.email, True)
    sessions.end_all(session, account.id)  # its keys stop at once (authentication checks); so do its browsers
    return redirect(return_url(back, account_id, "disabled"))


def _confirm_disable(request: Request, session: Session, visitor: Visitor, account: Account, back: str) -> Response:
    live = session.scalar(
        select(func.count(ApiKey.id)).where(ApiKey.account_id == account.id, ApiKey.revoked_at.is_(None))
    )
    n = int(live or 0)
    return page(
        request,
        visitor,
        "admin_confirm.html",
        title="Disable account",
        heading=f"Disable {account.email}?",
        message=(
            f"This stops every key of this person at once: {n} active key{'' if n == 1 else 's'}, on every "
            "replica; programs using them get 403 from their next request."
        ),
        points=[
            "Every browser logged in to the account is logged out, and it cannot log in while disabled.",
            "Nothing is deleted: enabling the account again brings its keys back as they were.",
        ],
        action=f"/admin/accounts/{account.id}/disable",
        fields={"back": back},
        button="Disable account",
        cancel=return_url(back, account.id),
    )


@router.post("/admin/accounts/{account_id}/enable")
def admin_enable(session: RequestSession, account_id: AccountId, visitor: AdminForm, back: str = Form("")) -> Response:
    accounts.set_disabled(session, _account(session, account_id).email, False)
    return redirect(return_url(back, account_id, "enabled"))


@router.post("/admin/accounts/{account_id}/admin")
def admin_right(
    session: RequestSession, account_id: AccountId, visitor: AdminForm, grant: str = Form(""), back: str = Form("")
) -> Response:
    """Grant (``grant=yes``) or remove (``grant=no``) the admin right; nobody removes their own."""
    if grant not in ("yes", "no"):
        raise WebError(400, "Not changed", "Choose to grant the admin right or to remove it.")
    account = _account(session, account_id)
    if grant == "no":
        _not_yourself(
            visitor,
            account,
            "You cannot remove your own admin right: another admin must do it, so a server always keeps one.",
        )
    accounts.set_admin(session, account.email, grant == "yes")
    return redirect(return_url(back, account_id, "admin_granted" if grant == "yes" else "admin_removed"))


@router.post("/admin/accounts/{account_id}/password")
def admin_set_password(
    request: Request,
    session: RequestSession,
    account_id: AccountId,
    visitor: AdminForm,
    password: str = Form(""),
    password_again: str = Form(""),
) -> Response:
    """A new password chosen by the admin (``aimichat accounts set-password``): the sign-up's rules, and every
    browser of the account logged out."""
    account = _account(session, account_id)
    _not_yourself(visitor, account, "Change your own password on your Account page: it asks for your current one.")
    if password != password_again:
        return _refused_on_page(request, session, visitor, account_id, 400, again_error="The two passwords differ.")
    try:
        accounts.set_password(session, account.email, password)
    except accounts.AccountError as exc:
        return _refused_on_page(request, session, visitor, account_id, 400, password_error=_sentence(str(exc)))
    sessions.end_all(session, account.id)
    return redirect(return_url(f"/admin/accounts/{account_id}", account_id, "password"))


@router.post("/admin/accounts/{account_id}/reset-email")
def admin_reset_email(
    request: Request, session: RequestSession, account_id: AccountId, visitor: AdminForm, background: BackgroundTasks
) -> Response:
    """Mail the account a password reset link: the forgot-password form's letter and limits (at most
    ``links.MAX_SENDS`` an hour per account), sent after the response."""
    state = request.app.state
    account = _account(session, account_id)
    if not state.mailer.enabled:
        message = "Email is off (no AIMICHAT_SMTP_URL), so no link can be mailed: set a new password instead."
        return _refused_on_page(request, session, visitor, account_id, 409, mail_error=message)
    if account.disabled:
        message = "This account is disabled, so it gets no reset link: enable it first."
        return _refused_on_page(request, session, visitor, account_id, 409, mail_error=message)
    try:
        letter = email_flows.reset_letter(
            session,
            account.email,
            address=client_address(request),
            base=email_flows.link_base(state.settings),
            now=state.clock(),
            mail_on=True,
        )
    except email_flows.Throttled as exc:
        return _refused_on_page(request, session, visitor, account_id, 429, mail_error=exc.message)
    if letter is None:  # the account's own hourly limit: the forgot form drops such a mail silently
        message = f"{account.email} was mailed {links.MAX_SENDS} reset links in the last hour: try again later."
        return _refused_on_page(request, session, visitor, account_id, 429, mail_error=message)
    # The letter's service writes no audit row (the forgot form has no actor); an admin's mail is a change.
    audit.note(session, "account.reset_link_mailed", f"account:{account.id}", {"email": account.email})
    background.add_task(email_flows.deliver, state.mailer, letter)
    return redirect(return_url(f"/admin/accounts/{account_id}", account_id, "reset_sent"))


@router.post("/admin/accounts/{account_id}/keys/{key_id}/revoke")
def admin_revoke_key(
    request: Request,
    session: RequestSession,
    account_id: AccountId,
    key_id: KeyId,
    visitor: AdminForm,
    confirm: str = Form(""),
) -> Response:
    account = _account(session, account_id)
    try:
        key = keys.get_key(session, key_id, account.id)
    except keys.UnknownKey:
        raise WebError(404, "Key not found", "This account has no key with that id.") from None
    if confirm != "yes":  # without JavaScript, the confirmation is a page of its own
        return page(
            request,
            visitor,
            "admin_confirm.html",
            title="Revoke key",
            heading=f"Revoke the key “{key.name}” of {account.email}?",
            message=f"{key.prefix}…: programs using it stop working at once (401). This cannot be undone.",
            action=f"/admin/accounts/{account.id}/keys/{key.id}/revoke",
            fields={},
            button="Revoke",
            cancel=f"/admin/accounts/{account.id}",
        )
    keys.revoke_key(session, key.id, account.id)
    return redirect(return_url(f"/admin/accounts/{account_id}", account_id, "revoked"))


# -- tiers -----------------------------------------------------------------------------------------

NUMBER_FIELDS = ("daily_credits", "monthly_credits", "credits_per_1k_tokens", *accounts.TIER_LIMITS)
TIER_FIELDS = (*NUMBER_FIELDS, "cost_rule")


MAX_TIER_NAME = 64  # the column's length


def tier_name_refusal(name: str) -> str | None:
    """What is wrong with a tier name sent by a form or an address, or None: the name column holds at most
    ``MAX_TIER_NAME`` characters and no tier name holds a control character (PostgreSQL's text cannot hold
    NUL: looking one up would fail there, not say "no such tier")."""
    if not name:
        return "Give the tier a name."
    if len(name) > MAX_TIER_NAME:
        return f"At most {MAX_TIER_NAME} characters."
    refused = control_refusal(name, "Tier names")
    return None if refused is None else refused + "."


class TierFormError(ValueError):
    """Fields of the tier form that are not what ``aimichat tiers set`` takes: field name -> message."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))
        self.errors = errors


def tier_changes(values: Mapping[str, str], current: Tier | None) -> dict[str, Any]:
    """The tier form read as ``accounts.save_tier`` takes it: every field but the unchanged ones (for a new
    tier, every field filled in). A blank number removes that limit; ``credits_per_1k_tokens`` blank keeps
    what the tier has. The form is read by the admin API's body (``TierSave``), so a value out of range
    comes back with its field named; the rules themselves are the service's, checked when it saves."""
    data: dict[str, Any] = {}
    for field in NUMBER_FIELDS:
        text = values.get(field, "").strip()
        if text or field != "credits_per_1k_tokens":
            data[field] = text or None
    if values.get("cost_rule", "").strip():
        data["cost_rule"] = values["cost_rule"].strip()
    try:
        parsed = TierSave.model_validate(data, strict=False)  # strings from a form, as numbers
    except ValidationError as exc:
        raise TierFormError({str(e["loc"][0]): _field_message(e) for e in exc.errors()}) from None
    sent = parsed.model_dump(include=parsed.model_fields_set)
    if current is None:
        return {field: value for field, value in sent.items() if value is not None}
    return {field: value for field, value in sent.items() if getattr(current, field) != value}


def _field_message(error: ErrorDetails) -> str:
    context = error.get("ctx", {})
    match error["type"]:
        case "greater_than_equal":
            return f"Must be at least {context['ge']}."
        case "less_than_equal":
            return f"Must be at most {context['le']:,}."
        case "int_parsing" | "int_from_float" | "int_type":
            return "Enter a whole number, in digits."
        case "literal_error":
            return "Choose per request or per token."
    return _sentence(error["msg"])


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


# How the tiers table names each limit a tier sets.
LIMIT_PHRASES = {
    "rpm": "{:,} requests/min per key",
    "tpm": "{:,} tokens/min per key",
    "max_keys": "{:,} active keys",
    "max_concurrent": "{:,} requests at once",
    "max_prompt_tokens": "prompts up to {:,} tokens",
    "max_n": "n up to {:,}",
}


def tier_limits(tier: Tier) -> list[str]:
    """The limits ``tier`` sets, as the tiers table says them; the ones it leaves unset are not listed."""
    return [phrase.format(getattr(tier, f)) for f, phrase in LIMIT_PHRASES.items() if getattr(tier, f) is not None]


def _tier_values(tier: Tier | None) -> dict[str, str]:
    """A tier as its form's fields (blank: no such limit)."""
    if tier is None:
        return {"cost_rule": "per_request", "credits_per_1k_tokens": "1"}
    values = {field: "" if getattr(tier, field) is None else str(getattr(tier, field)) for field in NUMBER_FIELDS}
    return {**values, "cost_rule": tier.cost_rule, "name": tier.name}


def _tier_page(
    request: Request, visitor: Visitor, new: bool, values: Mapping[str, str], *, status: int = 200, **more: Any
) -> Response:
    title = "New tier" if new else f"Tier {values.get('name', '')}"
    return page(request, visitor, "admin_tier.html", status=status, title=title, new=new, values=values, **more)


@router.get("/admin/tiers/edit")
def tier_page(request: Request, session: RequestSession, visitor: Admin, name: str = "") -> Response:
    """A tier's form (``?name=``), or a new tier's (no name)."""
    if name and (refused := tier_name_refusal(name)) is not None:
        raise WebError(400, "Bad tier name", refused)
    tier = session.scalar(select(Tier).where(Tier.name == name)) if name else None
    if name and tier is None:
        raise WebError(404, "Tier not found", "There is no tier with that name.")
    return _tier_page(request, visitor, tier is None, _tier_values(tier))


@router.post("/admin/tiers")
def save_tier(request: Request, session: RequestSession, visitor: AdminForm, form: PostedForm) -> Response:
    """Create a tier (``new=1``) or change one: what ``aimichat tiers set`` does, with its function."""
    values = {field: value for field, value in form.items() if isinstance(value, str)}
    new = values.get("new") == "1"
    name = values.get("name", "").strip() if new else values.get("name", "")  # an edit sends the exact name
    refused = tier_name_refusal(name)
    if refused is not None and not new:  # an edit's name is a hidden field: there is no field to mark
        raise WebError(400, "Bad tier name", refused)
    tier = session.scalar(select(Tier).where(Tier.name == name)) if refused is None else None
    errors: dict[str, str] = {}
    if refused is not None:
        errors["name"] = refused
    elif new and tier is not None:
        errors["name"] = f"There is a tier called {name} already: edit it from the tiers list."
    elif not new and tier is None:
        raise WebError(404, "Tier not found", "There is no tier with that name.")
    try:
        changes = tier_changes(values, tier)
    except TierFormError as exc:
        errors = {**exc.errors, **errors}
    if errors:
        return _tier_page(request, visitor, new, values, status=400, errors=errors)
    if changes or new:
        try:
            accounts.save_tier(session, name, changes)
        except accounts.AccountError as exc:
            session.rollback()
            return _tier_page(request, visitor, new, values, status=400, error=_sentence(str(exc)))
    return redirect("/admin?" + urlencode({"tier_saved": name}) + "#tiers")
