"""Dynamic micro-batching: gather concurrent single-sample requests into one model call.

The event loop only queues samples and wakes futures; the model runs in a worker thread, so the
server keeps answering ``/health`` and parsing new requests while a batch is computed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """The batcher's queue is at its bound: the caller should answer 503 and let the client retry."""


class SampleRejected(Exception):
    """The model could not produce a finite answer for this one sample (the others are unaffected)."""


@dataclass
class _Item:
    features: np.ndarray
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchResult:
    """One sample's probabilities and the size of the batch it rode in."""

    probabilities: np.ndarray
    batch_size: int


class MicroBatcher:
    """Collects samples submitted from the event loop and runs them through ``predict`` in batches.

    - A batch closes when it has ``max_batch_size`` samples or when ``max_wait_s`` has passed
      since its first sample arrived, whichever comes first.
    - It waits only for as much company as the previous batch had: a lone request on an idle server
      runs at once instead of sleeping ``max_wait_s`` for nobody, and four steady clients make
      batches of four without waiting for a thirty-second sample that never comes.
    - At most ``max_queue`` samples wait; beyond that ``submit`` raises :class:`QueueFull` at once.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 128,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.predict, self.executor = predict, executor
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_batch = on_batch  # called with (batch size, model seconds), e.g. to feed metrics
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._last_batch_size = 0
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._worker(), name="micro-batcher"
            )

    async def stop(self) -> None:
        """Stop the worker and fail whatever still waits (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFull("the server is shutting down"))

    async def submit(self, features: np.ndarray) -> BatchResult:
        """Queue one sample (a 1-D float32 array) and wait for its result."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} samples already waiting")
        item = _Item(features, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._arrived.set()
        return await item.future

    def _take(self, limit: int) -> list[_Item]:
        taken: list[_Item] = []
        while self._pending and len(taken) < limit:
            item = self._pending.popleft()
            if not item.future.done():  # its client gave up (cancelled): do not compute it
                taken.append(item)
        return taken

    async def _worker(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take(self.max_batch_size)
            if not batch:
                continue
            expected = min(self._last_batch_size, self.max_batch_size)
            if len(batch) < expected and self.max_wait_s > 0:
                await self._fill(batch, expected)
            self._last_batch_size = len(batch)
            await self._run(batch)

    async def _fill(self, batch: list[_Item], expected: int) -> None:
        """Wait until the batch has ``expected`` samples or its oldest one has waited ``max_wait_s``."""
        deadline = batch[0].enqueued_at + self.max_wait_s
        while len(batch) < expected:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            # waiting on an Event (not on queue.get) so a timeout can never lose a sample
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
            batch += self._take(
                self.max_batch_size - len(batch)
            )  # take all that came, up to the maximum

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        x = np.stack([item.features for item in batch])
        start = time.perf_counter()
        try:
            proba = await loop.run_in_executor(self.executor, self.predict, x)
        except Exception:
            # one sample broke the whole call: retry one by one so only the culprit fails
            await self._run_singly(batch)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        self._deliver(batch, proba)

    async def _run_singly(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        for item in batch:
            try:
                proba = await loop.run_in_executor(
                    self.executor, self.predict, item.features[None, :]
                )
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(
                        SampleRejected(f"the model failed on this sample: {exc}")
                    )
                continue
            self._deliver([item], proba)

    @staticmethod
    def _deliver(batch: list[_Item], proba: np.ndarray) -> None:
        proba = np.asarray(proba)
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if i >= len(proba):
                item.future.set_exception(
                    SampleRejected("the model returned fewer rows than it was given")
                )
                continue
            row = proba[i]
            if np.isfinite(row).all():
                item.future.set_result(BatchResult(row, len(batch)))
            else:
                item.future.set_exception(
                    SampleRejected("the model produced a non-finite output for this sample")
                )
