"""The serving image built for real (Docker or Podman) and proven: `make image-test`.

Skipped with one line where no engine answers; with CI=true a missing engine fails instead.
Every container and pod is published on 127.0.0.1 only and removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml

from mldeploy import settings
from mldeploy.image import build, footprint, run
from mldeploy.image import engine as engines
from mldeploy.paths import REPO_ROOT

pytestmark = pytest.mark.image
MODEL = REPO_ROOT / "artifacts" / "serve" / "model.onnx"
SAMPLES = [[0.5, -0.3], [-1.0, 0.5], [2.0, 0.25], [0.0, 0.0], [1.2, -0.7]]


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """Write a line into pytest's terminal output (the size report is part of the result)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


@pytest.fixture(scope="module")
def engine() -> engines.Engine:
    try:
        return engines.find(install=False)
    except engines.EngineUnavailable as exc:
        if settings.tools().ci:
            pytest.fail(
                f"CI=true needs a container engine for the image tests: {exc}", pytrace=False
            )
        pytest.skip(f"image tests not run: {exc}")


@pytest.fixture(scope="module")
def image(engine: engines.Engine, request: pytest.FixtureRequest) -> build.ImageReport:
    """The image as `make image` builds it (fast when its layers are cached)."""
    from mldeploy.image import artifacts

    artifacts.ensure(MODEL.parent)
    try:
        _say(
            request,
            f"base image: {build.ensure_base(engine, say=lambda line: _say(request, line))}",
        )
        seconds = build.build_image(engine, say=lambda line: None)
    except engines.EngineError as exc:
        pytest.fail(str(exc), pytrace=False)
    report = build.inspect(engine)
    _say(
        request,
        f"\n{engine.name} build took {seconds:.0f} s; " + "\n".join(build.report_lines(report)),
    )
    return report


@pytest.fixture(scope="module")
def container(engine, image):
    with run.running(engine, image.tag) as box:
        yield box


def test_image_config_is_unprivileged_with_the_healthcheck(image):
    assert image.user == "10001:10001"
    assert list(image.healthcheck) == ["CMD", "python", "-m", "mldeploy.serving.healthcheck"]


def test_size_is_the_base_plus_the_serving_environment(image, request):
    venv, base = image.largest(2)
    assert "/opt/venv" in venv.created_by, build.describe_layer(venv.created_by)
    measured = footprint.measure(REPO_ROOT / "requirements-serve.txt").total
    ratio = venv.size / measured
    _say(
        request,
        f"venv layer {venv.size / 1e6:.1f} MB = {ratio:.2f} x the footprint measured in 5.4.3 "
        f"({measured / 1e6:.1f} MB; the layer adds pip, setuptools and bytecode)",
    )
    assert 1.0 <= ratio <= 1.5
    # everything else (user, code, model, checksum run) is small: the runtime decides the size
    rest = image.size - sum(layer.size for layer in image.largest(2))
    assert 0 <= rest < 1e6 and image.size < 0.6e9


def test_answers_health_ready_and_predict_as_the_library_does(container):
    from mldeploy.serving import OnnxPredictor

    assert run.get(container.url + "/health") == (200, {"status": "ok", "model_loaded": True})
    assert run.get(container.url + "/ready") == (200, {"ready": True})
    local = OnnxPredictor(MODEL).predict_proba(np.array(SAMPLES, dtype=np.float32))
    for features, expected in zip(SAMPLES, local):
        status, body = run.post(container.url + "/predict", {"features": features})
        assert status == 200 and body["model_format"] == "ONNX"
        assert body["prediction"] == int(expected.argmax())
        assert np.allclose(body["probabilities"], expected, atol=1e-5), (features, body, expected)
    assert run.post(container.url + "/predict", {"features": [0.5]})[0] == 422


