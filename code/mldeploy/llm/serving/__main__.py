"""``python -m mldeploy.llm.serving --port 8001 --batching continuous|static``: serve the model."""

from __future__ import annotations

import argparse

import torch
import uvicorn

from mldeploy.llm.serving.api import create_app
from mldeploy.llm.training import train_or_load
from mldeploy.serving.server import listen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trained = train_or_load()
    app = create_app(
        trained.model,
        trained.tokenizer,
        batching=args.batching,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
    )
    sock = listen(args.host, args.port)  # a clear one-line error if the port is taken
    print(f"serving {args.batching} batching on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, fd=sock.fileno(), log_level="warning")


if __name__ == "__main__":
    main()
