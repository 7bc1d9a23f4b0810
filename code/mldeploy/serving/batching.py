"""Dynamic micro-batching: gather concurrent single-sample requests into one model call.

The event loop only queues work and wakes futures; every model call runs in a worker thread, so
the server keeps answering while a batch is computed. Whole ``/predict_batch`` jobs go through
the same worker, in a bounded queue of their own, taking turns with the samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("mldeploy.errors")
Gone = Callable[[], bool] | None  # True once the request's client has disconnected


class QueueFull(Exception):
    """A queue is at its bound: answer 503 with ``Retry-After`` and let the client retry."""


class Unavailable(Exception):
    """The batcher is stopped or its worker died: answer 503."""


class ClientGone(Exception):
    """The client disconnected before its sample was computed: it never will be."""


class ModelError(Exception):
    """The model failed or returned something unusable: a server fault (500)."""


class DeadlineExceeded(Exception):
    """The request waited ``timeout_s`` without an answer: 504, and it is never computed."""


@dataclass(slots=True)
class _Item:
    x: np.ndarray | list[float]  # one sample or, for a job, a whole (n, features) batch
    future: asyncio.Future
    gone: Gone = None
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One sample's probabilities (plain floats) and the size of the batch it rode in."""

    probabilities: list[float]
    batch_size: int

    @property
    def label(self) -> int:
        """The most probable class (the first of equals, as ``numpy.argmax``)."""
        return self.probabilities.index(max(self.probabilities))


@dataclass
class Hooks:
    """Callbacks that feed metrics; each gets plain numbers."""

    batch: Callable[[int, float], None] = lambda size, seconds: None
    queue_wait: Callable[[float], None] = lambda seconds: None
    model_error: Callable[[], None] = lambda: None
    skipped: Callable[[], None] = lambda: None  # a request whose client left, never computed


