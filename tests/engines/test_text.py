"""Token bytes to client text: stop strings held back only while they may still match, UTF-8 made whole."""

from __future__ import annotations

import pytest

from aimichat.engines.base import Delta
from aimichat.engines.text import StopScanner, TextOutput


@pytest.mark.parametrize(
    "pieces, stops, shown, stopped",
    [
        (["Hello", " wor", "ld"], (), "Hello world", False),
        (["Hel", "lo ST", "OP there"], ("STOP",), "Hello ", True),
        (["abc S", "T", "x"], ("STOP",), "abc STx", False),
        (["one\n\n", "two"], ("\n\n", "zz"), "one", True),
    ],
)
def test_stop_scanner_holds_back_only_possible_stop_prefixes(
    pieces: list[str], stops: tuple[str, ...], shown: str, stopped: bool
) -> None:
    scanner, out, hit = StopScanner(stops), "", False
    for piece in pieces:
        text, hit = scanner.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += scanner.flush()
    assert (out, hit) == (shown, stopped)


def test_a_character_split_across_tokens_goes_out_whole_carrying_both_tokens() -> None:
    output = TextOutput()
    e_acute = "é".encode()
    assert output.push(e_acute[:1]) is None
    assert output.push(e_acute[1:]) == Delta("é", 2)
    assert output.tail() is None and output.generated == 2


def test_a_stop_string_and_what_follows_are_never_shown() -> None:
    output = TextOutput(("STOP",))
    assert [output.push(piece) for piece in (b"Hel", b"lo ST", b"OP x")] == [Delta("Hel", 1), Delta("lo ", 1), None]
    assert output.hit_stop and output.tail() is None and output.generated == 3


def test_the_tail_carries_what_was_held_back_and_its_tokens() -> None:
    output = TextOutput(("STOP",))
    assert output.push(b"ok ST") == Delta("ok ", 1)  # "ST" may still become "STOP"
    assert output.push(b"\xe2\x82") is None  # the start of "€"
    assert output.tail() == Delta("ST\ufffd", 1)  # generation ended: the broken character shows as U+FFFD
    assert not output.hit_stop and output.generated == 2
