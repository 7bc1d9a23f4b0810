"""Same numbers on every x86-64 machine: thread pinning for the computations whose results are stored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: reductions then happen in one fixed order whatever the core count,
    and on a busy 2-core machine one thread is faster than two fighting for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
