"""Same stored numbers on every x86-64 machine: one compute path for PyTorch and MKL, one thread.

PyTorch, MKL and oneDNN each pick their kernels by the instruction sets of the CPU they run on, and
kernels for AVX2 and AVX-512 round floating-point sums differently. A single evaluation barely
moves, but training amplifies the last bits: the chapter's character LM ended at held-out
perplexity 10.204 / 10.159 / 10.186 with PyTorch's ``default`` / ``avx2`` / AVX-512 kernels.
Every machine this course runs on has AVX2, so the library pins that path (measured in
``tests/test_reproducibility.py``):

- ``ATEN_CPU_CAPABILITY=avx2`` — PyTorch's own kernels; changes the trained weights on AVX-512.
- ``MKL_CBWR=AVX2`` — MKL's conditional numerical reproducibility: the same BLAS code path on
  Intel and AMD, AVX2 and AVX-512 hosts (MKL picks per vendor and ISA otherwise).
- ``ONEDNN_MAX_CPU_ISA=AVX2`` — oneDNN's cap; no effect measured on the chapter's models (they
  never reach oneDNN), set so a convolution added later cannot reintroduce the difference.
- one thread for every computation whose result is stored (``single_thread``, ONNX Runtime
  sessions with ``intra_op_num_threads=1``): reductions then run in one order on any core count.

ONNX Runtime has no such switch: its MLAS kernels dispatch on the CPU (AVX-512, AVX2, VNNI for
INT8), so numbers it computes may differ in the last digits between machines. The notebooks
declare a tolerance for those cells (``mldeploy.book.nbval_tolerance``).

The variables are read when each library first computes, so ``pin_environment`` (run when
``mldeploy`` is imported) works even after ``import torch``, as long as nothing has been computed
yet. ``MLDEPLOY_NATIVE_CPU=1`` turns the pin off, e.g. to time the fastest kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
OPT_OUT = "MLDEPLOY_NATIVE_CPU"


def pinned(env: MutableMapping[str, str] | None = None) -> bool:
    """Whether the pin applies (it does unless ``MLDEPLOY_NATIVE_CPU`` is set to a true value)."""
    env = os.environ if env is None else env
    return env.get(OPT_OUT, "").strip().lower() not in ("1", "true", "yes", "on")


def pin_environment(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the pinned variables in ``env`` (default ``os.environ``); return what was set."""
    env = os.environ if env is None else env
    if not pinned(env):
        return {}
    env.update(PINNED_ENV)
    return dict(PINNED_ENV)


def torch_capability() -> str:
    """The kernel family PyTorch dispatches to in this process (e.g. ``AVX2``)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def describe() -> str:
    """One line for notebooks and reports: the compute path in use."""
    mode = "pinned" if pinned() else "native (MLDEPLOY_NATIVE_CPU set)"
    knobs = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in PINNED_ENV)
    return f"compute path {mode}: torch kernels {torch_capability()}; {knobs}"


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: reductions then happen in one fixed order whatever the core count,
    and on a busy 2-core machine one thread is faster than two fighting for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
