"""The operator's support contact (``AIMICHAT_SUPPORT_CONTACT``) as a link the pages show: on the plan, the
docs and every error page, so a person stuck somewhere knows whom to ask."""

from __future__ import annotations

from dataclasses import dataclass

from aimichat.config import Settings


@dataclass(frozen=True)
class Contact:
    href: str  # mailto: for an email address, else the URL as given (config.py admits only http(s) ones)
    text: str


def contact(settings: Settings) -> Contact | None:
    """The support link, or None when the operator set none."""
    value = settings.support_contact
    if not value:
        return None
    if value.lower().startswith(("http://", "https://")):
        return Contact(value, value)
    return Contact(f"mailto:{value}", value)
