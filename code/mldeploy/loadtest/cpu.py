"""Which thread of a server is busy: CPU time per thread, read from Linux's ``/proc``; and the
server and its load generators on separate cores (``separate_cores``).

The service runs its event loop on the main thread and the model in one worker thread; under
load, the one near a whole core is the one that bounds the throughput."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of process ``pid`` has used so far; empty where
    there is no ``/proc`` (macOS) or no such process."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we read
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            used[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return used


def waiting_seconds(pid: int) -> float | None:
    """Seconds the main thread of process ``pid`` has spent runnable but waiting for a CPU (the
    scheduler's run delay, ``/proc/PID/task/PID/schedstat``); None where Linux does not say."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def loop_and_worker_cores(pid: int) -> Iterator[dict[str, float]]:
    """Cores used while the block runs by the main thread (``"loop"``) and by the busiest other
    thread (``"worker"``) of process ``pid``, and the share of the time the main thread waited
    for a CPU (``"loop_waiting"``: other threads had them); the dict is filled when the block
    ends, and stays empty where threads cannot be read. A thread that ends inside the block is
    not counted (``/proc`` forgets it)."""
    before, waited, start = thread_cpu_seconds(pid), waiting_seconds(pid), time.perf_counter()
    cores: dict[str, float] = {}
    yield cores
    after, seconds = thread_cpu_seconds(pid), time.perf_counter() - start
    if not before or not after:
        return
    used = {tid: (t - before.get(tid, 0.0)) / seconds for tid, t in after.items()}
    cores["loop"] = used.pop(pid, 0.0)
    cores["worker"] = max(used.values(), default=0.0)
    waited_after = waiting_seconds(pid)
    if waited is not None and waited_after is not None:
        cores["loop_waiting"] = (waited_after - waited) / seconds


@contextlib.contextmanager
def separate_cores(pid: int) -> Iterator[tuple[set[int], set[int]] | None]:
    """Run the block with every thread of process ``pid`` (the server) on the first half of this
    process's CPUs, and this process, with the load generators it starts, on the other half: as if
    the load came from another machine. Yields the two sets of CPUs, or None where that cannot
    be done (fewer than two CPUs, no CPU affinity as on macOS, or the system refuses to pin the
    server); the affinities are restored after."""
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    tasks = Path(f"/proc/{pid}/task")
    if len(mine) < 2 or not tasks.is_dir():
        yield None
        return
    server, load = set(mine[: len(mine) // 2]), set(mine[len(mine) // 2 :])
    everywhere = os.sched_getaffinity(pid)
    _pin_threads(tasks, server)
    pinned = os.sched_getaffinity(pid) == server  # not, where the system refuses: say so
    if pinned:
        os.sched_setaffinity(0, load)
    try:
        yield (server, load) if pinned else None
    finally:
        os.sched_setaffinity(0, set(mine))
        _pin_threads(tasks, everywhere)  # threads started inside the block too


def _pin_threads(tasks: Path, cpus: set[int]) -> None:
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we pin it
            os.sched_setaffinity(int(task.name), cpus)
