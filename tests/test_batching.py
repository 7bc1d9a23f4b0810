"""The micro-batcher on its own: batches form, idle requests do not wait, failures are contained,
the worker survives them, a flood of jobs cannot starve single samples, stop answers everyone."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mldeploy.serving.batching import (
    ClientGone,
    Hooks,
    MicroBatcher,
    ModelError,
    QueueFull,
    Unavailable,
)


class RecordingModel:
    """A toy model: [x0, x1] -> [x0 + x1, x0 - x1]; records batch sizes and threads."""

    def __init__(
        self, delay: float = 0.0, poison: float | None = None, nan_on: float | None = None
    ):
        self.delay, self.poison, self.nan_on = delay, poison, nan_on
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batch_sizes.append(len(x))
        time.sleep(self.delay)
        if self.poison is not None and (x[:, 0] == self.poison).any():
            raise ValueError("poisoned sample")
        out = np.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], axis=1)
        if self.nan_on is not None:
            out[x[:, 0] == self.nan_on] = np.nan
        return out


async def _with_batcher(model, body, **kwargs):
    with ThreadPoolExecutor(1, thread_name_prefix="model") as executor:
        batcher = MicroBatcher(model, executor, **kwargs)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()


def _sample(i: int) -> np.ndarray:
    return np.array([i, 0.5 * i], dtype=np.float32)


def test_concurrent_requests_form_batches_and_each_gets_its_own_answer():
    model = RecordingModel(delay=0.01)

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit(_sample(i)) for i in range(40)))

    results = asyncio.run(_with_batcher(model, body, max_batch_size=16, max_wait_s=0.005))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.probabilities, [1.5 * i, 0.5 * i])
    assert sum(model.batch_sizes) == 40
    assert max(model.batch_sizes) == 16 and len(model.batch_sizes) <= 4
    assert all(1 <= r.batch_size <= 16 for r in results)
    assert model.threads == {
        "model_0"
    }  # the model ran in the worker thread, never on the event loop


def test_a_lone_request_on_an_idle_server_does_not_wait_for_company():
    model = RecordingModel()

    async def body(batcher):
        await batcher.submit(_sample(1))  # warm-up
        start = time.perf_counter()
        await batcher.submit(_sample(2))
        return time.perf_counter() - start

    elapsed = asyncio.run(_with_batcher(model, body, max_batch_size=8, max_wait_s=1.0))
    assert elapsed < 0.5, f"an idle request waited {elapsed:.3f} s (max_wait is 1 s)"
    assert model.batch_sizes == [1, 1]


def test_a_failing_call_fails_its_batch_only_and_a_bad_row_only_its_sample():
    model = RecordingModel(delay=0.01, poison=13.0, nan_on=7.0)

    async def body(batcher):
        first = await asyncio.gather(
            *(batcher.submit(_sample(i)) for i in range(10)), return_exceptions=True
        )
        poisoned = await asyncio.gather(
            *(batcher.submit(_sample(i)) for i in (12, 13)), return_exceptions=True
        )
        after = await batcher.submit(_sample(2))  # the worker carries on
        return first, poisoned, after

    first, poisoned, after = asyncio.run(
        _with_batcher(model, body, max_batch_size=20, max_wait_s=0.005)
    )
    assert [i for i, r in enumerate(first) if isinstance(r, Exception)] == [7]
    assert isinstance(first[7], ModelError)
    assert all(isinstance(r, ModelError) for r in poisoned)  # no serial retries of a failed call
    np.testing.assert_allclose(after.probabilities, [3.0, 1.0])
    assert sum(model.batch_sizes) == 10 + 2 + 1


@pytest.mark.parametrize(
    "fault",
    ["hook raises", "0-d output", "too few rows", "mismatched samples"],
)
def test_the_worker_survives_a_failure_outside_the_model(fault):
    model = RecordingModel()
    broken = {"on": True}

    def predict(x):
        if broken["on"] and fault == "0-d output":
            return np.float32(1.0)
        if broken["on"] and fault == "too few rows":
            return model(x)[:-1]
        return model(x)

    def hook(size, seconds):
        if broken["on"] and fault == "hook raises":
            raise RuntimeError("metrics backend down")

    async def body(batcher):
        bad = [_sample(1), _sample(2)]
        if fault == "mismatched samples":
            bad[1] = np.zeros(3, np.float32)  # np.stack fails outside the model call
        failed = await asyncio.gather(*(batcher.submit(x) for x in bad), return_exceptions=True)
        broken["on"] = False
        return failed, await batcher.submit(_sample(3)), batcher.healthy

    failed, after, healthy = asyncio.run(
        _with_batcher(predict, body, max_batch_size=2, max_wait_s=0.05, hooks=Hooks(batch=hook))
    )
    assert all(isinstance(r, ModelError) for r in failed), failed
    np.testing.assert_allclose(after.probabilities, [4.5, 1.5])
    assert healthy


def test_stop_answers_the_batch_in_flight_and_the_queue():
    model = RecordingModel(delay=0.3)

    async def body(batcher):
        tasks = [asyncio.ensure_future(batcher.submit(_sample(i))) for i in range(3)]
        job = asyncio.ensure_future(batcher.submit_job(np.ones((4, 2), np.float32)))
        await asyncio.sleep(0.1)  # sample 0 is being computed, the rest waits
        await batcher.stop()
        results = await asyncio.gather(*tasks, job, return_exceptions=True)
        with pytest.raises(Unavailable):
            await batcher.submit(_sample(9))
        return results

    results = asyncio.run(_with_batcher(model, body, max_batch_size=1, max_wait_s=0.0))
    assert all(isinstance(r, Unavailable) for r in results), results


def test_a_flood_of_jobs_cannot_starve_single_samples():
    model = RecordingModel(delay=0.02)

    async def body(batcher):
        jobs = [
            asyncio.ensure_future(batcher.submit_job(np.ones((64, 2), np.float32)))
            for _ in range(6)
        ]
        await asyncio.sleep(0.005)
        start = time.perf_counter()
        await batcher.submit(_sample(1))
        waited = time.perf_counter() - start
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        return waited, outcomes

    waited, outcomes = asyncio.run(
        _with_batcher(model, body, max_batch_size=8, max_wait_s=0.0, max_jobs=2)
    )
    refused = [o for o in outcomes if isinstance(o, QueueFull)]
    assert len(refused) == 4  # only two jobs may wait; the rest are refused at once
    assert waited < 0.2, f"a single sample waited {waited:.3f} s behind the jobs"


def test_a_full_queue_refuses_at_once_and_serves_what_it_accepted():
    model = RecordingModel(delay=0.6)

    async def body(batcher):
        tasks = [
            asyncio.ensure_future(batcher.submit(_sample(i))) for i in range(5)
        ]  # 3 queue, 2 refused
        await asyncio.sleep(0.15)  # the worker now computes sample 0; samples 1 and 2 wait
        tasks.append(asyncio.ensure_future(batcher.submit(_sample(5))))
        await asyncio.sleep(0)  # the queue is full again
        start = time.perf_counter()
        with pytest.raises(QueueFull):
            await batcher.submit(_sample(99))
        refused_in = time.perf_counter() - start
        return refused_in, await asyncio.gather(*tasks, return_exceptions=True)

    refused_in, results = asyncio.run(
        _with_batcher(model, body, max_batch_size=1, max_wait_s=0.0, max_queue=3)
    )
    assert refused_in < 0.3  # at once, not after the running 0.6 s model call
    assert [isinstance(r, QueueFull) for r in results] == [False, False, False, True, True, False]
    assert model.batch_sizes == [1, 1, 1, 1]


def test_settings_are_checked():
    with ThreadPoolExecutor(1) as executor:
        for bad in ({"max_batch_size": 0}, {"max_queue": 0}, {"max_wait_s": -1}):
            with pytest.raises(ValueError):
                MicroBatcher(lambda x: x, executor, **bad)


def test_steady_small_concurrency_does_not_wait_for_a_full_batch():
    model = RecordingModel(delay=0.01)

    async def client(batcher, i):
        for round_ in range(5):
            await batcher.submit(_sample(10 * i + round_))

    async def body(batcher):
        start = time.perf_counter()
        await asyncio.gather(*(client(batcher, i) for i in range(4)))
        return time.perf_counter() - start

    elapsed = asyncio.run(_with_batcher(model, body, max_batch_size=32, max_wait_s=0.3))
    assert elapsed < 0.6, (
        f"4 steady clients took {elapsed:.2f} s: batches waited for company that never came"
    )
    assert max(model.batch_sizes) == 4


def test_every_model_call_runs_in_the_model_thread():
    """Samples and whole jobs, cheap as they are: none runs on the event loop's thread."""

    async def body(batcher):
        await batcher.submit(_sample(1))
        await batcher.submit_job(np.stack([_sample(2), _sample(3)]))

    model = RecordingModel()
    asyncio.run(_with_batcher(model, body))
    assert len(model.batch_sizes) == 2
    assert model.threads == {"model_0"}


def test_a_sample_whose_client_left_is_never_computed_and_fails_with_client_gone():
    model = RecordingModel(delay=0.05)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(_sample(0)))  # keeps the model busy
        await asyncio.sleep(0.01)
        left = asyncio.ensure_future(batcher.submit(_sample(1), gone=lambda: True))
        await first
        # an exception of its own, not a cancelled task (uvicorn logs that as a server fault)
        with pytest.raises(ClientGone):
            await left

    asyncio.run(_with_batcher(model, body))
    assert model.batch_sizes == [1]  # only the first sample was ever computed
