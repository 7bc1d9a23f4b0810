"""Shared fixtures: one trained two-moons model and its exports, built once per test session.

The session pins its compute path (and that of the processes tests start) before anything is
computed, as the notebooks' first cells do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mldeploy import data, export, models, reproducibility, settings, training


def pytest_configure(config: pytest.Config) -> None:
    tool_settings()  # a bad MLDEPLOY_* value stops the session here, with its one line
    reproducibility.pin_compute_path()


# Chromium aborts its open requests (net::ERR_NETWORK_CHANGED) whenever a container engine adds or
# removes a network interface, so the files that drive chromium and the files that start containers
# run one after another on one pytest-xdist worker. Every other file runs whole on one worker
# (module fixtures built once, notebook cells in order), as with --dist loadfile.
ONE_WORKER = {"test_browser.py", "test_notebook_views.py", "test_image.py", "5.4-docker.ipynb"}
ONE_WORKER_GROUP = "chromium-and-containers"
# The longest units start first (by --durations on 2 cores), so that no long file is the last to
# start while the other workers sit idle. The rest follow, most tests first (pytest-xdist's order).
# A stale list costs time, never a check: every file runs whatever its place.
LONGEST_FIRST = [
    ONE_WORKER_GROUP,  # about 300 s
    "5.6b-llm-onnx-int4.ipynb",  # trains the Llama on a cold cache (about 250 s) or loads it
    "5.3c-quantization-gguf-qat-curves.ipynb",  # about 120 s
    "test_quantization.py",
    "5.2-inference-service.ipynb",
    "test_book.py",
    "test_reproducibility.py",
    "5.5-full-demo.ipynb",
    "5.3b-quantization-int4-gptq-awq.ipynb",
]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook (make test: -n 3 --dist loadfile)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesChromiumApartFromContainers(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return ONE_WORKER_GROUP if Path(file).name in ONE_WORKER else file

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "ordered", False):  # once, before the first unit goes out
                self.ordered = True
                rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
                units = sorted(
                    self.workqueue.items(),  # sorted() is stable: the rest keep their order
                    key=lambda unit: rank.get(Path(unit[0]).name, len(rank)),
                )
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            # the group is the longest unit: its worker takes nothing more until it is done
            group = self.assigned_work.get(node, {}).get(ONE_WORKER_GROUP)
            if group is None or all(group.values()):
                super()._reschedule(node)

    return FilesChromiumApartFromContainers(config, log)


@pytest.fixture(scope="session")
def split() -> data.Split:
    return data.load_moons()


@pytest.fixture(scope="session")
def trained_model(split: data.Split) -> models.SimpleMLP:
    return training.train_two_moons().model


@pytest.fixture(scope="session")
def exported(
    trained_model: models.SimpleMLP, split: data.Split, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return export.export_all(trained_model, torch.from_numpy(split.x_train[:8]), out)


def tool_settings() -> settings.ToolSettings:
    """``mldeploy.settings.ToolSettings``; a bad value stops the session with its one line."""
    try:
        return settings.tools()
    except settings.SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None


def timeout_factor() -> float:
    """``MLDEPLOY_TIMEOUT_FACTOR`` (default 1): stretches every test timeout on a loaded machine."""
    return tool_settings().timeout_factor


@pytest.fixture(scope="session")
def scaled() -> Callable[[float], float]:
    """``scaled(seconds)``: a timeout stretched by ``MLDEPLOY_TIMEOUT_FACTOR``."""
    factor = timeout_factor()
    return lambda seconds: seconds * factor


@pytest.fixture(scope="module")
def browser():
    """Headless chromium for the browser tests (tests/browsing.py)."""
    import browsing

    with browsing.chromium() as chromium:
        yield chromium