class MicroBatcher:
    """Collects samples submitted from the event loop and runs them through ``predict`` in batches.

    - A batch closes at ``max_batch_size`` samples or once its oldest has waited ``max_wait_s``;
      it waits only for as many as the previous batch had, so a lone request runs at once.
    - At most ``max_queue`` samples and ``max_jobs`` jobs wait; beyond that: :class:`QueueFull`.
    - A request unanswered ``timeout_s`` after it was submitted fails with
      :class:`DeadlineExceeded`; if it was still waiting, it is never computed.
    - The worker is supervised: a failure fails that batch's requests (:class:`ModelError`), and
      the worker carries on; if it stops, every waiting request fails (:class:`Unavailable`).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 128,
        max_jobs: int = 2,
        timeout_s: float = math.inf,
        hooks: Hooks | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_jobs < 1 or not 0 <= max_wait_s < 60:
            raise ValueError("max_batch_size, max_queue, max_jobs >= 1 and 0 <= max_wait_s < 60")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0 (inf: no deadline)")
        self.predict, self.executor, self.hooks = predict, executor, hooks or Hooks()
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.max_jobs, self.timeout_s = max_jobs, timeout_s
        self._samples: collections.deque[_Item] = collections.deque()
        self._jobs: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._last_batch_size = 0
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._samples)

    @property
    def healthy(self) -> bool:
        """The worker is running (a dead worker would leave every request hanging)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.work(), name="micro-batcher")
        self._task.add_done_callback(lambda _: self._fail_waiting())

    async def stop(self) -> None:
        """Stop the worker; every request still waiting fails with :class:`Unavailable`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, x: np.ndarray | list[float], gone: Gone = None) -> BatchResult:
        """Queue one sample (a list or 1-D array) and wait for its result."""
        return await self._enqueue(self._samples, self.max_queue, x, gone)

    async def submit_job(self, x: np.ndarray, gone: Gone = None) -> np.ndarray:
        """Queue a whole (n, features) batch for one model call of its own; wait for its rows."""
        return await self._enqueue(self._jobs, self.max_jobs, x, gone)

    async def _enqueue(self, queue: collections.deque, bound: int, x: object, gone: Gone) -> Any:
        if not self.healthy:
            raise Unavailable("the model worker is not running")
        if len(queue) >= bound:
            raise QueueFull(f"{len(queue)} already waiting")
        item = _Item(x, asyncio.get_running_loop().create_future(), gone)
        queue.append(item)
        self._arrived.set()
        timeout = None if math.isinf(self.timeout_s) else self.timeout_s
        try:  # on timeout wait_for cancels the future: the worker then skips the item
            return await asyncio.wait_for(item.future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer in {self.timeout_s:g} s") from None

    async def work(self) -> None:
        """The background task: one batch (or job) after another until it is cancelled. A failure
        fails that batch's requests and the loop carries on."""
        jobs_turn = False
        while True:
            if not self._samples and not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            jobs_turn = not jobs_turn  # samples and jobs take turns: neither can starve the other
            batch: list[_Item] = []
            try:
                if self._jobs and (jobs_turn or not self._samples):
                    self._take(self._jobs, batch, 1)
                    await self._run_job(batch)
                else:
                    await self.gather(batch)
                    await self.run_batch(batch)
            except asyncio.CancelledError:
                _fail(batch, Unavailable("the server is shutting down"))
                raise
            except Exception as exc:  # supervise: fail this batch, serve the next
                log.exception("model call failed")
                self.hooks.model_error()
                _fail(batch, ModelError(f"{type(exc).__name__}: {exc}"))

    async def gather(self, batch: list[_Item]) -> None:
        """Take samples until the batch is as large as the previous one or ``max_wait_s`` ends."""
        self._take(self._samples, batch, self.max_batch_size)
        expected = min(self._last_batch_size, self.max_batch_size)
        while batch and len(batch) < expected:
            left = batch[0].enqueued_at + self.max_wait_s - time.perf_counter()
            self._arrived.clear()
            if left <= 0 or not await _wait(self._arrived, left):
                break
            self._take(self._samples, batch, self.max_batch_size - len(batch))
        self._last_batch_size = len(batch) or self._last_batch_size

    def _take(self, queue: collections.deque, batch: list[_Item], limit: int) -> None:
        now = time.perf_counter()
        while queue and len(batch) < limit:
            item = queue.popleft()
            if item.future.done():  # past its deadline
                continue
            if item.gone is not None and item.gone():  # the client left: never compute it
                item.future.set_exception(ClientGone())  # not cancel(): that would end the
                self.hooks.skipped()  # request's task with a CancelledError, logged as a fault
                continue
            self.hooks.queue_wait(now - item.enqueued_at)
            batch.append(item)

    async def _call(self, x: np.ndarray) -> np.ndarray:
        """One model call in the worker thread; one output row per input row."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        proba = np.asarray(await loop.run_in_executor(self.executor, self.predict, x))
        if proba.ndim != 2 or len(proba) != len(x):
            raise ModelError(f"the model returned shape {proba.shape} for input {x.shape}")
        self.hooks.batch(len(x), time.perf_counter() - start)
        return proba

    async def run_batch(self, batch: list[_Item]) -> None:
        """One model call for the batch; each request gets its own row (or a ModelError)."""
        if not batch:
            return
        proba = await self._call(np.array([item.x for item in batch], dtype=np.float32))
        finite = np.isfinite(proba).all(axis=1).tolist()
        for item, row, ok in zip(batch, proba.tolist(), finite):
            if item.future.done():
                continue
            if ok:
                item.future.set_result(BatchResult(row, len(batch)))
            else:
                item.future.set_exception(ModelError("non-finite output"))

    async def _run_job(self, batch: list[_Item]) -> None:
        for item in batch:
            rows = await self._call(np.asarray(item.x, dtype=np.float32))
            if not item.future.done():
                item.future.set_result(rows)

    def _fail_waiting(self) -> None:
        _fail([*self._samples, *self._jobs], Unavailable("the model worker stopped"))
        self._samples.clear()
        self._jobs.clear()


def _fail(items: list[_Item], exc: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; True if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
