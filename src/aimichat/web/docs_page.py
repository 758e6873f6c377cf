"""The public API document (``aimichat/docs/api.txt``) as structured blocks for the docs page.

The file is the text of the spec's web page with its markup gone: prose lines, code examples and one
parameter table squashed into a line. This module recognises each code example by its first line,
re-indents it, and fills in this server's base URL and a ``YOUR_API_KEY`` placeholder. Lines it does
not recognise become paragraphs, so an edited spec still renders (just with fewer headings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

SPEC = Path(__file__).parent.parent / "docs" / "api.txt"
SPEC_HOST = "https://aimichat.app"
SPEC_KEY = "aimichat_your_api_key_here"
PLACEHOLDER = "YOUR_API_KEY"

# A line starting with one of these opens a section with that heading.
HEADINGS = {
    "Get started with the AimiChat API": ("quick-start", "Quick start"),
    "Generate and manage your API keys": ("keys", "API keys"),
    "All API requests require authentication": ("authentication", "Authentication"),
    "API requests count against": ("rate-limits", "Credits and rate limits"),
    SPEC_HOST + "/v1/chat/completions": ("chat", "Chat completions"),
    "When stream: true": ("streaming", "Streaming"),
    "The API uses standard HTTP status codes": ("errors", "Errors"),
    "Get started quickly with these code examples": ("examples", "Code examples"),
    "Never commit API keys": ("best-practices", "Best practices"),
    "Our team is here to help": ("help", "Help"),
}

PARAMETERS = [  # the spec's parameter table, which the text extraction squashed into one line
    ("messages", "array", "required", "The conversation so far: objects with a role (system, user or assistant) and content."),
    ("stream", "boolean", "optional", "Send the reply as Server-Sent Events while it is generated. Default false."),
    ("max_tokens", "integer", "optional", "The most tokens the reply may have."),
    ("temperature", "number", "optional", "Sampling temperature from 0 to 2; higher is more varied."),
]

STATUS_CODES = [
    ("200", "Success."),
    ("400", "The request is malformed or asks for something this server does not support."),
    ("401", "The API key is missing, wrong or revoked."),
    ("403", "The account is disabled, or the key asked for a mode other than talk."),
    ("404", "Unknown path or model."),
    ("413", "The request body is too large."),
    ("429", "The daily or monthly credits are spent; the body says which and when they reset."),
    ("503", "The model is busy; retry after the Retry-After header's seconds."),
]


@dataclass
class Block:
    kind: str  # paragraph | code | endpoint | parameters | statuses | list
    text: str = ""
    label: str = ""
    items: list = field(default_factory=list)


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@lru_cache(maxsize=16)
def sections(base_url: str) -> tuple[Section, ...]:
    text = SPEC.read_text(encoding="utf-8").replace(SPEC_HOST, "\0HOST\0").replace(SPEC_KEY, PLACEHOLDER)
    parsed = parse([line.rstrip() for line in text.splitlines() if line.strip()])
    for section in parsed:
        for block in section.blocks:
            block.text = block.text.replace("\0HOST\0", base_url)
    return tuple(parsed)


def parse(lines: list[str]) -> list[Section]:
    current = Section("overview", "Overview")
    result = [current]
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _heading(line)
        if heading and not (current.id == heading[0]):
            current = Section(*heading)
            result.append(current)
        if line.startswith("\0HOST\0/v1/"):
            current.blocks.append(Block("endpoint", "POST " + line))
            i += 1
            continue
        if "curl " in line and not line.startswith("curl "):
            # "messagesrole and content...curl -X POST ...": the parameter table, then the request.
            current.blocks.append(Block("parameters", items=PARAMETERS))
            lines[i] = line[line.index("curl ") :]
            continue
        end, lang, label = _code_span(lines, i)
        if end > i:
            current.blocks.append(Block("code", _reindent(lines[i:end], lang), label=_label(current, lang) or label, items=[lang]))
            i = end
            continue
        _add_prose(current, line)
        i += 1
    return result


def _heading(line: str) -> tuple[str, str] | None:
    for start, heading in HEADINGS.items():
        if line.replace("\0HOST\0", SPEC_HOST).startswith(start):
            return heading
    return None


def _add_prose(section: Section, line: str) -> None:
    if section.id == "best-practices":  # the spec's best-practice notes read best as a list
        if not section.blocks or section.blocks[-1].kind != "list":
            section.blocks.append(Block("list"))
        section.blocks[-1].items.append(line)
        return
    section.blocks.append(Block("paragraph", line))
    if section.id == "errors":
        section.blocks.append(Block("statuses", items=STATUS_CODES))


def _label(section: Section, lang: str) -> str:
    if section.id == "chat":
        return "Response" if lang == "json" else "Request"
    if section.id == "errors":
        return "429 response body"
    return ""


# -- code examples -------------------------------------------------------------------------------


def _code_span(lines: list[str], i: int) -> tuple[int, str, str]:
    """(end, language, label) of the code example starting at line ``i``; end == i if none does."""
    line = lines[i]
    if line.startswith(("Authorization: ", "X-API-Key: ", "?api_key=")):
        return _while(lines, i, lambda s: s.startswith(("Authorization: ", "X-API-Key: ", "?api_key="))), "http", ""
    if line.startswith("X-RateLimit-"):
        return _while(lines, i, lambda s: s.startswith("X-RateLimit-")), "http", ""
    if line.startswith("data: "):
        return _while(lines, i, lambda s: s.startswith("data: ")), "text", ""
    if line.startswith("curl "):
        return _until(lines, i, lambda s: s == "}'"), "bash", "curl"
    if line.startswith("import "):
        return _until(lines, i, lambda s: s.startswith("print(")), "python", "Python"
    if line.startswith("const fetch"):
        return _until(lines, i, lambda s: s.startswith(".then(data")), "javascript", "Node.js"
    if line == "{":
        return _json_end(lines, i), "json", ""
    return i, "", ""


def _while(lines: list[str], i: int, keep) -> int:
    while i < len(lines) and keep(lines[i]):
        i += 1
    return i


def _until(lines: list[str], i: int, last) -> int:
    while i < len(lines) and not last(lines[i]):
        i += 1
    return min(i + 1, len(lines))


def _json_end(lines: list[str], i: int) -> int:
    depth = 0
    for j in range(i, len(lines)):
        depth += _depth_change(lines[j], '"')
        if depth <= 0:
            return j + 1
    return len(lines)


def _reindent(lines: list[str], lang: str) -> str:
    """Indent one step per line left open (the extraction lost all indentation), so ``fetch(url, {``
    indents its body once, not twice; curl continuation lines get two spaces more."""
    quotes = '"' if lang in ("bash", "json") else "\"'`"  # curl's JSON sits inside one '...' string
    unit = "    " if lang == "python" else "  "
    stack: list[int] = []  # unclosed brackets of each line that opened some
    out = []
    for n, raw in enumerate(lines):
        s = raw.strip()
        leading = len(s) - len(s.lstrip(")]}"))
        out.append(("  " if lang == "bash" and n > 0 else "") + unit * _after_closing(stack, leading) + s)
        opened_here = False
        for ch in _brackets(s, quotes):
            if ch in "([{":
                if opened_here:
                    stack[-1] += 1
                else:
                    stack.append(1)
                    opened_here = True
            elif stack:
                stack[-1] -= 1
                if stack[-1] == 0:
                    stack.pop()
                    opened_here = False
    return "\n".join(out)


def _after_closing(stack: list[int], closers: int) -> int:
    """The depth once ``closers`` brackets have closed (without changing ``stack``)."""
    frames = list(stack)
    for _ in range(closers):
        if not frames:
            break
        frames[-1] -= 1
        if frames[-1] == 0:
            frames.pop()
    return len(frames)


def _brackets(line: str, quotes: str):
    quote = ""
    for ch in line:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in quotes:
            quote = ch
        elif ch in "()[]{}":
            yield ch


def _depth_change(line: str, quotes: str) -> int:
    return sum(1 if ch in "([{" else -1 for ch in _brackets(line, quotes))
