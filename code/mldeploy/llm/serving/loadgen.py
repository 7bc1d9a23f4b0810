"""A load generator: N concurrent streaming clients, each sending requests one after another.

Prompt and output lengths are mixed and drawn from a seeded generator, so two servers can be
given exactly the same workload. Reports TTFT and TPOT percentiles and generated tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

WORDS = "the model reads a prompt and writes one token at a time until it is done".split()


@dataclass(frozen=True)
class Job:
    """One request of the workload: which stream sends it, its prompt and its output length."""

    stream: int
    prompt: str
    max_tokens: int


def workload(
    n_streams: int,
    per_stream: int,
    *,
    seed: int = 0,
    prompt_words: tuple[int, int] = (2, 24),
    max_tokens: tuple[int, int] = (4, 64),
) -> list[Job]:
    """Mixed lengths: uniform word counts and output lengths in the given ranges (seeded)."""
    rng = random.Random(seed)
    jobs = []
    for stream in range(n_streams):
        for _ in range(per_stream):
            words = [rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))]
            jobs.append(Job(stream, " ".join(words), rng.randint(*max_tokens)))
    return jobs


@dataclass
class Result:
    """What one streamed request measured (seconds) and how many tokens it got."""

    ttft: float
    tpot: float | None
    tokens: int


async def stream_one(client: httpx.AsyncClient, job: Job, model: str) -> Result:
    """Send one streaming request; time its first token and the gaps after it."""
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": True}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["finish_reason"] is not None:
                continue  # the closing event carries no token
            last = time.perf_counter()
            first = first or last
            tokens += 1
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Result(first - start, tpot, tokens)


async def run(url: str, jobs: list[Job], model: str = "tiny-llama") -> dict:
    """Run every stream's jobs in order, the streams concurrently; summarize the results."""
    streams: dict[int, list[Job]] = {}
    for job in jobs:
        streams.setdefault(job.stream, []).append(job)
    limits = httpx.Limits(max_connections=len(streams) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_stream(mine: list[Job]) -> list[Result]:
            return [await stream_one(client, job, model) for job in mine]

        start = time.perf_counter()
        per_stream = await asyncio.gather(*(one_stream(m) for m in streams.values()))
        wall = time.perf_counter() - start
    return summarize([r for rs in per_stream for r in rs], wall)


def summarize(results: list[Result], wall: float) -> dict:
    """p50/p99 TTFT and TPOT (ms) and tokens/s over the wall time."""
    ttft = [r.ttft for r in results]
    tpot = [r.tpot for r in results if r.tpot is not None]
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "tpot_p50_ms": 1000 * percentile(tpot, 50),
        "tpot_p99_ms": 1000 * percentile(tpot, 99),
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
