"""``python -m mldeploy.llm.bench``: continuous vs static batching on the same workload.

Two numbers of each kind, measured side by side in one run (compare, don't clock):

- decode steps each policy needs for the workload, counted by stepping the engine directly
  (deterministic: same model, same requests, same order);
- tokens/s and TTFT/TPOT percentiles from 16 concurrent streaming clients against a live server;
- our server beside llama.cpp's (``llama_cpp.server`` on 5.6c's Q4_K_M file) at 1, 4 and 16 streams;
- the other targets of section 5.6, each measured in this run: the KV cache at position 256, the
  F16 GGUF's perplexity in llama.cpp against PyTorch, the course's Q4_K error against llama.cpp's,
  1,000 cancelled requests.
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


def engines_table(trained, streams=(1, 4, 16), per_stream: int = 2, max_running: int = 8) -> str:
    """Our continuous-batching server and llama.cpp's, same workload, side by side."""
    from mldeploy.llm import gguf, llamacpp_server

    lines = [f"{'streams':>8}{'server':>11}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'TPOT p50':>10}  (ms)"]  # fmt: skip
    app = create_app(trained.model, trained.tokenizer, max_running=max_running)
    with (
        BackgroundServer(app) as ours,
        llamacpp_server.running(gguf.write_gguf(trained, "Q4_K_M")) as theirs,
    ):
        for n in streams:
            jobs = loadgen.workload(n, per_stream, seed=0)
            for name, url in (("ours", ours.url), ("llama.cpp", theirs)):
                r = asyncio.run(loadgen.run(url, jobs))
                lines.append(
                    f"{n:>8}{name:>11}{r['tokens_per_s']:>10.0f}{r['ttft_p50_ms']:>10.1f}"
                    f"{r['ttft_p99_ms']:>10.1f}{r['tpot_p50_ms']:>10.1f}"
                )
    return "\n".join(lines)


def target_rows(trained) -> list[tuple[str, str, str]]:
    """(measurement, measured, target) for the rest of section 5.6's targets."""
    import numpy as np

    from mldeploy.llm import evaluation, generation, gguf, int4

    net, tok = trained.model, trained.tokenizer
    times = generation.time_steps(net, tok.encode("class Stack:\n\tdef __init__(self"), 260)
    slow, fast = generation.speedup_at(times, 256)
    rows = int4.held_out_rows(trained)
    with torch.no_grad():
        torch_ppl = evaluation.perplexity(lambda w: net(torch.tensor([w]))[0].numpy(), rows)
    f16 = gguf.measure(trained, "F16")["perplexity"]
    fp32 = gguf.weights(trained)
    ours = gguf.dequantized(gguf.write_gguf(trained, "Q4_K (course)"))
    theirs = gguf.dequantized(gguf.write_gguf(trained, "Q4_K (llama.cpp)"))
    err = [sum(np.sum((w - d[n][1]) ** 2) for n, w in fp32.items()) for d in (ours, theirs)]
    engine = Engine(net, max_running=8, max_waiting=1_000)
    for i in range(1_000):
        engine.cancel(engine.submit(tok.encode(f"request {i}"), 32))
    engine.run_until_idle()
    leak = len(engine.running) + len(engine.waiting)
    return [
        ("KV cache vs none, time per token at position 256", f"{slow / fast:.1f}×", "≥ 5×"),
        ("F16 GGUF in llama.cpp vs PyTorch, perplexity", f"{abs(f16 / torch_ppl - 1):.1e}",
         "≤ 1e-3"),
        ("course Q4_K error ÷ llama.cpp's Q4_K error", f"{np.sqrt(err[0] / err[1]):.3f}",
         "≤ 1.05"),
        ("1,000 cancelled requests: sequences left", f"{leak}", "0"),
    ]  # fmt: skip


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
    print("\nour server (continuous batching) beside llama.cpp's server, same workload:")
    print(engines_table(trained))
    print()
    for name, measured, target in target_rows(trained):
        print(f"{name:<52}{measured:>10}   target {target}")


if __name__ == "__main__":
    main()
