"""Turning token bytes into client-safe text: UTF-8 reassembly and stop strings.

:class:`TextOutput` is what an engine that generates tokens itself uses; :class:`StopScanner` and
:class:`TokenText` are its two halves.
"""

from __future__ import annotations

import codecs

from .base import Delta


class StopScanner:
    """Passes text through, holding back only what could still become a stop string.

    ``push`` returns the text that is safe to show and whether a stop string was hit; the stop
    string itself and anything after it are never shown (OpenAI semantics).
    """

    def __init__(self, stops: tuple[str, ...] = ()):
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Take more text; returns (text safe to show, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        hit = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            out, self._pending = self._pending[:hit], ""
            return out, True
        keep = self._longest_stop_prefix_suffix()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """What is held back, once no more text will come (no stop string was hit)."""
        out, self._pending = self._pending, ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best


class TokenText:
    """Accumulates token bytes; yields text only once it is complete UTF-8."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        """The text completed by ``piece`` (an unfinished multi-byte character waits for its rest)."""
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """What is left at the end; an unfinished character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class TextOutput:
    """One generation's token pieces turned into the text its client may see.

    Feed it the bytes of each generated token, in order, with :meth:`push`; it returns a
    :class:`Delta` once some text is safe to show, or None while text is held back (an unfinished
    UTF-8 sequence, or what could still become a stop string). A Delta's ``tokens`` counts every
    token pushed since the previous Delta, so a caller cut off mid-stream pays for what it received.

    Once :attr:`hit_stop` is set the generation must end: the stop string and everything after it are
    never shown (OpenAI semantics). When the generation ends, :meth:`tail` gives what is still held
    back, if anything. :attr:`generated` counts every token pushed: the completion tokens of usage.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self._text = TokenText()
        self._stops = StopScanner(stop)
        self._unsent = 0  # tokens whose text has not gone out in a Delta yet
        self.generated = 0
        self.hit_stop = False

    def push(self, piece: bytes) -> Delta | None:
        """Take one token's bytes; the text now safe to show, or None."""
        self.generated += 1
        self._unsent += 1
        out, self.hit_stop = self._stops.push(self._text.push(piece))
        if not out:
            return None
        delta, self._unsent = Delta(out, self._unsent), 0
        return delta

    def tail(self) -> Delta | None:
        """Text held back (partial UTF-8, a possible stop-string prefix) once generation ends."""
        if self.hit_stop:  # the stop string and everything after it are never shown
            return None
        tail = self._stops.push(self._text.flush())[0] + self._stops.flush()
        return Delta(tail, self._unsent) if tail else None
