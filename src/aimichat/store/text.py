"""Text a person typed, before it reaches a query: which characters no name, email or search may hold.

PostgreSQL's text types cannot hold NUL at all (psycopg refuses such a parameter with ``DataError`` before
it is sent), while SQLite keeps it: the same input would be stored on one and a 500 on the other. The other
C0 control characters (and DEL) are stored by both, but are never part of a name or an address and show as
nothing, so a name holding one could pass for another. Each service refuses them where its text comes in;
``api.handlers`` answers any NUL that still reaches PostgreSQL with a 400 (:func:`holds_nul`).
"""

from __future__ import annotations

from collections.abc import Mapping

CONTROL = frozenset(map(chr, range(0x20))) | {"\x7f"}
LINE_BREAKS = "\t\n\r"  # where text of several lines is legitimate (a system prompt), pass these as ``allowed``


def control_character(text: str, allowed: str = "") -> str | None:
    """The first control character of ``text`` that is not in ``allowed``, or None."""
    return next((char for char in text if char in CONTROL and char not in allowed), None)


def char_name(char: str) -> str:
    """A control character as a message names it: "NUL", else its code point ("U+001B")."""
    return "NUL" if char == "\x00" else f"U+{ord(char):04X}"


def control_refusal(text: str, what: str, allowed: str = "") -> str | None:
    """What to tell the person when ``text`` holds a control character (``what``: "Key names"), or None."""
    char = control_character(text, allowed)
    if char is None:
        return None
    return f"{what} cannot contain control characters (this one has {char_name(char)})"


def holds_nul(value: object) -> bool:
    """Whether a statement's parameters (a mapping, a sequence of them, or one value) hold a NUL anywhere."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(holds_nul(item) for item in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(holds_nul(item) for item in value)
    return False
