"""Per-request llama.cpp sampler chains for the llama engine.

Each sequence in a batch owns its chain (penalty history, random state), so one request's settings
never touch another's. The chain is built exactly as llama-cpp-python's ``Llama.generate`` builds it
(same samplers, same order, same defaults), so a request samples as ``Llama.generate`` would (the
parity test in tests/engines/test_llama.py holds us to it): a penalty stage over the last 64 tokens,
then greedy at temperature 0, otherwise top-k 40 → typical 1.0 → top-p → min-p 0.05 → temperature →
seeded draw.

At temperature 0 without presence or frequency penalty (what most requests ask for) :class:`GreedySampler`
computes the same two stages (repeat penalty, then greedy) on the logits row itself with numpy, picking
the very token the chain picks in a fifth of the time; :func:`make_sampler` chooses.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Protocol

import llama_cpp
import numpy as np

from .base import SamplingParams

PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64) default
TOP_K = 40
MIN_P = 0.05
TYPICAL_P = 1.0
MIN_KEEP = 1


class Sampler(Protocol):
    """Picks one request's next tokens. Not thread-safe: the scheduler thread owns it."""

    def sample(self, ctx: llama_cpp.llama_context_p, output_index: int) -> int:
        """The next token, from the logits at ``output_index`` of the last decoded batch; it joins the history."""
        ...

    def close(self) -> None: ...


def make_sampler(
    params: SamplingParams, *, n_vocab: int, repeat_penalty: float, seed: int, vocab: Any = None
) -> Sampler:
    """The sampler for ``params``: :class:`GreedySampler` where it is exact, llama.cpp's chain otherwise
    (always with a grammar, whose stage needs the model's ``vocab``)."""
    plain = params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and params.grammar is None
    if params.temperature == 0.0 and plain:
        return GreedySampler(n_vocab=n_vocab, repeat_penalty=repeat_penalty)
    return SamplerChain(params, n_vocab=n_vocab, repeat_penalty=repeat_penalty, seed=seed, vocab=vocab)


class SamplerChain:
    """A llama.cpp sampler chain for one request. Not thread-safe: the scheduler thread owns it."""

    def __init__(self, params: SamplingParams, *, n_vocab: int, repeat_penalty: float, seed: int, vocab: Any = None):
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not self._chain:
            raise RuntimeError("llama_sampler_chain_init failed")
        stages = _stages(params, n_vocab=n_vocab, repeat_penalty=repeat_penalty, seed=seed)
        if params.grammar is not None:
            # First, as llama-cpp-python's Llama puts it: only tokens the grammar allows go on to be picked.
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not grammar:
                self.close()
                raise ValueError("llama.cpp could not compile the grammar of this response format")
            stages.insert(0, grammar)
        for stage in stages:
            llama_cpp.llama_sampler_chain_add(self._chain, stage)  # the chain owns (and frees) each stage

    def sample(self, ctx: llama_cpp.llama_context_p, output_index: int) -> int:
        """Pick the next token from the logits at ``output_index`` of the last decoded batch.

        ``llama_sampler_sample`` also *accepts* the token, which feeds the penalty history.
        """
        token: int = llama_cpp.llama_sampler_sample(self._chain, ctx, output_index)
        return token

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class GreedySampler:
    """llama.cpp's penalties stage (repeat penalty only) followed by greedy, on the logits row with numpy.

    Why: ``llama_sampler_sample`` copies all 49152 logits of SmolLM2 into a candidate array and looks each
    one up in the penalty stage's hash map: ~280 µs a token in the engine on the 2-core development
    machine, 2.2 ms of a ~50 ms step at 8 streams. This touches only the at most 64 penalised logits and
    runs one argmax: ~55 µs a token in the engine, most of it reading the row the decode has just written
    (20 µs with the row in cache).

    It computes what the chain computes, in the same float32 operations: a token seen ``n > 0`` times in
    the last 64 picks has its logit multiplied by the penalty when ≤ 0, divided by it otherwise (with no
    presence or frequency penalty, the chain's subtraction is of exactly 0); then the first token with the
    highest logit wins (``np.argmax`` also takes the first). The picked token joins the history, as the
    chain's *accept* does. tests/engines/test_llama.py compares the two token by token.
    """

    def __init__(self, *, n_vocab: int, repeat_penalty: float) -> None:
        self._n_vocab = n_vocab
        self._penalty = np.float32(repeat_penalty)  # llama.cpp keeps it as a C float
        self._history: deque[int] = deque(maxlen=PENALTY_LAST_N)
        self._counts: Counter[int] = Counter()

    def sample(self, ctx: llama_cpp.llama_context_p, output_index: int) -> int:
        """Pick the next token from the logits at ``output_index`` of the last decoded batch."""
        pointer = llama_cpp.llama_get_logits_ith(ctx, output_index)
        if not pointer:
            raise RuntimeError(f"llama.cpp has no logits at output {output_index}")
        row = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        if self._counts and self._penalty != 1.0:
            # Penalise in place and put the logits back: copying the 192 KiB row costs ~75 µs here.
            seen = np.fromiter(self._counts, dtype=np.intp, count=len(self._counts))
            logits = row[seen]
            row[seen] = np.where(logits <= 0, logits * self._penalty, logits / self._penalty)
            token = int(row.argmax())
            row[seen] = logits
        else:
            token = int(row.argmax())
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        if len(self._history) == PENALTY_LAST_N:  # the oldest pick leaves the window
            oldest = self._history[0]
            self._counts[oldest] -= 1
            if not self._counts[oldest]:
                del self._counts[oldest]
        self._history.append(token)
        self._counts[token] += 1

    def close(self) -> None:
        """Nothing to free: it holds no llama.cpp memory."""


def _stages(params: SamplingParams, *, n_vocab: int, repeat_penalty: float, seed: int) -> list[Any]:
    stages = [
        llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, repeat_penalty, params.frequency_penalty, params.presence_penalty
        )
    ]
    if params.temperature < 0.0:
        stages.append(llama_cpp.llama_sampler_init_dist(seed))
    elif params.temperature == 0.0:
        stages.append(llama_cpp.llama_sampler_init_greedy())
    else:
        stages += [
            llama_cpp.llama_sampler_init_top_k(TOP_K),
            llama_cpp.llama_sampler_init_typical(TYPICAL_P, MIN_KEEP),
            llama_cpp.llama_sampler_init_top_p(params.top_p, MIN_KEEP),
            llama_cpp.llama_sampler_init_min_p(MIN_P, MIN_KEEP),
            llama_cpp.llama_sampler_init_temp(params.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ]
    return stages
