"""``python -m mldeploy.llm.bench``: continuous vs static batching on the same workload.

Two numbers of each kind, measured side by side in one run (compare, don't clock):

- decode steps each policy needs for the workload, counted by stepping the engine directly
  (deterministic: same model, same requests, same order);
- tokens/s and TTFT/TPOT percentiles from 16 concurrent streaming clients against a live server;
- our server beside llama.cpp's (``llama_cpp.server`` on 5.6c's Q4_K_M file) at 1, 4 and 16 streams;
- the server's own guarantees: a cancelled request's slot runs the next request at the very next
  step, 1,000 cancelled requests leave nothing behind, every bad request gets a 4xx;
- the other targets of section 5.6, each measured in this run: the KV cache at position 256, the
  F16 GGUF's perplexity in llama.cpp against PyTorch, the course's Q4_K error against llama.cpp's
  (each skipped with a note if its library is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import httpx
import torch

from mldeploy.cli import positive_int
from mldeploy.llm.serving import loadgen
from mldeploy.llm.serving.api import create_app
from mldeploy.llm.serving.engine import Engine
from mldeploy.loadtest.background import BackgroundServer

POLICIES = ("continuous", "static")


def closed_loop(net, tokenizer, jobs: list[loadgen.Job], batching: str, max_running: int) -> Engine:
    """The engine after running ``jobs`` closed-loop (each stream sends its next job when one
    finishes), stepped in this thread: its ``steps`` and ``step_log`` are deterministic."""
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
    engine.run_until_idle()
    return engine


def count_steps(net, tokenizer, jobs: list[loadgen.Job], batching: str, max_running: int) -> int:
    """Steps for ``jobs`` run closed-loop."""
    return closed_loop(net, tokenizer, jobs, batching, max_running).steps


def our_server(batching: str, max_running: int) -> BackgroundServer:
    """``python -m mldeploy.llm.serving`` in a child process, as users run it (the model from
    5.6a's cache, the one this process loaded): the load generator does not share its GIL."""
    args = ["--batching", batching, "--max-running", str(max_running)]
    return BackgroundServer(env={}, module="mldeploy.llm.serving", args=args)


def measure(jobs, batching: str, max_running: int) -> dict:
    """Load a live server (a child process, free loopback port) with ``jobs``; always stopped."""
    with our_server(batching, max_running) as server:
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
    with (
        our_server("continuous", max_running) as ours,
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


BAD_REQUESTS = [
    {"model": "tiny-llama", "prompt": "x " * 2000},  # longer than the context
    {"model": "tiny-llama", "prompt": "x", "max_tokens": 0},
    {"model": "tiny-llama", "prompt": "x", "max_tokens": 10**9},
    {"model": "tiny-llama", "prompt": "x", "max_tokens": "5"},
    {"model": "tiny-llama", "prompt": 7},
    {"model": "tiny-llama", "prompt": ""},
    {"model": "gpt-4", "prompt": "x"},
    {"model": "tiny-llama", "prompt": "x", "temperature": -1},
    {"prompt": "x"},
]


def server_rows(trained) -> list[tuple[str, str, str]]:
    """The server's guarantees, counted (no timings): cancellation, leaks, bad requests."""
    net, tok = trained.model, trained.tokenizer
    engine = Engine(net, max_running=1)
    first, second = engine.submit(tok.encode("a"), 100), engine.submit(tok.encode("b"), 4)
    engine.step()
    engine.cancel(first)
    steps = 0
    while second.first_token_at is None:  # the waiting request has not started yet
        engine.step()
        steps += 1
    engine = Engine(net, max_running=8, max_waiting=1_000)
    for i in range(1_000):
        engine.cancel(engine.submit(tok.encode(f"request {i}"), 32))
    engine.run_until_idle()
    left = len(engine.running) + len(engine.waiting) + engine.max_running - len(engine.pool.free)
    with BackgroundServer(create_app(net, tok)) as server:
        answers = [httpx.post(server.url + "/v1/completions", json=b) for b in BAD_REQUESTS]
        answers.append(httpx.post(server.url + "/v1/completions", content=b"{not json"))
    n_4xx = sum(400 <= a.status_code < 500 for a in answers)
    return [
        ("cancel: steps until its slot serves the next request", f"{steps}",
         "1"),
        ("1,000 cancelled requests: sequences and slots left", f"{left}", "0"),
        ("bad requests answered with a 4xx", f"{n_4xx}/{len(answers)}", "all"),
    ]  # fmt: skip


def target_rows(trained) -> list[tuple[str, str, str]]:
    """(measurement, measured, target) for the other 5.6 targets; skips what is missing."""
    rows = []
    for measure_one in (_kv_cache_row, _f16_row, _q4k_row):
        try:
            rows.append(measure_one(trained))
        except (ImportError, AttributeError) as exc:  # another 5.6 notebook's library is absent
            print(f"skipped {measure_one.__name__}: {exc}")
    return rows


def _kv_cache_row(trained) -> tuple[str, str, str]:
    from mldeploy.llm import generation

    net, tok = trained.model, trained.tokenizer
    times = generation.time_steps(net, tok.encode("class Stack:\n\tdef __init__(self"), 260)
    slow, fast = generation.speedup_at(times, 256)
    return ("KV cache vs none, time per token at position 256", f"{slow / fast:.1f}×", "≥ 5×")


def _f16_row(trained) -> tuple[str, str, str]:
    from mldeploy.llm import evaluation, gguf, int4

    net, rows = trained.model, int4.held_out_rows(trained)
    with torch.no_grad():
        torch_ppl = evaluation.perplexity(lambda w: net(torch.tensor([w]))[0].numpy(), rows)
    f16 = gguf.measure(trained, "F16")["perplexity"]
    return ("F16 GGUF in llama.cpp vs PyTorch, perplexity", f"{abs(f16 / torch_ppl - 1):.1e}",
            "≤ 1e-3")  # fmt: skip


def _q4k_row(trained) -> tuple[str, str, str]:
    import numpy as np

    from mldeploy.llm import gguf

    fp32 = gguf.weights(trained)
    ours = gguf.dequantized(gguf.write_gguf(trained, "Q4_K (course)"))
    theirs = gguf.dequantized(gguf.write_gguf(trained, "Q4_K (llama.cpp)"))
    err = [sum(np.sum((w - d[n][1]) ** 2) for n, w in fp32.items()) for d in (ours, theirs)]
    return ("course Q4_K error ÷ llama.cpp's Q4_K error", f"{np.sqrt(err[0] / err[1]):.3f}",
            "≤ 1.05")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=positive_int, default=16)
    parser.add_argument("--per-stream", type=positive_int, default=3)
    parser.add_argument("--max-running", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="load runs per policy (medians)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mldeploy.llm.training import train_or_load

    trained = train_or_load()
    net, tok = trained.model, trained.tokenizer
    jobs = loadgen.workload(args.streams, args.per_stream, seed=args.seed)
    steps = {p: count_steps(net, tok, jobs, p, args.max_running) for p in POLICIES}
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for _ in range(args.repeats):  # alternate the policies: a busy spell hits both
        for p in POLICIES:
            runs[p].append(measure(jobs, p, args.max_running))
    results = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in runs.items()}
    n_tokens = sum(j.max_tokens for j in jobs)
    print(
        f"{len(jobs)} requests from {args.streams} streams, {n_tokens} tokens to generate, "
        f"at most {args.max_running} running; timings: medians of {args.repeats} runs"
    )
    print(table(steps, results))
    print("\nour server (continuous batching) beside llama.cpp's server, same workload:")
    try:
        print(engines_table(trained))
    except ImportError as exc:  # llama-cpp-python or 5.6c's GGUF writer is absent
        print(f"skipped: {exc}")
    print()
    for name, measured, target in server_rows(trained) + target_rows(trained):
        print(f"{name:<52}{measured:>10}   target {target}")


if __name__ == "__main__":
    main()
