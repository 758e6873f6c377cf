"""How often the bundled model's first answer makes sense, by sampling temperature.

    .venv/bin/python bench/first_answers.py [--temperatures 0,0.3,0.7,1.0] [--seeds 3] [--tokens 24] [--top-p 1.0]

Twenty everyday questions a newcomer might send first ("What is the capital of France?", "What is 2+2?"…),
each sent as a client's first request would be (one user message; the engine adds the server's default
system prompt) through the real embedded engine (the default SmolLM2 GGUF, or ``AIMICHAT_MODEL_PATH``), at
each temperature and seed. An answer counts as sensible when it holds one of the question's expected
keywords as a word (case-insensitive); greedy decoding (temperature 0) is deterministic, so it is asked
once. Prints one line per temperature and, last, a Markdown table for docs/models.md and
``best_temperature=<t>`` (the highest share; ties go to the lower temperature).
``--show`` prints every answer, to check the keyword rule by eye.

The model's default sampling (``AIMICHAT_DEFAULT_TEMPERATURE``) was chosen from this table.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass

from aimichat.config import Settings
from aimichat.engines.base import Delta, Engine, Message, SamplingParams
from aimichat.engines.configs import EmbeddedConfig, build_engine


@dataclass(frozen=True)
class Question:
    text: str
    keywords: tuple[str, ...]  # any one of these in the answer counts as sensible


QUESTIONS = [
    Question("What is the capital of France?", ("paris",)),
    Question("What is 2+2?", ("4", "four")),
    Question("What color is the sky on a clear day?", ("blue",)),
    Question("How many days are in a week?", ("7", "seven")),
    Question("What is the capital of Japan?", ("tokyo",)),
    Question("How many legs does a spider have?", ("8", "eight")),
    Question("What is the opposite of hot?", ("cold",)),
    Question("What do bees make?", ("honey",)),
    Question("What is the largest planet in our solar system?", ("jupiter",)),
    Question("What is frozen water called?", ("ice",)),
    Question("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    Question("What is the chemical symbol for water?", ("h2o", "h₂o")),
    Question("Which animal is known as man's best friend?", ("dog", "dogs")),
    Question("What color are ripe bananas?", ("yellow",)),
    Question("What is 10 times 3?", ("30", "thirty")),
    Question("Which season comes after winter?", ("spring",)),
    Question("What is the capital of Italy?", ("rome",)),
    Question("What gas do humans need to breathe to stay alive?", ("oxygen",)),
    Question("How many months are in a year?", ("12", "twelve")),
    Question("What star is at the center of our solar system?", ("sun",)),
]


def sensible(answer: str, question: Question) -> bool:
    """Whether ``answer`` holds one of the expected keywords as a word of its own ("4", not "42"; "sun",
    not "Sunday")."""
    return any(re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) for word in question.keywords)


async def ask(engine: Engine, question: Question, params: SamplingParams) -> str:
    """The question as a client's first request sends it: one user message (the engine adds the server's
    default system prompt, as it does for the API)."""
    prompt = await engine.prepare([Message("user", question.text)])
    parts = []
    async for event in engine.generate(prompt, params):
        if isinstance(event, Delta):
            parts.append(event.text)
    return "".join(parts)


async def ask_in_turn(engine: Engine, question: Question, params: SamplingParams, turns: asyncio.Semaphore) -> str:
    async with turns:  # no more at once than the engine's queue takes
        return await ask(engine, question, params)


async def run(args: argparse.Namespace) -> None:
    settings = Settings()
    turns = asyncio.Semaphore(settings.parallel * 2)
    engine = build_engine("aimichat-1", EmbeddedConfig(), settings, threads=args.threads)
    await engine.start()
    rows: list[tuple[float, int, int]] = []
    try:
        for temperature in args.temperatures:
            seeds = [0] if temperature == 0 else list(range(1, args.seeds + 1))
            jobs = [
                (q, SamplingParams(max_tokens=args.tokens, temperature=temperature, top_p=args.top_p, seed=seed))
                for seed in seeds
                for q in QUESTIONS
            ]
            started = time.perf_counter()
            answers = await asyncio.gather(*(ask_in_turn(engine, q, p, turns) for q, p in jobs))
            good = sum(sensible(a, q) for (q, _), a in zip(jobs, answers, strict=True))
            rows.append((temperature, good, len(jobs)))
            took = time.perf_counter() - started
            print(
                f"temperature={temperature:g}: {good}/{len(jobs)} sensible ({100 * good / len(jobs):.0f}%), {took:.0f}s"
            )
            if args.show:
                for (q, p), a in zip(jobs, answers, strict=True):
                    mark = "ok " if sensible(a, q) else "BAD"
                    print(f"  {mark} seed={p.seed} {q.text!r} -> {a.strip()!r}")
    finally:
        await engine.close()
    print()
    print(f"| temperature (top_p {args.top_p:g}) | sensible answers | share |")
    print("|---|---|---|")
    for temperature, good, total in rows:
        print(f"| {temperature:g} | {good} of {total} | {100 * good / total:.0f}% |")
    best = max(rows, key=lambda row: (row[1] / row[2], -row[0]))
    print(f"best_temperature={best[0]:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[0.0, 0.3, 0.7, 1.0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per temperature above 0.")
    parser.add_argument("--tokens", type=int, default=24, help="max_tokens of each answer.")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine.")
    parser.add_argument("--show", action="store_true", help="Print every answer.")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
