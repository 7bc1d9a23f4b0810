"""Same stored numbers on every x86-64 machine: one compute path for PyTorch and MKL, one thread.

PyTorch, MKL and oneDNN each pick their kernels by the instruction sets of the CPU they run on, and
kernels for AVX2 and AVX-512 round floating-point sums differently. A single evaluation barely
moves, but training amplifies the last bits: the chapter's character LM ended at held-out
perplexity 10.204 / 10.159 / 10.186 with PyTorch's ``default`` / ``avx2`` / AVX-512 kernels
(measured on an AMD host with MKL's AVX2 branch).
Every machine this course runs on has AVX2, so the library pins that path (measured in
``tests/test_reproducibility.py``) with ``pin_compute_path()``:

- ``ATEN_CPU_CAPABILITY=avx2`` — PyTorch's own kernels; changes the trained weights on AVX-512.
- ``MKL_CBWR=COMPATIBLE`` — MKL's conditional numerical reproducibility on its SSE2 code path,
  the one branch that gives the same bits on Intel and AMD. Measured on ``sgemm``, ``dgemm``,
  ``inv``, ``cholesky`` and ``exp``: with ``AVX2`` an Intel host and an AMD host differ (on AMD,
  MKL falls back to its AUTO branch and its own ``sgemm``; the trained LMs differ); with
  ``COMPATIBLE`` a Sapphire Rapids host, an emulated Haswell and an emulated EPYC agree bit for
  bit (``tests/test_reproducibility.py``). It is MKL's slowest branch: 5.6a's Llama trains in about
  10 minutes on one core of an Intel Xeon.
- fused Adam and AdamW (``fused=True``) wherever the library trains. ``torch.sqrt`` (and
  ``pow(0.5)``) on CPU call MKL's vector ``sqrt``, which is not correctly rounded: even on the
  COMPATIBLE branch its results differ between a Sapphire Rapids host and ``qemu-x86_64`` (whose
  arithmetic is exact IEEE), so they most likely come from an approximate instruction, which
  Intel and AMD implement differently. The default (``foreach``) Adam takes that ``sqrt``; the
  fused one uses PyTorch's own vector ``sqrt``, which rounds alike there: with it, a few steps
  of the chapter's three trainings give the same weights natively and emulated as a Haswell and
  an EPYC (``make second-machine``). Library code that is not training avoids ``sqrt`` the same way
  (``rsqrt`` and a tensor exponent in ``quant.awq``).
- ``ONEDNN_MAX_CPU_ISA=AVX2`` — oneDNN's cap; no effect measured on the chapter's models (they
  never reach oneDNN), set so a convolution added later cannot reintroduce the difference.
- one thread for every computation whose result is stored (``single_thread``, ONNX Runtime
  sessions with ``intra_op_num_threads=1``): reductions then run in one order on any core count.

ONNX Runtime has no such switch: its MLAS kernels dispatch on the CPU (AVX-512, AVX2, VNNI for
INT8), so numbers it computes may differ in the last digits between machines. The notebooks
declare a tolerance for those cells (``mldeploy.book.nbval_tolerance``).

Nothing is pinned by importing ``mldeploy``: the process that computes numbers to be stored asks
for it, before it computes anything, with ``pin_compute_path()`` (the notebooks' first cell, the
demo's ``main``, ``tests/conftest.py``, the nbval plugin for the kernels it starts). The variables
are read when each library first computes, so the pin works after ``import torch`` as long as
nothing has been computed yet; when PyTorch has already chosen other kernels, the call says so
instead of pinning in name only. Code that writes a cache of trained weights calls
``require_pinned()`` first, so a cache never holds numbers from an unpinned process.
``MLDEPLOY_NATIVE_CPU=1`` turns the pin off, e.g. to time the fastest kernels.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from mldeploy import settings

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PINNED_TORCH = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports once pinned
OPT_OUT = settings.env_name(settings.ToolSettings, "native_cpu")
HOW = (
    "call mldeploy.reproducibility.pin_compute_path() before torch computes anything "
    f"(in a notebook: restart the kernel), or set {OPT_OUT}=1 to use the CPU's own kernels"
)


class NotPinned(RuntimeError):
    """Numbers that will be stored would come from another compute path than the pinned one."""


def pinned() -> bool:
    """Whether the pin applies (it does unless ``MLDEPLOY_NATIVE_CPU`` is set to a true value)."""
    return not settings.tools().native_cpu


def pin_compute_path() -> None:
    """Pin PyTorch, MKL and oneDNN to their AVX2 path in this process and the ones it starts.

    Raises ``NotPinned`` if PyTorch has already computed here on other kernels (MKL and oneDNN
    cannot be asked: call it first). Does nothing with ``MLDEPLOY_NATIVE_CPU=1``. Safe to call
    more than once.
    """
    if not pinned():
        return
    os.environ.update(PINNED_ENV)
    if "torch" in sys.modules:  # imported: it may have chosen its kernels already
        capability = torch_capability()
        if capability != PINNED_TORCH:
            raise NotPinned(
                f"PyTorch already computed with {capability} kernels, before the pin to "
                f"{PINNED_TORCH}: {HOW}"
            )


def require_pinned() -> None:
    """Raise ``NotPinned`` unless this process computes on the pinned path (or opted out)."""
    if not pinned():
        return
    wrong = [
        f"{k}={os.environ.get(k, '(unset)')}"
        for k, v in PINNED_ENV.items()
        if os.environ.get(k) != v
    ]
    if wrong:
        raise NotPinned(f"the compute path is not pinned ({', '.join(wrong)}): {HOW}")
    capability = torch_capability()
    if capability != PINNED_TORCH:
        raise NotPinned(f"PyTorch computes with {capability} kernels, not {PINNED_TORCH}: {HOW}")


def torch_capability() -> str:
    """The kernel family PyTorch dispatches to in this process (e.g. ``AVX2``)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def describe() -> str:
    """One line for notebooks and reports: the compute path in use."""
    mode = "pinned" if pinned() else f"native ({OPT_OUT} set)"
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


def kernel_fingerprint() -> dict[str, str]:
    """Short digests of what training computes on fixed inputs, one thread: MKL's ``sgemm``,
    ``dgemm``, LAPACK's ``inv`` and ``cholesky``, VML's ``exp``, and ten steps of the fused AdamW
    the library trains with. Equal digests on two machines mean the same bits. Call after
    ``pin_compute_path()``; ``make second-machine`` compares it on emulated Intel and AMD CPUs."""
    import hashlib

    import torch

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 256, generator=g), torch.randn(256, 384, generator=g)
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)
    h = x.T @ x
    w = torch.nn.Parameter(torch.randn(4096, generator=g))
    optimizer = torch.optim.AdamW([w], lr=1e-2, fused=True)
    for _ in range(10):
        w.grad = torch.randn(4096, generator=g)
        optimizer.step()
    return {
        "sgemm": digest(a @ b),
        "dgemm": digest(h),
        "inv": digest(torch.linalg.inv(h)),
        "cholesky": digest(torch.linalg.cholesky(h)),
        "exp": digest(torch.exp(a)),
        "adamw": digest(w),
    }