def test_runs_as_10001_without_capabilities_on_a_read_only_root(container):
    status = container.exec("cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split() == ["10001"] * 4 and fields["Gid"].split() == ["10001"] * 4
    assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"].strip() == "1"
    for path in ("/app/mldeploy/new.py", "/opt/venv/new", "/app/model/model.onnx"):
        # as root inside the container, so that only the read-only mount can refuse
        proc = container.exec("--user", "0", "python", "-c", f"open({path!r}, 'a')")
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, (path, proc.stderr)


def test_has_no_torch_inside(container):
    proc = container.exec("python", "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    names = container.exec(
        "python",
        "-c",
        "import importlib.metadata as m; "
        "print(sorted(d.metadata['Name'].lower() for d in m.distributions()))",
    )
    installed = json.loads(names.stdout.replace("'", '"'))
    assert "onnxruntime" in installed and not any(
        name.startswith(("torch", "nvidia")) for name in installed
    )


def test_healthcheck_passes_while_up_and_fails_when_the_server_is_down(engine, image, container):
    assert container.healthcheck() == (0, "healthy")
    if engine.name == "podman":
        assert container.state()["Health"]["Status"] == "healthy"
    # the same image with the server not started: the container lives, the check must fail
    idle = ("python", "-c", "import time; time.sleep(120)")
    with run.running(engine, image.tag, command=idle, wait=False) as box:
        code, text = box.healthcheck()
        assert code != 0 and text.startswith("unhealthy"), text


def test_stops_cleanly_and_quickly_on_sigterm(engine, image, request):
    with run.running(engine, image.tag) as box:
        start = time.monotonic()
        engine.run("stop", "--time", "30", box.name, timeout=60)  # SIGTERM, then SIGKILL after 30 s
        seconds = time.monotonic() - start
        state, logs = box.state(), box.logs()
    _say(request, f"stop (SIGTERM) took {seconds:.1f} s, exit code {state['ExitCode']}")
    assert seconds < 25 and state["ExitCode"] in (0, 143), (
        state
    )  # 137 would mean it had to be killed
    assert "server stopped cleanly" in logs and "Traceback" not in logs, logs[-2000:]


# --- the Deployment, as far as `podman kube play` goes -------------------------------------------

NOT_CHECKED = (
    "not checked without a cluster: the Service and the HPA; readiness and startup probes "
    "(podman runs neither); rolling updates; resource requests (no scheduler); "
    "the liveness probe as an HTTP call "
    "(podman turns it into `curl` inside the container, and the image has no curl)"
)


def kube_copy(name: str) -> tuple[dict, dict]:
    """deploy/k8s/deployment.yaml with a unique name, probe port names resolved, no published ports.

    Podman publishes each containerPort on 0.0.0.0 of the host, where the second replica collides.
    """
    doc = yaml.safe_load(
        (REPO_ROOT / "deploy" / "k8s" / "deployment.yaml").read_text(encoding="utf-8")
    )
    original = yaml.safe_load(yaml.safe_dump(doc))
    doc["metadata"]["name"] = name
    (box,) = doc["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in box.pop("ports")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = box[probe]["httpGet"]
        get["port"] = ports.get(get["port"], get["port"])
    return doc, original


def probe_port(container: dict, probe: dict) -> int:
    """The port number a probe asks, resolving a named port against the container's ports."""
    port = probe["httpGet"]["port"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return named.get(port, port)


def test_deployment_runs_under_podman_kube_play(engine, image, tmp_path, request):
    if engine.name != "podman":
        pytest.skip("docker has no `kube play`: the Deployment needs a cluster (kind, minikube)")
    name = run.unique_name("mldeploy-kube")
    doc, original = kube_copy(name)
    spec = original["spec"]["template"]["spec"]
    (want,) = spec["containers"]
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    try:
        engine.run("kube", "play", str(path), timeout=180)
        pods = engine.run(
            "pod", "ps", "--filter", f"name={name}", "--format", "{{.Name}}"
        ).stdout.split()
        assert len(pods) == original["spec"]["replicas"]
        for pod in pods:
            (info,) = json.loads(engine.run("inspect", f"{pod}-{want['name']}").stdout)
            host = info["HostConfig"]
            assert (
                info["Config"]["User"]
                == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
            )
            assert host["ReadonlyRootfs"] is want["securityContext"]["readOnlyRootFilesystem"]
            assert "no-new-privileges" in host["SecurityOpt"] and host["CapAdd"] == []
            assert (
                host["Memory"] == 512 * 2**20 and host["NanoCpus"] == 10**9
            )  # limits: 512Mi, 1 CPU
            assert host["PortBindings"] == {}
            live = want["livenessProbe"]
            health = info["Config"]["Healthcheck"]
            assert (
                health["Interval"] == live["periodSeconds"] * 10**9
                and health["Retries"] == live["failureThreshold"]
            )
            assert f":{probe_port(want, live)}{live['httpGet']['path']}" in " ".join(health["Test"])
            box = run.Container(engine, f"{pod}-{want['name']}", "")
            deadline = time.monotonic() + 60
            while (
                probe := box.exec("python", "-m", "mldeploy.serving.healthcheck")
            ).returncode != 0:
                assert time.monotonic() < deadline, probe.stdout
                time.sleep(0.5)
            status = box.exec(
                "grep", "-E", "^(Uid|CapEff|NoNewPrivs|Seccomp):", "/proc/1/status"
            ).stdout.split()
            assert status == [
                "Uid:",
                *["10001"] * 4,
                "CapEff:",
                "0000000000000000",
                "NoNewPrivs:",
                "1",
                "Seccomp:",
                "2",
            ]
            for probe_name in (
                "startupProbe",
                "readinessProbe",
                "livenessProbe",
            ):  # each probe's path answers 200
                probe = want[probe_name]
                url = f"http://127.0.0.1:{probe_port(want, probe)}{probe['httpGet']['path']}"
                code = box.exec(
                    "python",
                    "-c",
                    f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).status)",
                )
                assert code.stdout.strip() == "200", (probe_name, code.stderr)
        _say(
            request,
            f"kube play: {len(pods)} replicas as uid 10001, read-only root, no capabilities, "
            f"no-new-privileges, seccomp, 512Mi / 1 CPU; probe paths answer 200",
        )
        _say(request, NOT_CHECKED)
    finally:
        engine.run("kube", "down", str(path), check=False, timeout=180)
        for pod in engine.run(
            "pod", "ps", "--filter", f"name={name}", "--format", "{{.Name}}", check=False
        ).stdout.split():
            engine.run("pod", "rm", "--force", pod, check=False, timeout=120)
