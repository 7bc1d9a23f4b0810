"""Dynamic micro-batching: gather concurrent single-sample requests into one model call.

The event loop only queues work and wakes futures; the model runs in a worker thread, so the
server keeps answering while a batch is computed. Every model call of the service goes through
one supervised worker: single samples (batched), whole ``/predict_batch`` jobs, both with bounded
queues, so no path can queue unbounded work or starve the other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("mldeploy.errors")


class QueueFull(Exception):
    """A queue is at its bound: answer 503 with ``Retry-After`` and let the client retry."""


class Unavailable(Exception):
    """The batcher is stopped or its worker died: answer 503."""


class ModelError(Exception):
    """The model failed or returned something unusable: a server fault (500)."""


class DeadlineExceeded(Exception):
    """The request waited ``timeout_s`` without an answer: 504, and it is never computed."""


# kept for callers of the first version; a bad sample is now a model fault like any other
SampleRejected = ModelError


@dataclass(slots=True)
class _Item:
    features: np.ndarray | list[float]  # one sample or, for a job, a whole (n, features) batch
    future: asyncio.Future
    gone: Callable[[], bool] | None = None  # True once the client has disconnected
    enqueued_at: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # perf_counter time after which it is answered 504

    def wanted(self) -> bool:
        return not self.future.done() and not (self.gone is not None and self.gone())


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

    - A batch closes when it has ``max_batch_size`` samples or when ``max_wait_s`` has passed
      since its first sample arrived, whichever comes first.
    - It waits only for as much company as the previous batch had: a lone request on an idle server
      runs at once instead of sleeping ``max_wait_s`` for nobody.
    - At most ``max_queue`` samples and ``max_jobs`` whole batches wait; beyond that ``submit``
      raises :class:`QueueFull` at once. Samples and jobs take turns for the model.
    - A failure anywhere in a round fails that round's requests with :class:`ModelError`; the
      worker carries on. ``stop`` resolves every future still waiting.
    - A request still unanswered ``timeout_s`` after it was submitted fails with
      :class:`DeadlineExceeded`, waiting or computing. All requests share one timer, set for the
      oldest (the timeout is the same for all, so the oldest expires first): a per-request timer
      would cost the event loop more than the rest of the batching does.
    - Every model call runs in ``executor`` (a worker thread), never on the event loop: the loop
      stays free to accept requests and answer probes while ONNX Runtime, which releases the
      GIL, computes.
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
        timeout_s: float = float("inf"),
        hooks: Hooks | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_jobs < 1 or not 0 <= max_wait_s < 60:
            raise ValueError("max_batch_size, max_queue, max_jobs >= 1 and 0 <= max_wait_s < 60")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0 (inf: no deadline)")
        self.predict, self.executor = predict, executor
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.max_jobs, self.timeout_s = max_jobs, timeout_s
        self.hooks = hooks or Hooks()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._pending: collections.deque[_Item] = collections.deque()
        self._jobs: collections.deque[_Item] = collections.deque()
        self._current: list[_Item] = []  # the round being filled or computed
        self._arrived = asyncio.Event()
        # how many waiting samples wake the worker: 1 when it idles; while it fills a batch,
        # the number that completes it (one wake-up per batch, not one per arriving sample)
        self._wake_at = 1
        self._last_batch_size = 0
        self._jobs_turn = False
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def jobs_depth(self) -> int:
        return len(self._jobs)

    @property
    def healthy(self) -> bool:
        """The worker is running (a dead worker would leave every request hanging)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._worker(), name="micro-batcher"
            )
            self._task.add_done_callback(self._worker_ended)

    async def stop(self) -> None:
        """Stop the worker and fail whatever still waits (the server is shutting down)."""
        self._closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(Unavailable("the server is shutting down"))

    def _worker_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batching worker died", exc_info=task.exception())
        self._closed = True
        self._fail_all(Unavailable("the model worker stopped"))

    def _fail_all(self, exc: Exception) -> None:
        for item in [*self._current, *self._pending, *self._jobs]:
            if not item.future.done():
                item.future.set_exception(exc)
        self._current, self._pending, self._jobs = [], collections.deque(), collections.deque()

    def _enqueue(self, queue: collections.deque, bound: int, item: _Item) -> asyncio.Future:
        if self._closed:
            raise Unavailable("the model worker is not running")
        if len(queue) >= bound:
            raise QueueFull(f"{len(queue)} already waiting")
        queue.append(item)
        if self.timeout_s != float("inf"):
            item.deadline = item.enqueued_at + self.timeout_s
            if self._deadline_timer is None:  # else it is set for an older request
                loop = asyncio.get_running_loop()
                self._deadline_timer = loop.call_later(self.timeout_s, self._expire)
        if queue is self._jobs or len(self._pending) >= self._wake_at:
            self._arrived.set()
        return item.future

    async def submit(
        self, features: np.ndarray | list[float], gone: Callable[[], bool] | None = None
    ) -> BatchResult:
        """Queue one sample (its features, as a list or 1-D array) and wait for its result."""
        item = _Item(features, asyncio.get_running_loop().create_future(), gone)
        return await self._enqueue(self._pending, self.max_queue, item)

    async def submit_job(self, x: np.ndarray, gone: Callable[[], bool] | None = None) -> np.ndarray:
        """Queue a whole (n, features) batch for one model call of its own; wait for its rows."""
        item = _Item(x, asyncio.get_running_loop().create_future(), gone)
        return await self._enqueue(self._jobs, self.max_jobs, item)

    def _expire(self) -> None:
        """Fail every request past its deadline; set the timer for the oldest one left."""
        now, oldest = time.perf_counter(), float("inf")
        for item in [*self._current, *self._pending, *self._jobs]:
            if item.future.done():
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded(f"no answer in {self.timeout_s:g} s"))
            else:
                oldest = min(oldest, item.deadline)
        self._deadline_timer = None
        if oldest != float("inf"):
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_later(oldest - now, self._expire)

    def _take(self, queue: collections.deque, limit: int) -> list[_Item]:
        taken: list[_Item] = []
        now = time.perf_counter()
        while queue and len(taken) < limit:
            item = queue.popleft()
            if item.wanted():
                self.hooks.queue_wait(now - item.enqueued_at)
                taken.append(item)
            elif not item.future.done():  # the client left: never compute it
                item.future.cancel()
                self.hooks.skipped()
        return taken

    async def _worker(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                for item in self._current:
                    if not item.future.done():
                        item.future.set_exception(Unavailable("the server is shutting down"))
                raise
            except Exception as exc:  # supervise: fail this round, keep serving the next
                log.exception("model round failed")
                self.hooks.model_error()
                for item in self._current:
                    if not item.future.done():
                        item.future.set_exception(ModelError(f"{type(exc).__name__}: {exc}"))
            finally:
                self._current = []

    async def _round(self) -> None:
        if not self._pending and not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        # samples and jobs take turns, so a flood of either cannot starve the other
        self._jobs_turn = not self._jobs_turn
        if self._jobs and (self._jobs_turn or not self._pending):
            self._current = self._take(self._jobs, 1)
            if self._current:
                item = self._current[0]
                rows = await self._call(item.features)
                if not item.future.done():
                    item.future.set_result(rows)
            return
        batch = self._current = self._take(self._pending, self.max_batch_size)
        if not batch:
            return
        expected = min(self._last_batch_size, self.max_batch_size)
        if len(batch) < expected and self.max_wait_s > 0:
            await self._fill(batch, expected)
        self._last_batch_size = len(batch)
        x = np.array([item.features for item in batch], dtype=np.float32)
        proba = await self._call(x)
        # whole-batch numpy calls, then plain floats: cheaper than numpy calls per sample
        finite = np.isfinite(proba).all(axis=1).tolist()
        for item, row, ok in zip(batch, proba.tolist(), finite):
            if item.future.done():
                continue
            if ok:
                item.future.set_result(BatchResult(row, len(batch)))
            else:
                item.future.set_exception(ModelError("non-finite output"))

    async def _fill(self, batch: list[_Item], expected: int) -> None:
        """Wait until the batch has ``expected`` samples or its oldest has waited ``max_wait_s``."""
        remaining = batch[0].enqueued_at + self.max_wait_s - time.perf_counter()
        if remaining <= 0:
            return
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._arrived.set()

        timer = asyncio.get_running_loop().call_later(remaining, expire)
        try:
            while len(batch) < expected and not expired:
                self._wake_at = expected - len(batch)
                self._arrived.clear()
                if len(self._pending) < self._wake_at:
                    await self._arrived.wait()  # woken by enough samples, a job or the timer
                batch += self._take(self._pending, self.max_batch_size - len(batch))
        finally:
            self._wake_at = 1
            timer.cancel()

    async def _call(self, x: np.ndarray) -> np.ndarray:
        """One model call in the model thread; one output row per input row."""
        start, loop = time.perf_counter(), asyncio.get_running_loop()
        proba = np.asarray(await loop.run_in_executor(self.executor, self.predict, x))
        if proba.ndim != 2 or len(proba) != len(x):
            raise ModelError(f"the model returned shape {proba.shape} for input {x.shape}")
        self.hooks.batch(len(x), time.perf_counter() - start)
        return proba
