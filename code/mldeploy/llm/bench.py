"""``python -m mldeploy.llm.bench``: continuous vs static batching on the same workload.

Two numbers of each kind, measured side by side in one run (compare, don't clock):

- decode steps each policy needs for the workload, counted by stepping the engine directly
  (deterministic: same model, same requests, same order);
- tokens/s and TTFT/TPOT percentiles from 16 concurrent streaming clients against a live server.
"""

from __future__ import annotations

import argparse
import asyncio

import torch

from mldeploy.llm.serving import loadgen
from mldeploy.llm.serving.api import create_app
from mldeploy.llm.serving.engine import Engine
from mldeploy.serving.server import BackgroundServer

POLICIES = ("continuous", "static")


def count_steps(net, tokenizer, jobs: list[loadgen.Job], batching: str, max_running: int) -> int:
    """Steps for ``jobs`` run closed-loop (each stream sends its next job when one finishes)."""
    engine = Engine(net, batching=batching, max_running=max_running, max_waiting=len(jobs))
    queues: dict[int, list[loadgen.Job]] = {}
    for job in jobs:
        queues.setdefault(job.stream, []).append(job)

    def send(stream: int) -> None:
        if queues[stream]:
            job = queues[stream].pop(0)
            prompt = tokenizer.encode(job.prompt)
            engine.submit(prompt, job.max_tokens, on_token=lambda s, t: t is None and send(stream))

    for stream in queues:
        send(stream)
    return engine.run_until_idle()


def measure(net, tokenizer, jobs, batching: str, max_running: int) -> dict:
    """Load a live server (in a thread, free loopback port) with ``jobs``; always stopped."""
    app = create_app(net, tokenizer, batching=batching, max_running=max_running)
    with BackgroundServer(app) as server:
        return asyncio.run(loadgen.run(server.url, jobs))


def table(steps: dict, results: dict) -> str:
    """The comparison as fixed-width text, with the continuous ÷ static ratios."""
    c, s = results["continuous"], results["static"]
    rows = [
        (
            "decode steps",
            steps["continuous"],
            steps["static"],
            steps["continuous"] / steps["static"],
        ),
        ("tokens/s", c["tokens_per_s"], s["tokens_per_s"], c["tokens_per_s"] / s["tokens_per_s"]),
        ("TTFT p50 (ms)", c["ttft_p50_ms"], s["ttft_p50_ms"], c["ttft_p50_ms"] / s["ttft_p50_ms"]),
        ("TTFT p99 (ms)", c["ttft_p99_ms"], s["ttft_p99_ms"], c["ttft_p99_ms"] / s["ttft_p99_ms"]),
        ("TPOT p50 (ms)", c["tpot_p50_ms"], s["tpot_p50_ms"], c["tpot_p50_ms"] / s["tpot_p50_ms"]),
        ("TPOT p99 (ms)", c["tpot_p99_ms"], s["tpot_p99_ms"], c["tpot_p99_ms"] / s["tpot_p99_ms"]),
    ]
    lines = [f"{'':16}{'continuous':>12}{'static':>12}{'cont ÷ static':>15}"]
    lines += [f"{name:16}{a:12.1f}{b:12.1f}{r:15.2f}" for name, a, b, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--per-stream", type=int, default=3)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mldeploy.llm.training import train_or_load

    trained = train_or_load()
    net, tok = trained.model, trained.tokenizer
    jobs = loadgen.workload(args.streams, args.per_stream, seed=args.seed)
    steps = {p: count_steps(net, tok, jobs, p, args.max_running) for p in POLICIES}
    results = {p: measure(net, tok, jobs, p, args.max_running) for p in POLICIES}
    n_tokens = sum(j.max_tokens for j in jobs)
    print(
        f"{len(jobs)} requests from {args.streams} streams, {n_tokens} tokens to generate, "
        f"at most {args.max_running} running"
    )
    print(table(steps, results))


if __name__ == "__main__":
    main()
