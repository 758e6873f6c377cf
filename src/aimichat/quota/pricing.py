"""What a request costs: a :class:`Price` per (tier, model), and the arithmetic of reserving and charging.

A price is either a fixed number of credits per request, or separate prompt and completion prices in
credits per 1M tokens. A tier's own cost rule is a price too (:func:`tier_price`): ``per_request`` is
1 credit a request, ``per_token`` at ``k`` credits per 1k tokens is ``1000 k`` per 1M on both sides.

All arithmetic is exact (fractions, rounded up once at the end), so the charge of a request is its
price times its usage, never off by a float's rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

MILLION = 1_000_000


@dataclass(frozen=True)
class Cost:
    """What to reserve: ``want`` if it fits, else as much as is left down to ``minimum``.

    ``prompt_tokens`` (the prompt as reserved for) is written on the reservation's ledger row, so a
    reservation that is never settled can be charged for its prompt (see :mod:`aimichat.quota.sweeper`)."""

    want: int
    minimum: int
    prompt_tokens: int = field(default=0, compare=False)  # what the cost was worked out for, not part of it


@dataclass(frozen=True)
class Price:
    per_request: int | None = None  # credits a request; None: priced by tokens
    prompt_per_1m: Fraction = Fraction(0)  # credits per 1M prompt tokens
    completion_per_1m: Fraction = Fraction(0)  # credits per 1M completion tokens

    @classmethod
    def per_token(cls, prompt_per_1m: float | str | Fraction, completion_per_1m: float | str | Fraction) -> Price:
        """Token prices as given (a float is read as its shortest decimal: 0.1 is one tenth)."""
        return cls(None, _fraction(prompt_per_1m), _fraction(completion_per_1m))

    @property
    def by_tokens(self) -> bool:
        return self.per_request is None

    def as_json(self) -> dict[str, float | int]:
        if self.per_request is not None:
            return {"per_request": self.per_request}
        return {"prompt_per_1m": _number(self.prompt_per_1m), "completion_per_1m": _number(self.completion_per_1m)}

    def describe(self) -> str:
        if self.per_request is not None:
            return f"{self.per_request} credit{'s' if self.per_request != 1 else ''} per request"
        return (
            f"{_number(self.prompt_per_1m):g} credits per 1M prompt tokens, "
            f"{_number(self.completion_per_1m):g} per 1M completion tokens"
        )


def _fraction(value: float | str | Fraction) -> Fraction:
    result = value if isinstance(value, Fraction) else Fraction(str(value))
    if result < 0:
        raise ValueError("prices cannot be negative")
    return result


def _number(value: Fraction) -> float | int:
    return int(value) if value.denominator == 1 else float(value)


def tier_price(cost_rule: str, credits_per_1k_tokens: int) -> Price:
    """A tier's own cost rule as a price: what applies to a model the tier has no price for."""
    if cost_rule == "per_token":
        per_1m = Fraction(credits_per_1k_tokens * 1000)
        return Price(None, per_1m, per_1m)
    return Price(per_request=1)


def charge(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """The credits ``prompt_tokens`` + ``completion_tokens`` cost at ``price``, rounded up."""
    if price.per_request is not None:
        return price.per_request
    exact = (prompt_tokens * price.prompt_per_1m + completion_tokens * price.completion_per_1m) / MILLION
    return math.ceil(exact)


def request_cost(price: Price, prompt_tokens: int, max_tokens: int) -> Cost:
    """Reserve for the whole completion budget; at least the prompt and one completion token."""
    if price.per_request is not None:
        return Cost(price.per_request, price.per_request, prompt_tokens)
    return Cost(charge(price, prompt_tokens, max_tokens), charge(price, prompt_tokens, 1), prompt_tokens)


def affordable_completion(price: Price, credits: int, prompt_tokens: int) -> int | None:
    """How many completion tokens ``credits`` pay for after the prompt; None when tokens cost nothing."""
    if price.per_request is not None or price.completion_per_1m == 0:
        return None
    left = credits * MILLION - prompt_tokens * price.prompt_per_1m
    return max(0, math.floor(left / price.completion_per_1m))


def final_charge(price: Price, reserved: int, prompt_tokens: int, completion_tokens: int) -> int:
    """What a settled request pays: its price times its usage, never more than was reserved."""
    return min(reserved, charge(price, prompt_tokens, completion_tokens))
