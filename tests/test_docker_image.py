"""The Dockerfile, .dockerignore and their helpers, checked without a Docker engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mldeploy.image import checksums, dockerfile, footprint
from mldeploy.paths import REPO_ROOT
from mldeploy.serving import BackgroundServer, create_app_from_env, healthcheck

HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_hadolint_passes_with_no_warning():
    proc = _hadolint(DOCKERFILE)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_hadolint_is_really_linting(tmp_path):
    # The same linter must object to the mistakes the image avoids:
    # unpinned base, root, shell-form CMD.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD uvicorn app:app\n")
    proc = _hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in proc.stdout


@pytest.fixture(scope="module")
def parsed() -> dockerfile.Dockerfile:
    return dockerfile.load(DOCKERFILE)


def test_every_stage_starts_from_one_exactly_pinned_slim_python(parsed):
    names = {s.name for s in parsed.stages}
    images = {s.base for s in parsed.stages if s.base not in names}
    assert len(images) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", images.pop())


def test_runtime_is_the_default_target_and_has_no_torch(parsed):
    final = parsed.final
    assert final.name == "runtime"
    venv_sources = {spec.from_stage for spec in parsed.copies(final) if spec.from_stage}
    assert venv_sources == {"builder"}
    installed = " ".join(
        i.args for s in parsed.lineage(parsed.stage("builder")) for i in s.all("RUN")
    )
    assert "requirements-serve.txt" in installed and "torch" not in installed
    names = {
        footprint.canonical(r.name)
        for r in footprint.read_requirements(REPO_ROOT / "requirements-serve.txt")
    }
    assert "torch" not in names and {"onnxruntime", "fastapi", "uvicorn"} <= names


def test_serve_requirements_are_exact_pins_equal_to_the_course_environment():
    course = {
        footprint.canonical(r.name): r
        for r in footprint.read_requirements(REPO_ROOT / "requirements.txt")
    }
    for name in ("requirements-serve.txt", "requirements-serve-torch.txt"):
        for req in footprint.read_requirements(REPO_ROOT / name):
            spec = str(req.specifier)
            assert spec.startswith("==") and "*" not in spec, f"{name}: {req} is not an exact pin"
            assert course[footprint.canonical(req.name)].specifier == req.specifier, (
                f"{name}: {req} differs"
            )


def test_torchscript_target_adds_exactly_torch(parsed):
    torch_reqs = {
        footprint.canonical(r.name)
        for r in footprint.read_requirements(REPO_ROOT / "requirements-serve-torch.txt")
    }
    onnx_reqs = {
        footprint.canonical(r.name)
        for r in footprint.read_requirements(REPO_ROOT / "requirements-serve.txt")
    }
    assert torch_reqs - onnx_reqs == {"torch"}
    stage = parsed.stage("runtime-torchscript")
    env = parsed.env(stage)
    assert env["MLDEPLOY_BACKEND"] == "torchscript" and env["MLDEPLOY_MODEL"].endswith(".pt")
    assert {spec.from_stage for spec in parsed.copies(stage) if spec.from_stage} == {
        "builder-torch"
    }


@pytest.mark.parametrize("target", ["runtime", "runtime-torchscript"])
def test_runtime_targets_run_unprivileged_expose_their_port_and_check_health(parsed, target):
    stage = parsed.stage(target)
    user, _, group = stage.last("USER").args.partition(":")
    assert (
        user.isdigit() and int(user) > 0 and group.isdigit() and int(group) > 0
    )  # numeric: K8s can verify
    env = parsed.env(stage)
    assert stage.last("EXPOSE").args.split() == [env["MLDEPLOY_PORT"], env["MLDEPLOY_ADMIN_PORT"]]
    assert stage.last("CMD").exec_form() == ["python", "-m", "mldeploy.serving"]
    assert stage.last("HEALTHCHECK").exec_form() == ["python", "-m", "mldeploy.serving.healthcheck"]
    flags, _ = stage.last("HEALTHCHECK").flags()
    assert {"interval", "timeout", "retries"} <= set(flags)
    # the model is checked against its recorded digest at build time
    model = Path(env["MLDEPLOY_MODEL"]).name
    assert any(f"sha256sum --check --strict {model}.sha256" in i.args for i in stage.all("RUN"))


def test_parser_handles_continuations_args_and_env_expansion():
    # As in Docker, a variable set on an ENV line is visible from the next line on,
    # not on its own line.
    text = (
        "ARG IMG=python:3.11.9-slim\n"
        "# c\n"
        "FROM ${IMG} AS a\n"
        "ENV A=1\n"
        "ENV A=2 \\\n"
        "  # inner comment\n"
        '  B="$A two"\n'
        "FROM a AS b\n"
        "ENV PATH=/x:$PATH\n"
        "COPY --from=a /src ./d/\n"
    )
    parsed = dockerfile.parse(text)
    assert [(s.base, s.name) for s in parsed.stages] == [("python:3.11.9-slim", "a"), ("a", "b")]
    assert parsed.env(parsed.final, {"PATH": "/bin"}) == {"A": "2", "B": "1 two", "PATH": "/x:/bin"}
    assert parsed.copies(parsed.final)[0] == dockerfile.CopySpec(("/src",), "/d/", "a", 10)


@pytest.mark.parametrize(
    "text, message",
    [
        ("RUN echo\n", "before the first FROM"),
        ("# nothing\n", "no FROM"),
        ("FROM x\nCMD echo hi\n", None),
    ],
)
def test_parser_errors_are_clear(text, message):
    if message is None:  # shell-form CMD parses, but asking for its exec form says why it cannot
        with pytest.raises(dockerfile.DockerfileError, match="exec"):
            dockerfile.parse(text).final.last("CMD").exec_form()
    else:
        with pytest.raises(dockerfile.DockerfileError, match=message):
            dockerfile.parse(text)


def test_dockerignore_keeps_only_what_the_image_needs():
    rules = dockerignore_rules()
    kept = dockerfile.context_files(REPO_ROOT, rules)
    assert "requirements-serve.txt" in kept and "code/mldeploy/serving/__init__.py" in kept
    for secret_or_bulk in (
        ".env",
        ".git",
        ".venv/pyvenv.cfg",
        "notebooks/x.ipynb",
        "artifacts/demo/model.onnx",
        "code/mldeploy/__pycache__/serving.cpython-311.pyc",
        "id_rsa",
        "code/serve_model.py",
    ):
        assert dockerfile.is_ignored(secret_or_bulk, rules), secret_or_bulk
    assert not any(path.startswith((".venv/", ".git/", "tests/", "notebooks/")) for path in kept)


def test_dockerignore_semantics_last_match_wins_and_parents_match():
    rules = dockerfile.parse_dockerignore("*\n!keep/\nkeep/**/*.tmp\n# comment\n")
    assert dockerfile.is_ignored("other/file.txt", rules)
    assert not dockerfile.is_ignored("keep/a/b.txt", rules)
    assert dockerfile.is_ignored("keep/a/b.tmp", rules) and dockerfile.is_ignored(
        "keep/b.tmp", rules
    )


def dockerignore_rules() -> list[dockerfile.IgnoreRule]:
    return dockerfile.parse_dockerignore((REPO_ROOT / ".dockerignore").read_text(encoding="utf-8"))


def test_checksum_round_trip_and_tampering(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07" * 100)
    record = checksums.write_checksum(model)
    assert checksums.verify_checksum(model) == record.read_text().split()[0]
    # the file is in sha256sum format: coreutils (as in the image's RUN line) accepts it
    proc = subprocess.run(
        ["sha256sum", "--check", "--strict", record.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model.write_bytes(b"\x08\x07" * 99 + b"\x08\x08")
    with pytest.raises(checksums.ChecksumError, match="changed after export"):
        checksums.verify_checksum(model)
    assert (
        subprocess.run(
            ["sha256sum", "--check", "--strict", record.name], cwd=tmp_path, capture_output=True
        ).returncode
        != 0
    )
    record.unlink()
    with pytest.raises(checksums.ChecksumError, match="make artifacts"):
        checksums.verify_checksum(model)


def test_healthcheck_reports_healthy_then_down(exported, monkeypatch):
    monkeypatch.setenv("MLDEPLOY_MODEL", str(exported["ONNX (.onnx)"]))
    monkeypatch.setenv("MLDEPLOY_BACKEND", "onnx")
    with BackgroundServer(create_app_from_env()) as server:
        assert healthcheck.check(f"{server.url}/health") == (True, "healthy")
        ok, message = healthcheck.check(f"{server.url}/nope")
        assert not ok and "HTTP 404" in message
    ok, message = healthcheck.check(f"{server.url}/health", timeout=1.0)
    assert not ok and message.startswith("unhealthy: no answer")


def test_healthcheck_probes_the_admin_port(monkeypatch):
    monkeypatch.setenv("MLDEPLOY_ADMIN_PORT", "9100")
    assert healthcheck.health_url() == "http://127.0.0.1:9100/health"


@pytest.mark.parametrize("port", ["http", "0", "70000", ""])
def test_healthcheck_rejects_a_bad_port_setting(port, monkeypatch):
    monkeypatch.setenv("MLDEPLOY_ADMIN_PORT", port)
    with pytest.raises(ValueError, match="MLDEPLOY_ADMIN_PORT"):
        healthcheck.health_url()
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.serving.healthcheck"],
        env={"MLDEPLOY_ADMIN_PORT": port, "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "MLDEPLOY_ADMIN_PORT" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [(["--epochs", "zero"], "positive whole number"), (["--epochs", "0"], "positive")],
)
def test_make_artifacts_rejects_bad_arguments_with_a_message(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.image.artifacts", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_make_artifacts_refuses_a_file_as_output_folder(tmp_path):
    blocker = tmp_path / "serve"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "mldeploy.image.artifacts", "--out", str(blocker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    )
