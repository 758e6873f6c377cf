"""The API key format: ``aimichat_`` + 32 random base62 characters + 6-character base62 CRC32 checksum.

This follows GitHub's token design: the prefix lets secret scanners recognise our keys, and the
checksum lets us refuse a mistyped or made-up key without touching the database. Keys carry ~190
bits of randomness, so a plain SHA-256 is the right storage hash (a slow password hash would only
cost latency on every request).
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

PREFIX = "aimichat_"
ALPHABET = string.digits + string.ascii_letters  # base62
RANDOM_LEN = 32
CHECKSUM_LEN = 6
KEY_LEN = len(PREFIX) + RANDOM_LEN + CHECKSUM_LEN
DISPLAY_LEN = len(PREFIX) + 4  # "aimichat_AbCd", what lists show


def generate_key() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LEN))
    return PREFIX + body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Format and checksum check; needs no database."""
    if len(key) != KEY_LEN or not key.startswith(PREFIX):
        return False
    body, check = key[len(PREFIX) : -CHECKSUM_LEN], key[-CHECKSUM_LEN:]
    if any(c not in ALPHABET for c in body):
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so a 500, for a key whose
    # checksum part holds one).
    return secrets.compare_digest(check.encode("utf-8"), _checksum(body).encode("utf-8"))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_LEN]


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(CHECKSUM_LEN):
        value, rem = divmod(value, 62)
        digits.append(ALPHABET[rem])
    return "".join(reversed(digits))
