"""The Kubernetes manifests under deploy/k8s, checked offline (no cluster runs here): each is valid against the
Kubernetes API schema (kubernetes-validate, strict: unknown fields are errors), the server's arguments are real
`textgen serve` flags, and the pieces fit together (probes, keyring, balancing, scaling)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from textgen.cli import build_parser

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_the_deployments_run_the_server_as_documented(name: str) -> None:
    spec = _load(name)["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])  # every flag is one textgen serve has
    assert args.command == "serve" and args.port == 50051 and args.metrics_port == 9400 and args.http_port == 8000
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400, "http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # grpc.health.v1, the server's own
        assert container[probe]["grpc"]["port"] == 50051
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.snapshot_key_file).startswith(mounts["snapshot-keys"])
    assert str(args.model_repository) == mounts["models"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["snapshot-keys"]["secret"]["secretName"] == _load("secret.yaml")["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] > 30  # longer than the server's drain (--grace-seconds 30)
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    gpu = name == "deployment-gpu.yaml"
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert args.providers == ("CUDAExecutionProvider,CPUExecutionProvider" if gpu else "auto")


def test_the_service_is_headless_and_selects_every_replica() -> None:
    service = _load("service.yaml")["spec"]
    assert service["clusterIP"] == "None"  # DNS lists every pod: clients balance (dns:///, round_robin)
    # every port the pods name is a port of the Service (gRPC, metrics, the HTTP API)
    assert {p["name"]: p["targetPort"] for p in service["ports"]} == {n: n for n in ("grpc", "metrics", "http")}
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        labels = _load(name)["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= labels.items()
        assert _load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    cpu, gpu = (_load(n)["spec"]["selector"]["matchLabels"] for n in ("deployment.yaml", "deployment-gpu.yaml"))
    assert cpu != gpu  # the two Deployments never claim each other's pods


def test_the_autoscaler_scales_the_cpu_deployment() -> None:
    hpa = _load("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"]["name"] == _load("deployment.yaml")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["metrics"][0]["resource"]["name"] == "cpu"
