"""The embedded engine: one llama.cpp model in this process, requests served one at a time in FIFO order.

Generation runs on a single worker thread so the event loop stays free. Each request is a job: the
thread hands every piece of text to the job's asyncio queue as soon as it is decoded, and checks the
job's ``cancelled`` flag before every token, so a client that goes away stops its generation within a
token and the next waiting job starts at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .base import (
    ContextLengthExceeded,
    Delta,
    EngineBusy,
    EngineError,
    Event,
    Finish,
    Message,
    PreparedPrompt,
    SamplingParams,
)
from .llama_common import DEFAULT_GGUF, REREAD_TOKENS, ChatPrompt, default_model_path, retry_after, tokenize_off_loop
from .text import StopScanner, TokenText

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GGUF", "EmbeddedEngine", "default_model_path"]

@dataclass(eq=False)  # identity: jobs live in a set
class _Job:
    tokens: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def emit(self, item: Event | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EmbeddedEngine:
    """llama-cpp-python behind the :class:`~aimichat.engines.base.Engine` interface."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        model_id: str = "aimichat-1",
        context_length: int = 4096,
        threads: int = 1,
        system_prompt: str = "",
        repeat_penalty: float = 1.1,
        max_queue: int = 64,
        queue_timeout: float = 60.0,
    ):
        self.model_id = model_id
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.context_length = context_length
        self.threads = threads
        self.system_prompt = system_prompt
        self.repeat_penalty = repeat_penalty
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._llm = None
        self._prompt: ChatPrompt | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aimichat-engine")
        self._queued: set[_Job] = set()
        self._queue_lock = threading.Lock()
        self._running = 0
        self._load_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    def load(self) -> None:
        """Load the model (idempotent). Safe to call from any thread."""
        with self._load_lock:
            if self._llm is not None:
                return
            from llama_cpp import Llama

            if not self.model_path.is_file():
                raise EngineError(f"model file not found: {self.model_path}")
            llm = Llama(
                model_path=str(self.model_path),
                n_ctx=self.context_length,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                n_batch=512,
                verbose=False,
            )
            self._prompt = ChatPrompt(llm._model, self.system_prompt, self.model_path.name)
            self._llm = llm
            log.info("loaded %s (context %d, %d threads)", self.model_path.name, self.context_length, self.threads)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> tuple[bool, dict]:
        return self._llm is not None, {
            "engine": "embedded",
            "model": self.model_path.name,
            "loaded": self._llm is not None,
            "running": self._running,
            "queued": len(self._queued),
            "threads": self.threads,
            "max_queue": self.max_queue,
        }

    # -- prompt --------------------------------------------------------------------------------

    async def prepare(self, messages: list[Message]) -> PreparedPrompt:
        tokens = await tokenize_off_loop(self.tokenize_chat, messages, self.context_length)
        room = self.context_length - len(tokens)
        if room < 1:
            raise ContextLengthExceeded(len(tokens), self.context_length)
        return PreparedPrompt(tuple(messages), len(tokens), room, payload=tokens)

    def tokenize_chat(self, messages: list[Message]) -> list[int]:
        """The exact prompt tokens: the GGUF's chat template, with our system prompt if none is given."""
        if self._llm is None or self._prompt is None:
            raise EngineError("model is not loaded")
        return self._prompt.tokens(messages)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncIterator[Event]:
        job = _Job(list(prompt.payload), params, asyncio.get_running_loop())
        with self._queue_lock:  # several event loops (one per test server, or none) may share an engine
            if len(self._queued) >= self.max_queue:
                raise EngineBusy("The engine queue is full; retry shortly.", retry_after=retry_after(len(self._queued)))
            self._queued.add(job)
        try:
            self._executor.submit(self._run, job)
            try:
                await asyncio.wait_for(job.started.wait(), self.queue_timeout)
            except TimeoutError:
                raise EngineBusy("Timed out waiting for the engine; retry shortly.", retry_after=5) from None
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise EngineError("generation failed") from item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            # Runs on normal end, on error and when the consumer goes away (client disconnect).
            job.cancelled = True
            self._dequeue(job)

    def _dequeue(self, job: _Job) -> None:
        with self._queue_lock:
            self._queued.discard(job)

    def _run(self, job: _Job) -> None:
        self._dequeue(job)  # the worker decides what is waiting: no event-loop round trip can skew it
        if job.cancelled:
            return
        job.loop.call_soon_threadsafe(job.started.set)
        self._running += 1
        try:
            for event in self._generate_sync(job):
                job.emit(event)
        except BaseException as exc:  # handed to the awaiting request, which maps it to an error
            log.exception("generation failed")
            job.emit(exc)
        finally:
            self._running -= 1

    def _generate_sync(self, job: _Job):
        import llama_cpp

        llm, params = self._llm, job.params
        vocab = llm._model.vocab
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        # Llama.generate reuses the KV cache's common prefix with the last prompt; leave it at most all
        # but the last REREAD_TOKENS, so a repeated prompt is answered as it was the first time.
        llm.n_tokens = min(llm.n_tokens, max(len(job.tokens) - REREAD_TOKENS, 0))
        text, stops = TokenText(), StopScanner(params.stop)
        generated: list[int] = []
        pending_tokens = 0
        finish, hit_stop_string = "length", False
        for token in llm.generate(
            job.tokens,
            temp=params.temperature,
            top_p=params.top_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        ):
            if job.cancelled:
                return
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            piece = llm.detokenize([token], prev_tokens=generated)
            generated.append(token)
            pending_tokens += 1
            out, stopped = stops.push(text.push(piece))
            if out:
                yield Delta(out, pending_tokens)
                pending_tokens = 0
            if stopped:
                finish, hit_stop_string = "stop", True
                break
            if len(generated) >= params.max_tokens:
                break
        if not hit_stop_string:
            tail = stops.push(text.flush())[0] + stops.flush()
            if tail:
                yield Delta(tail, pending_tokens)
        yield Finish(finish, len(job.tokens), len(generated))
