"""Per-request llama.cpp sampler chains for the batched engine.

Each sequence in a batch owns its chain (penalty history, random state), so one request's settings
never touch another's. The chain is built exactly as llama-cpp-python's ``Llama.generate`` builds
it for the one-at-a-time engine (same samplers, same order, same defaults), so both engines sample
alike: a penalty stage over the last 64 tokens, then greedy at temperature 0, otherwise
top-k 40 → typical 1.0 → top-p → min-p 0.05 → temperature → seeded draw.
"""

from __future__ import annotations

import llama_cpp

from .base import SamplingParams

PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64) default
TOP_K = 40
MIN_P = 0.05
TYPICAL_P = 1.0
MIN_KEEP = 1


class SamplerChain:
    """A llama.cpp sampler chain for one request. Not thread-safe: the scheduler thread owns it."""

    def __init__(self, params: SamplingParams, *, n_vocab: int, repeat_penalty: float, seed: int):
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not self._chain:
            raise RuntimeError("llama_sampler_chain_init failed")
        for stage in _stages(params, n_vocab=n_vocab, repeat_penalty=repeat_penalty, seed=seed):
            llama_cpp.llama_sampler_chain_add(self._chain, stage)  # the chain owns (and frees) each stage

    def sample(self, ctx: llama_cpp.llama_context_p, output_index: int) -> int:
        """Pick the next token from the logits at ``output_index`` of the last decoded batch.

        ``llama_sampler_sample`` also *accepts* the token, which feeds the penalty history.
        """
        return llama_cpp.llama_sampler_sample(self._chain, ctx, output_index)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _stages(params: SamplingParams, *, n_vocab: int, repeat_penalty: float, seed: int) -> list:
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
