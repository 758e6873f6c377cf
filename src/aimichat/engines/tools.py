"""Tool calling on an engine that only makes text (llama.cpp in this process).

Three pieces, each a plain function or a small class that tests call directly:

- :func:`tool_prompt` / :func:`render_history`: what the model reads. A GGUF whose chat template knows
  tools renders them itself; for any other template the tools go into the system message and earlier
  calls and results into the chat, in the Hermes format most open models were tuned on (Qwen 2.5, Hermes,
  SmolLM2's instruct data): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and
  ``<tool_response>...</tool_response>``.
- :func:`tool_grammar`: the GBNF the answer follows. Every call is one of the offered functions, its
  arguments valid JSON for that function's parameter schema (llama-cpp-python's schema converter, as for
  ``response_format``). ``required`` and a named function allow only calls; ``auto`` also allows plain text,
  which must then not start with ``<``; ``parallel_tool_calls: false`` allows one call.
- :class:`ToolCallStream`: turns the constrained text back into OpenAI's tool-call deltas as it streams
  (the name first, then the arguments in pieces), so a stream shows calls as OpenAI's does.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import json_grammar
from .base import JSON, Delta, Message

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "}\n</tool_call>"  # the call object's closing brace, then the tag: never inside valid arguments
NAME_HEAD = '{"name": "'
ARGUMENTS_HEAD = '", "arguments": '
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names

TOOLS_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class ToolError(ValueError):
    """The tools or the tool choice cannot be honoured; the message says why (a 400 for the caller)."""


def function_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(tool["function"]["name"]) for tool in tools]


def chosen_tools(tools: Sequence[JSON], tool_choice: str | JSON | None) -> list[JSON]:
    """The tools the answer may call: all of them, or the one a named choice names."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [tool for tool in tools if tool["function"]["name"] == name]
        if not chosen:
            raise ToolError(f"tool_choice names the function '{name}', which is not among the tools")
        return chosen
    return list(tools)


def tool_prompt(tools: Sequence[JSON]) -> str:
    """The system-message block that offers ``tools`` to a model whose template does not render them."""
    return TOOLS_SYSTEM.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def render_history(messages: Iterable[Message]) -> list[Message]:
    """Earlier calls and tool results as text, for a template that knows neither."""
    rendered = []
    for message in messages:
        if message.role == "tool":
            rendered.append(Message("user", f"<tool_response>\n{message.content}\n</tool_response>"))
        elif message.tool_calls:
            calls = "\n".join(_call_text(call) for call in message.tool_calls)
            rendered.append(Message("assistant", "\n".join(filter(None, [message.content, calls]))))
        else:
            rendered.append(message)
    return rendered


