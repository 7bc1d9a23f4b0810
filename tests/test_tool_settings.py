"""One settings object for the tools, and a compute path pinned on request, never by an import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mldeploy import pipeline, reproducibility, settings, timeouts
from mldeploy.book import nbval_tolerance
from mldeploy.image import engine
from mldeploy.paths import REPO_ROOT

CODE = str(REPO_ROOT / "code")
# every MLDEPLOY_ variable the tools read, and CI, each with a value that must be refused
BAD = {
    "MLDEPLOY_TIMEOUT_FACTOR": "abc",
    "MLDEPLOY_NATIVE_CPU": "maybe",
    "MLDEPLOY_ENGINE": "dokcer",
    "MLDEPLOY_PULL_BASE": "2",
}


def _clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: nothing pinned, no MLDEPLOY_ variable, this checkout's library."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": CODE, **extra}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeouts.scaled(120),
    )


def test_importing_the_library_leaves_the_environment_alone():
    code = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import torch\n"  # torch's own import is not ours to judge: compare after it
        "before = dict(os.environ)\n"
        "import mldeploy, mldeploy.pipeline, mldeploy.quant.charlm, mldeploy.llm.training\n"
        "import mldeploy.book.nbval_tolerance, mldeploy.image.build\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()"
        " if before.get(k) != after.get(k)}))\n"
    )
    proc = _python(code, _clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {}


def test_the_pin_is_explicit_and_sets_the_documented_variables():
    proc = _python(
        "import os\n"
        "from mldeploy import reproducibility\n"
        "reproducibility.pin_compute_path()\n"
        "import torch\n"
        "print(sorted((k, os.environ[k]) for k in reproducibility.PINNED_ENV),"
        " torch.backends.cpu.get_cpu_capability())\n",
        _clean_env(ATEN_CPU_CAPABILITY="default"),  # a caller's shell asking for other kernels
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = sorted(reproducibility.PINNED_ENV.items())
    assert proc.stdout.strip() == f"{expected} {reproducibility.PINNED_TORCH}"


def test_pinning_after_torch_computed_elsewhere_is_refused():
    proc = _python(
        "import torch\n"
        "torch.ones(8).sum()\n"  # PyTorch chooses its kernels here, from ATEN_CPU_CAPABILITY
        "from mldeploy import reproducibility\n"
        "try:\n"
        "    reproducibility.pin_compute_path()\n"
        "except reproducibility.NotPinned as exc:\n"
        "    print('refused:', exc)\n",
        _clean_env(ATEN_CPU_CAPABILITY="default"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: PyTorch already computed with DEFAULT kernels")
    assert "pin_compute_path()" in proc.stdout and "MLDEPLOY_NATIVE_CPU=1" in proc.stdout


def test_the_opt_out_leaves_the_environment_alone():
    proc = _python(
        "import os\n"
        "from mldeploy import reproducibility\n"
        "reproducibility.pin_compute_path(); reproducibility.require_pinned()\n"
        "print(os.environ.get('ATEN_CPU_CAPABILITY'), reproducibility.pinned())\n",
        _clean_env(MLDEPLOY_NATIVE_CPU="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", "False"]


def test_a_cache_of_trained_weights_is_never_written_unpinned(tmp_path, monkeypatch):
    from mldeploy.quant import charlm

    monkeypatch.setenv("MLDEPLOY_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("MKL_CBWR")
    with pytest.raises(reproducibility.NotPinned, match=r"MKL_CBWR=\(unset\)"):
        charlm.cached_charlm(charlm.CharLMConfig(hidden=16, steps=1))
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_reader_gives_the_same_line_for_the_same_bad_value(name, monkeypatch, capsys):
    monkeypatch.setenv(name, BAD[name])
    line = f"bad setting: {name}={BAD[name]!r}: "
    errors = []
    for read in (timeouts.factor, reproducibility.pinned, settings.tools):
        with pytest.raises(settings.SettingsError) as info:
            read()
        errors.append(str(info.value))
    with pytest.raises(engine.EngineUnavailable) as info:
        engine.find()
    errors.append(str(info.value))
    config = type("Config", (), {"option": type("Option", (), {"nbval": True})()})()
    with pytest.raises(pytest.UsageError) as info:
        nbval_tolerance.pytest_configure(config)
    errors.append(str(info.value))
    assert pipeline.main([]) == 2
    errors.append(capsys.readouterr().err.strip().removeprefix("error: "))
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith(line) and "\n" not in errors[0], errors[0]


def test_the_test_session_stops_with_the_same_line():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q", __file__],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "MLDEPLOY_TIMEOUT_FACTOR": "0"},
        timeout=timeouts.scaled(120),
    )
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    line = "bad setting: MLDEPLOY_TIMEOUT_FACTOR='0': Input should be greater than 0"
    assert line in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ci_keeps_its_meaning_and_its_own_name(monkeypatch):
    for value, strict in (("true", True), ("True", True), ("1", False), ("", False)):
        monkeypatch.setenv("CI", value)
        assert settings.tools().ci is strict, value
    monkeypatch.delenv("CI")
    assert settings.tools().ci is False
    assert settings.env_name(settings.ToolSettings, "ci") == "CI"


def test_tool_settings_keep_the_names_and_bounds(monkeypatch):
    monkeypatch.setenv("MLDEPLOY_TIMEOUT_FACTOR", " 3 ")
    monkeypatch.setenv("MLDEPLOY_ENGINE", "Podman")
    monkeypatch.setenv("MLDEPLOY_PULL_BASE", "1")
    monkeypatch.setenv("MLDEPLOY_DRIFT_REPORT", "/tmp/drift.json")
    tools = settings.tools()
    assert (tools.timeout_factor, tools.engine, tools.pull_base) == (3.0, "podman", True)
    assert str(tools.drift_report) == "/tmp/drift.json"
    assert timeouts.scaled(2) == 6.0
    monkeypatch.setenv("MLDEPLOY_TIMEOUT_FACTOR", "100")
    assert timeouts.factor() == 100
    for bad in ("101", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("MLDEPLOY_TIMEOUT_FACTOR", bad)
        with pytest.raises(settings.SettingsError, match="MLDEPLOY_TIMEOUT_FACTOR"):
            timeouts.factor()
    monkeypatch.setenv("MLDEPLOY_TIMEOUT_FACTOR", "")
    assert timeouts.factor() == 1.0  # empty means unset, as before
