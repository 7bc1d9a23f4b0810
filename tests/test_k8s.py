"""The Kubernetes manifests: valid against the schema (offline) and consistent with the image."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from mldeploy import serving
from mldeploy.image import dockerfile
from mldeploy.paths import REPO_ROOT
from mldeploy.serving.server import DrainingServer
from mldeploy.settings import ServiceSettings

K8S = REPO_ROOT / "deploy" / "k8s"
VERSION = kubernetes_validate.latest_version()


def _docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in _docs()}


def test_manifests_are_valid_kubernetes_objects():
    docs = _docs()
    assert sorted(doc["kind"] for doc in docs) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Service",
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_validator_rejects_a_misspelt_probe(manifests):
    broken = yaml.safe_load(yaml.safe_dump(manifests["Deployment"]))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["pathh"] = container["readinessProbe"]["httpGet"].pop(
        "path"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_deployment_matches_the_image(manifests):
    parsed = dockerfile.load(REPO_ROOT / "Dockerfile")
    stage = parsed.final
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    exposed = [int(port) for port in stage.last("EXPOSE").args.split()]
    assert [p["containerPort"] for p in container["ports"]] == exposed
    env = parsed.env(stage)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["admin"]) == (
        int(env["MLDEPLOY_PORT"]),
        int(env["MLDEPLOY_ADMIN_PORT"]),
    )
    uid, _, gid = stage.last("USER").args.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_probes_use_the_admin_port_and_the_grace_period_covers_the_drain(manifests):
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {container[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe")} == {
        "admin"
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = ServiceSettings(**{k[len("MLDEPLOY_") :].lower(): v for k, v in env.items()})
    # the drain must outlast the readiness probe noticing, and everything must fit the grace period
    probe = container["readinessProbe"]
    assert settings.drain_s >= probe["periodSeconds"] * probe["failureThreshold"]
    stopping = settings.drain_s + DrainingServer.LISTENER_WAIT_S + settings.shutdown_timeout_s
    assert stopping < pod["terminationGracePeriodSeconds"]


def test_every_probe_hits_a_get_route_of_the_app(manifests, exported, monkeypatch):
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    monkeypatch.setenv("MLDEPLOY_MODEL", str(exported["ONNX (.onnx)"]))
    monkeypatch.setenv("MLDEPLOY_BACKEND", "onnx")
    app = serving.create_app_from_env()  # the factory the image's CMD uses
    routes = {route.path for route in app.routes if "GET" in getattr(route, "methods", set())}
    named_ports = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] in named_ports, probe


def test_service_and_autoscaler_point_at_the_deployment(manifests):
    deployment, service, hpa = (
        manifests["Deployment"],
        manifests["Service"],
        manifests["HorizontalPodAutoscaler"],
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        1
        <= hpa["spec"]["minReplicas"]
        <= deployment["spec"]["replicas"]
        <= hpa["spec"]["maxReplicas"]
    )
