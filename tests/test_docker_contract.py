"""What the serving image does, reproduced without a Docker engine.

The Dockerfile's runtime stage is replayed on this machine: its build context is filtered through
``.dockerignore``, its COPY lines fill a scratch root, ``/opt/venv`` is a virtual environment built
from ``requirements-serve.txt`` alone (cached in ``artifacts/cache/serve-venv/<hash>``), its RUN
checks run, and its CMD and HEALTHCHECK run with its ENV, as its unprivileged USER.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from mldeploy import runtime
from mldeploy.image import dockerfile, footprint
from mldeploy.paths import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements-serve.txt"
CACHE = REPO_ROOT / "artifacts" / "cache" / "serve-venv"
VENV_IN_IMAGE = "/opt/venv"


def _serve_venv_key() -> str:
    """Cache key: the requirements file and the Python version it is installed for."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + platform.python_version().encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def serve_venv() -> Path:
    """A fresh venv with requirements-serve.txt alone, as the builder stage makes it."""
    target = CACHE / _serve_venv_key()
    done = target / ".complete"
    if done.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)  # a half-built one from an interrupted run
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=120)
    proc = subprocess.run(
        [
            str(target / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--requirement",
            str(REQUIREMENTS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(
            "cannot install requirements-serve.txt into a fresh environment:\n"
            + proc.stdout
            + proc.stderr
        )
    done.touch()
    return target


@pytest.fixture(scope="session")
def parsed() -> dockerfile.Dockerfile:
    return dockerfile.load(REPO_ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def artifacts() -> None:
    """The one documented command that puts the model into the build context."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "artifacts"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def context(artifacts: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context as the builder receives it: only what .dockerignore lets through."""
    rules = dockerfile.parse_dockerignore((REPO_ROOT / ".dockerignore").read_text(encoding="utf-8"))
    out = tmp_path_factory.mktemp("context")
    for rel in dockerfile.context_files(REPO_ROOT, rules):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, out / rel)
    return out


def test_every_copy_source_is_in_the_build_context(parsed, context):
    for stage in parsed.stages:
        for spec in parsed.copies(stage):
            if spec.from_stage:
                assert spec.from_stage in {s.name for s in parsed.stages}, (
                    f"line {spec.line}: unknown stage"
                )
                continue
            for source in spec.sources:
                path = context / source
                assert path.exists(), (
                    f"line {spec.line}: COPY source {source} is not in the build context"
                )
                if path.is_dir():
                    assert any(path.rglob("*.py")), (
                        f"line {spec.line}: {source} is empty in the build context"
                    )


@dataclass
class ImageRoot:
    """A scratch directory standing in for the image's file system, and the container's ENV."""

    root: Path
    env: dict[str, str]
    workdir: Path
    user: tuple[int, int]

    def argv(self, args: list[str]) -> list[str]:
        """Resolve the program through the container's PATH; drop to USER when running as root."""
        program = shutil.which(args[0], path=self.env["PATH"])
        assert program, f"{args[0]} is not on the image's PATH"
        command = [program, *args[1:]]
        if os.geteuid() == 0:
            uid, gid = self.user
            command = [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                "--",
                *command,
            ]
        return command

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(args),
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            **kwargs,
        )


def _rebase(value: str, mapping: dict[str, Path]) -> str:
    """Map container paths in an ENV value (``:``-separated lists too) to their stand-ins here."""
    parts = []
    for item in value.split(":"):
        for prefix, local in mapping.items():
            if item == prefix or item.startswith(prefix + "/"):
                item = str(local) + item[len(prefix) :]
                break
        parts.append(item)
    return ":".join(parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _assemble(
    parsed: dockerfile.Dockerfile, stage: dockerfile.Stage, context: Path, venv: Path
) -> Iterator[ImageRoot]:
    """Replay a runtime stage: COPY into a scratch root, run its RUN checks, resolve ENV and USER.

    ``venv`` stands in for the ``/opt/venv`` the stage copies from its builder stage.
    """
    root = Path(tempfile.mkdtemp(prefix="image-root-"))
    root.chmod(0o755)  # the unprivileged user must be able to read it, as in the image
    mapping = {VENV_IN_IMAGE: venv}
    try:
        for spec in parsed.copies(stage):
            if spec.from_stage:
                assert spec.sources == (VENV_IN_IMAGE,), (
                    f"line {spec.line}: only the virtual environment comes from a builder"
                )
                continue
            dest = root / spec.dest.lstrip("/")
            for source in spec.sources:
                src = context / source
                if src.is_dir():  # COPY dir/ dest/ copies the folder's contents
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                else:
                    target = dest / src.name if spec.dest.endswith("/") else dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
                top = spec.dest.lstrip("/").split("/")[0]
                mapping.setdefault("/" + top, root / top)
        for folder in root.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        image_env = parsed.env(stage, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        env = {name: _rebase(value, mapping) for name, value in image_env.items()}
        uid, _, gid = stage.last("USER").args.partition(":")
        image = ImageRoot(
            root, env, Path(_rebase(parsed.workdir(stage), mapping)), (int(uid), int(gid or uid))
        )
        # the RUN lines of a runtime stage (checksum checks) run where their WORKDIR says
        workdir = parsed.workdir(stage, before=stage.line)
        for instr in stage.instructions:
            if instr.keyword == "WORKDIR":
                workdir = os.path.join(workdir, instr.args)
            elif instr.keyword == "RUN":
                args = shlex.split(instr.args)
                assert args[:2] == ["sha256sum", "--check"], (
                    f"line {instr.line}: unexpected RUN in the runtime stage"
                )
                proc = subprocess.run(
                    args, cwd=_rebase(workdir, mapping), capture_output=True, text=True
                )
                assert proc.returncode == 0, f"line {instr.line}: {proc.stdout}{proc.stderr}"
        yield image
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def image_root(parsed, context, serve_venv) -> Iterator[ImageRoot]:
    """The default target; its /opt/venv is the builder stage's: requirements-serve.txt alone."""
    assert {spec.from_stage for spec in parsed.copies(parsed.final)} - {None} == {"builder"}
    with _assemble(parsed, parsed.final, context, serve_venv) as image:
        yield image


def test_serve_environment_has_no_torch_but_imports_the_app(image_root):
    no_torch = image_root.run(["python", "-c", "import torch"], timeout=60)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    app = image_root.run(
        ["python", "-c", "import mldeploy.serving, sys; print('torch' in sys.modules)"], timeout=60
    )
    assert app.returncode == 0 and app.stdout.strip() == "False", app.stderr


@contextlib.contextmanager
def _start(image: ImageRoot, cmd: list[str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run CMD as ``docker run -e MLDEPLOY_HOST=127.0.0.1 -e MLDEPLOY_PORT=<free port> ...``
    would; always stop it."""
    port, admin_port = _free_port(), _free_port()
    image.env.update(
        MLDEPLOY_HOST="127.0.0.1", MLDEPLOY_PORT=str(port), MLDEPLOY_ADMIN_PORT=str(admin_port)
    )
    proc = subprocess.Popen(
        image.argv(cmd),
        env=image.env,
        cwd=image.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited:\n" + proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 60 s"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def container(image_root, parsed) -> Iterator[tuple[ImageRoot, subprocess.Popen[str], str]]:
    with _start(image_root, parsed.final.last("CMD").exec_form()) as (proc, url):
        yield image_root, proc, url


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_container_serves_as_non_root_and_its_healthcheck_follows_it(container, parsed):
    image, proc, url = container
    expected = (
        image.user[0] if os.geteuid() == 0 else os.geteuid()
    )  # without root, we cannot switch users
    assert all(uid == expected != 0 for uid in _uids(proc.pid))
    health = httpx.get(url + "/health", timeout=5).json()
    assert health == {**health, "status": "ok", "model_loaded": True}

    answer = httpx.post(url + "/predict", json={"features": [0.5, -0.3]}, timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["model_format"] == "ONNX" and abs(sum(body["probabilities"]) - 1) < 1e-3
    # the same model file, loaded here with the course environment, gives the same class
    session = runtime.make_session(REPO_ROOT / "artifacts" / "serve" / "model.onnx")
    assert body["prediction"] == int(
        runtime.run_session(session, np.array([[0.5, -0.3]], dtype=np.float32)).argmax()
    )
    bad = httpx.post(url + "/predict", json={"features": [0.5]}, timeout=5)
    assert bad.status_code == 422

    probe = parsed.final.last("HEALTHCHECK").exec_form()
    up = image.run(probe, timeout=30)
    assert up.returncode == 0 and up.stdout.strip() == "healthy", up.stdout + up.stderr

    proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
    # uvicorn shuts down gracefully, then re-raises SIGTERM (docker would report exit code 143)
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    logs = proc.stdout.read()
    assert "server stopped cleanly" in logs and "Traceback" not in logs, logs
    down = image.run(probe, timeout=30)
    assert down.returncode != 0 and down.stdout.startswith("unhealthy"), down.stdout + down.stderr


def test_footprint_measured_here_is_the_package_set_the_image_installs(serve_venv):
    # The notebook measures the closure of requirements-serve.txt inside the course environment;
    # it must be the same set of distributions that a fresh install of that file alone brings.
    site = [str(p) for p in (serve_venv / "lib").glob("python3.*/site-packages")]
    fresh = {
        footprint.canonical(d.metadata["Name"]) for d in footprint.metadata.distributions(path=site)
    }
    measured = footprint.measure(REQUIREMENTS)
    assert set(measured.sizes) == fresh - {"pip", "setuptools"}
    in_image = footprint.measure(REQUIREMENTS, paths=site)
    assert abs(in_image.total - measured.total) < 0.1 * in_image.total


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd"), reason="useradd --prefix needs root"
)
def test_user_creation_line_runs_cleanly_and_makes_the_runtime_user(parsed, tmp_path):
    # Run the base stage's groupadd/useradd line against a copy of /etc (``--prefix``),
    # as the build would.
    (run,) = [i for i in parsed.stage("base").all("RUN") if "useradd" in i.args]
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        shutil.copy2(Path("/etc") / name, etc / name)
    shutil.copytree("/etc/default", etc / "default")
    for command in run.args.split("&&"):
        argv = shlex.split(command)
        proc = subprocess.run(
            [argv[0], "--prefix", str(tmp_path), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0 and proc.stderr == "", (
            f"line {run.line}: {command.strip()}: {proc.stderr}"
        )
    entries = {
        line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()
    }
    uid, _, gid = parsed.final.last("USER").args.partition(":")
    created = [fields for name, fields in entries.items() if fields[2] == uid]
    assert len(created) == 1 and created[0][3] == gid and created[0][6].endswith("nologin")


def test_torchscript_target_serves_its_model_with_torch(parsed, context):
    # Its builder adds torch to the serving set;
    # the course environment (which has both) stands in for it.
    stage = parsed.stage("runtime-torchscript")
    assert {spec.from_stage for spec in parsed.copies(stage)} - {None} == {"builder-torch"}
    with _assemble(parsed, stage, context, Path(sys.prefix)) as image:
        with _start(image, stage.last("CMD").exec_form()) as (proc, url):
            answer = httpx.post(url + "/predict", json={"features": [0.5, -0.3]}, timeout=10)
            assert answer.status_code == 200 and answer.json()["model_format"] == "TorchScript"
            probe = image.run(stage.last("HEALTHCHECK").exec_form(), timeout=30)
            assert probe.returncode == 0, probe.stdout + probe.stderr