def template_message(message: Message) -> dict[str, Any]:
    """A message as a tool-aware Jinja chat template reads it (Hugging Face's convention: arguments as an
    object, not the JSON text OpenAI sends)."""
    body: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        body["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        body["tool_call_id"] = message.tool_call_id
    return body


def _arguments(call: Mapping[str, Any]) -> Any:
    text = call["function"].get("arguments") or "{}"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_text(call: Mapping[str, Any]) -> str:
    body = {"name": call["function"]["name"], "arguments": _arguments(call)}
    return f"{CALL_OPEN}{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def tool_grammar(tools: Sequence[JSON], tool_choice: str | JSON | None, parallel: bool | None) -> str:
    """The GBNF of an answer to a request with ``tools`` (``tool_choice`` other than ``none``)."""
    converter = json_grammar.new_converter()
    alternatives = []
    for i, tool in enumerate(chosen_tools(tools, tool_choice)):
        name = tool["function"]["name"]
        schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        try:
            resolved = converter.resolve_refs(schema, f"tool-{i}")
            arguments = converter.visit(resolved, f"tool-{i}-arguments")
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ToolError(f"the parameters of '{name}' cannot be turned into a grammar: {exc}") from None
        head = _literal(f"{CALL_OPEN}{NAME_HEAD}{name}{ARGUMENTS_HEAD}")
        alternatives.append(f"{head} {arguments} {_literal(CALL_CLOSE)}")
    grammar: str = converter.format_grammar()  # type: ignore[no-untyped-call]
    rules = [grammar, f"tool-call ::= {' | '.join(alternatives)}"]
    calls = "tool-call" if parallel is False else 'tool-call ("\\n" tool-call)*'
    if tool_choice == "required" or isinstance(tool_choice, dict):
        rules.append(f"tool-calls-root ::= {calls}")
    else:  # auto: a call, or text that does not start like one
        rules.append(f"tool-calls-root ::= {calls} | tool-free-text")
        rules.append("tool-free-text ::= [^<] [^\\x00]*")
    rules.append("root ::= tool-calls-root")  # the converter's rules are named after each tool, never root
    return json_grammar.strict_json_strings("\n".join(rules))


def _literal(text: str) -> str:
    return json.dumps(text)  # GBNF reads JSON's string escapes (\", \\, \n)


class ToolCallStream:
    """One choice's constrained text in, OpenAI's deltas out: text as is, or tool calls in pieces.

    ``auto``: text that does not start with ``<`` is an answer in words and passes through unchanged.
    Otherwise every call yields a first delta with its ``id``, ``type`` and ``name`` (arguments ``""``),
    then its arguments as they come, holding back only what could be the start of the closing tag. Each
    delta out carries the tokens (and log probabilities) of the text that made it, so a caller cut off
    mid-stream still pays for what it received.
    """

    def __init__(self, auto: bool) -> None:
        self.mode = "undecided" if auto else "calls"
        self.calls = 0  # calls started
        self._buffer = ""
        self._state = "head"  # head: before a call's name; name: in it; arguments: in its arguments
        self._tokens = 0
        self._logprobs: list[JSON] = []

    def push(self, delta: Delta) -> list[Delta]:
        self._tokens += delta.tokens
        self._logprobs += delta.logprobs
        self._buffer += delta.text
        return self._drain(template=delta)

    def finish(self, template: Delta | None = None) -> list[Delta]:
        """What is left when the answer ends (an answer cut by max_tokens ends mid-call)."""
        template = template or Delta("", 0)
        out = self._drain(template)
        if self.mode == "calls" and self._state == "arguments" and self._buffer:
            out.append(self._arguments(self._buffer, template))
        elif self.mode != "calls" and self._buffer:
            out.append(self._emit(template, text=self._buffer))
        self._buffer = ""
        if self._tokens or self._logprobs:
            out.append(self._emit(template))
        return out

    def _drain(self, template: Delta) -> list[Delta]:
        out: list[Delta] = []
        if self.mode == "undecided" and self._buffer:
            self.mode = "calls" if self._buffer.startswith("<") else "text"
        if self.mode == "text":
            if self._buffer:
                out.append(self._emit(template, text=self._buffer))
                self._buffer = ""
            return out
        while self.mode == "calls" and self._buffer:
            progressed = self._step(template, out)
            if not progressed:
                break
        return out

    def _step(self, template: Delta, out: list[Delta]) -> bool:
        if self._state == "head":
            buffer = self._buffer.lstrip("\n")
            head = CALL_OPEN + NAME_HEAD
            if buffer.startswith(head):
                self._buffer, self._state = buffer[len(head) :], "name"
                return True
            if not head.startswith(buffer):  # not a call after all (the grammar rules it out): pass it on
                self.mode = "text"
                out.append(self._emit(template, text=self._buffer))
                self._buffer = ""
            return False
        if self._state == "name":
            end = self._buffer.find(ARGUMENTS_HEAD)
            if end < 0:
                return False
            name, self._buffer = self._buffer[:end], self._buffer[end + len(ARGUMENTS_HEAD) :]
            self._state = "arguments"
            call = {"index": self.calls, "id": "call_" + secrets.token_hex(12), "type": "function"}
            call["function"] = {"name": name, "arguments": ""}
            self.calls += 1
            out.append(self._emit(template, tool_calls=(call,)))
            return True
        end = self._buffer.find(CALL_CLOSE)
        if end >= 0:
            piece, self._buffer, self._state = self._buffer[:end], self._buffer[end + len(CALL_CLOSE) :], "head"
            out.append(self._arguments(piece, template))
            return True
        keep = _partial_suffix(self._buffer, CALL_CLOSE)
        if len(self._buffer) > keep:
            piece, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            out.append(self._arguments(piece, template))
        return False

    def _arguments(self, piece: str, template: Delta) -> Delta:
        call = {"index": self.calls - 1, "function": {"arguments": piece}}
        return self._emit(template, tool_calls=(call,))

    def _emit(self, template: Delta, *, text: str = "", tool_calls: tuple[JSON, ...] = ()) -> Delta:
        logprobs = tuple(self._logprobs)
        delta = replace(template, text=text, tokens=self._tokens, tool_calls=tool_calls, logprobs=logprobs)
        self._tokens, self._logprobs = 0, []
        return delta


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
