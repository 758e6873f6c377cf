"""engines/tools.py without a model: the prompt, the history, the grammar's shape, and the stream of calls."""

from __future__ import annotations

import json

import pytest

from aimichat.engines import tools
from aimichat.engines.base import Delta, Message

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def pieces(text: str, size: int) -> list[Delta]:
    """``text`` as deltas of ``size`` characters, one token each (as a model streams it)."""
    return [Delta(text[i : i + size], 1) for i in range(0, len(text), size)]


def run(stream: tools.ToolCallStream, deltas: list[Delta]) -> list[Delta]:
    out = [d for delta in deltas for d in stream.push(delta)]
    return out + stream.finish()


def calls_of(out: list[Delta]) -> list[dict[str, str]]:
    """The calls the deltas make, put together as a client does."""
    calls: dict[int, dict[str, str]] = {}
    for delta in out:
        for piece in delta.tool_calls:
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = piece.get("id") or call["id"]
            call["name"] += piece["function"].get("name") or ""
            call["arguments"] += piece["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


ANSWER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_calls_stream_as_openai_pieces_whatever_the_cut(size):
    out = run(tools.ToolCallStream(auto=False), pieces(ANSWER, size))
    calls = calls_of(out)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert not "".join(d.text for d in out)  # no text beside the calls
    assert sum(d.tokens for d in out) == len(pieces(ANSWER, size))  # every token still paid for
    first = next(d for d in out if d.tool_calls)
    assert first.tool_calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first.tool_calls[0]["type"] == "function"


def test_auto_passes_plain_text_through_unchanged():
    out = run(tools.ToolCallStream(auto=True), pieces("Hello <b>there</b>", 2))
    assert "".join(d.text for d in out) == "Hello <b>there</b>" and not calls_of(out)


def test_a_call_cut_by_max_tokens_keeps_what_was_generated():
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    out = run(tools.ToolCallStream(auto=True), pieces(cut, 4))
    assert calls_of(out) == [{"id": calls_of(out)[0]["id"], "name": "get_weather", "arguments": '{"city": "Pa'}]


def test_log_probabilities_follow_their_text():
    stream = tools.ToolCallStream(auto=False)
    entries = [{"token": ch, "logprob": -0.1, "bytes": None, "top_logprobs": []} for ch in ANSWER[:40]]
    deltas = [Delta(ch, 1, logprobs=(entry,)) for ch, entry in zip(ANSWER[:40], entries, strict=True)]
    out = run(stream, deltas)
    assert [e for d in out for e in d.logprobs] == entries


def test_tools_go_into_the_system_message_of_a_template_without_them():
    offer = tools.tool_prompt([WEATHER])
    assert '"name": "get_weather"' in offer and "<tool_call>" in offer
    history = tools.render_history(
        [
            Message("user", "Weather?"),
            Message(
                "assistant",
                "",
                tool_calls=(
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"P"}'}},
                ),
            ),
            Message("tool", "sunny", tool_call_id="c1"),
        ]
    )
    assert history[1] == Message(
        "assistant", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P"}}\n</tool_call>'
    )
    assert history[2] == Message("user", "<tool_response>\nsunny\n</tool_response>")


def test_the_grammar_allows_only_the_offered_calls():
    required = tools.tool_grammar([WEATHER, TIME], "required", None)
    assert '\\"name\\": \\"get_weather\\"' in required and '\\"name\\": \\"get_time\\"' in required
    assert "tool-free-text" not in required  # required: a call, never text
    named = tools.tool_grammar([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert "get_weather" not in named
    assert "tool-free-text ::=" in tools.tool_grammar([WEATHER], "auto", None)
    single = tools.tool_grammar([WEATHER], "required", False)
    assert 'tool-call ("\\n" tool-call)*' not in single
    assert "\\x00-\\x1F" in required  # JSON strings without raw control characters


def test_a_named_choice_must_be_offered():
    with pytest.raises(tools.ToolError, match="not among the tools"):
        tools.tool_grammar([WEATHER], {"type": "function", "function": {"name": "nope"}}, None)


def as_regex(expression: str) -> str:
    """A GBNF expression of literals, classes and groups as a Python regular expression (enough for ranges)."""
    return "^(" + expression.replace('" ', "").replace(' "', "").replace('"', "").replace(" ", "") + ")$"


@pytest.mark.parametrize(
    "low, high",
    [(0, 50), (-5, None), (None, 7), (-1200, -37), (13, 13), (99, 1001), (None, None), (-3, 3), (7, None)],
)
def test_an_integer_range_matches_exactly_its_integers(low, high):
    import re

    from aimichat.engines.json_grammar import integer_range

    pattern = re.compile(as_regex(integer_range(low, high)))
    for n in range(-1500, 1500):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.match(str(n))) == inside, (low, high, n)
    assert not pattern.match("007") and not pattern.match("-0")  # no leading zeros, no negative zero


def test_bounded_integers_in_a_schema_become_their_range():
    from aimichat.engines.json_grammar import schema_grammar

    age = {"type": "integer", "minimum": 0, "maximum": 50}
    grammar = schema_grammar({"type": "object", "properties": {"age": age}})
    assert '"50"' in grammar and "integral-part" not in grammar.split("age")[1].split("\n")[0]
    exclusive = schema_grammar({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3})
    assert "[1-2]" in exclusive
