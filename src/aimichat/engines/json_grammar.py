"""JSON schemas as llama.cpp grammars (GBNF), for structured output and tool-call arguments.

llama-cpp-python's ``SchemaConverter`` does the work, with two gaps closed here:

- integer bounds (``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``): it ignores them
  (a Pydantic ``Field(ge=0, le=50)`` came back as 1234567890 and failed the caller's own validation), so
  :class:`SchemaConverter` turns a bounded integer into the exact set of decimal strings in its range
  (:func:`integer_range`);
- strings: it lets a JSON string hold raw control characters, which JSON forbids
  (:func:`strict_json_strings`).

Bounds on non-integer numbers and ``multipleOf`` are not enforced by the grammar (docs/compatibility.md).
"""

from __future__ import annotations

from typing import Any

from llama_cpp import llama_grammar

MAX_DIGITS = 16  # the longest unbounded integer the grammar allows, as llama-cpp-python's own rule does
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def strict_json_strings(grammar: str) -> str:
    """``grammar`` with JSON strings that hold no raw control characters, as JSON requires.

    llama-cpp-python's converter lets a string hold any character but ``"`` and ``\\\\`` (a raw newline
    too, which ``json.loads`` refuses); llama.cpp's own converter excludes ``\\\\x00-\\\\x1F`` and ``\\\\x7F``.
    """
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def _digits(count: int) -> str:
    return "" if count == 0 else " [0-9]" if count == 1 else f" [0-9]{{{count}}}"


def _span(low: str, high: str) -> str:
    return f'"{low}"' if low == high else f"[{low}-{high}]"


def _between(low: int, high: int) -> list[str]:
    """GBNF sequences that match exactly the decimal forms of ``low``..``high`` (0 <= low <= high), no
    leading zeros: the range is cut where the digit count changes, then at the first differing digit."""
    if low > high:
        return []
    a, b = str(low), str(high)
    if len(a) < len(b):
        return _between(low, 10 ** len(a) - 1) + _between(10 ** len(a), high)
    i = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
    if i == len(a):
        return [f'"{a}"']
    prefix = f'"{a[:i]}" ' if i else ""
    tail = len(a) - i - 1
    if a[i + 1 :] == "0" * tail and b[i + 1 :] == "9" * tail:
        return [f"{prefix}{_span(a[i], b[i])}{_digits(tail)}".strip()]
    parts = _between(low, int(a[: i + 1] + "9" * tail))
    if int(a[i]) + 1 <= int(b[i]) - 1:
        parts.append(f"{prefix}{_span(str(int(a[i]) + 1), str(int(b[i]) - 1))}{_digits(tail)}".strip())
    return parts + _between(int(b[: i + 1] + "0" * tail), high)


def _at_least(low: int) -> list[str]:
    """Non-negative integers >= ``low``: up to MAX_DIGITS digits."""
    width = len(str(low))
    longer = [f"[1-9] [0-9]{{{width},{MAX_DIGITS - 1}}}"] if width < MAX_DIGITS else []
    return _between(low, 10**width - 1) + longer


def integer_range(low: int | None, high: int | None) -> str:
    """A GBNF expression for the integers from ``low`` to ``high`` (None: unbounded on that side)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer lies between {low} and {high}")
    negative: list[str] = []
    positive: list[str] = []
    if low is None or low < 0:  # negatives, written "-" then their magnitude
        top = None if low is None else -low  # the largest magnitude
        bottom = 1 if high is None or high >= 0 else -high
        magnitudes = _at_least(bottom) if top is None else _between(bottom, top)
        negative = [f'"-" ({" | ".join(magnitudes)})'] if magnitudes else []
    if high is None or high >= 0:
        start = 0 if low is None or low < 0 else low
        positive = _at_least(start) if high is None else _between(start, high)
    return "(" + " | ".join(negative + positive) + ")"


def _bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    import math

    low = high = None
    if isinstance(schema.get("minimum"), int | float):
        low = math.ceil(schema["minimum"])
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = max(low if low is not None else -(10**MAX_DIGITS), math.floor(schema["exclusiveMinimum"]) + 1)
    if isinstance(schema.get("maximum"), int | float):
        high = math.floor(schema["maximum"])
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = min(high if high is not None else 10**MAX_DIGITS, math.ceil(schema["exclusiveMaximum"]) - 1)
    return low, high


class SchemaConverter(llama_grammar.SchemaConverter):
    """llama-cpp-python's converter, with integer bounds honoured."""

    def visit(self, schema: Any, name: str) -> str:
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(k in schema for k in _BOUNDS):
            rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
            low, high = _bounds(schema)
            rule: str = self._add_rule(rule_name, f"{integer_range(low, high)} space")  # type: ignore[no-untyped-call]
            return rule
        visited: str = super().visit(schema, name)  # type: ignore[no-untyped-call]
        return visited


def new_converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF of the JSON texts valid for ``schema`` (as llama-cpp-python's ``json_schema_to_gbnf``)."""
    converter = new_converter()
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    grammar: str = converter.format_grammar()  # type: ignore[no-untyped-call]
    return strict_json_strings(grammar)
