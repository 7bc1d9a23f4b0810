"""What one app holds while it runs: settings, metrics, the model, its worker, its batcher."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mldeploy.serving.batching import Hooks, MicroBatcher
from mldeploy.serving.hardening import Admission
from mldeploy.serving.metrics import ServiceMetrics
from mldeploy.serving.predictors import Predictor
from mldeploy.serving.schemas import N_FEATURES
from mldeploy.settings import ServiceSettings

MODEL_THREAD = "model"  # name prefix of the model thread (``__main__`` waits for it at exit)


class Service:
    """The model's life (load, check, warm up, serve, stop) and the answers of the probes."""

    def __init__(self, load_predictor: Callable[[], Predictor], settings: ServiceSettings):
        self.load_predictor, self.settings = load_predictor, settings
        self.metrics = ServiceMetrics(
            lambda: float(self.batcher.queue_depth if self.batcher else 0)
        )
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.draining = False  # set on SIGTERM: /ready answers 503 while requests still flow
        self.batch_size = settings.max_batch_size if settings.batching else 1
        # as many requests as the batcher can hold: a full queue plus the batch being computed
        limits = {
            "/predict": settings.max_queue + self.batch_size,
            "/predict_batch": settings.max_batch_jobs + 1,
        }
        self.admission = Admission(limits, on_refuse=self.metrics.shed.inc)

    def load(self) -> None:
        """Load the model in the model thread, check it against the API and warm it up."""
        # one model thread: ONNX Runtime releases the GIL, so the event loop keeps serving
        self.executor = self.executor or ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        try:
            self.predictor = self.executor.submit(self._load_and_check).result()
        except Exception as exc:
            self.executor.shutdown(wait=False)
            self.executor = None
            raise RuntimeError(f"could not load the model: {exc}") from exc

    def _load_and_check(self) -> Predictor:
        model = self.load_predictor()
        if model.n_features not in (N_FEATURES, -1):
            raise ValueError(f"it takes {model.n_features} features, the API sends {N_FEATURES}")
        # warm-up: the first call of each size allocates and proves the output has the right shape
        for n in (1, self.settings.max_batch_size, self.settings.max_batch_items):
            out = np.asarray(model.predict_proba(np.zeros((n, N_FEATURES), np.float32)))
            if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 2:
                raise ValueError(
                    f"for {n} samples it returned shape {out.shape}, not ({n}, classes)"
                )
            if not np.isfinite(out).all():
                raise ValueError("it returned non-finite probabilities for a zero input")
        return model

    def start(self) -> None:
        """Start the batcher (on the running event loop); the model must be loaded."""
        s, m = self.settings, self.metrics
        self.batcher = MicroBatcher(
            self.predictor.predict_proba,  # type: ignore[union-attr]
            self.executor,  # type: ignore[arg-type]
            max_batch_size=self.batch_size,
            max_wait_s=s.max_wait_ms / 1e3 if s.batching else 0.0,
            max_queue=s.max_queue,
            max_jobs=s.max_batch_jobs,
            timeout_s=s.request_timeout_s,
            hooks=Hooks(m.observe_batch, m.queue_wait.observe, m.model_errors.inc, m.abandoned.inc),
        )
        self.batcher.start()

    async def stop(self) -> None:
        batcher, self.batcher, self.predictor = self.batcher, None, None
        if batcher is not None:
            await batcher.stop()  # every waiting request is answered 503
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    # --- probes: one answer for the API port and the admin port (``hardening.AdminServer``) ----
    def health_probe(self) -> tuple[int, dict]:
        """Liveness: fails once the model worker has died, so the orchestrator restarts us."""
        live = self.batcher is None or self.batcher.healthy
        body = {"status": "ok" if live else "failing", "model_loaded": self.batcher is not None}
        return (200 if live else 503), body

    def ready_probe(self) -> tuple[int, dict]:
        """Readiness: the model is loaded and warm, the worker runs, and we are not draining."""
        ready = self.batcher is not None and self.batcher.healthy and not self.draining
        return (200 if ready else 503), {"ready": ready}

    def metrics_page(self) -> tuple[int, bytes, str]:
        return 200, self.metrics.render(), self.metrics.content_type
