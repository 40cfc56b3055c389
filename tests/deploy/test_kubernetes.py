"""Kubernetes manifests: kustomize renders deploy/k8s, every object validates (strict) against the Kubernetes
schemas that kubernetes-validate ships, and the KServe InferenceService validates against the schema in
tests/deploy/schemas (KServe's v1beta1 types over the same core definitions). Then the settings that matter."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import REPO, tool

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to fit (the preStop sleep action needs it)
K8S = REPO / "deploy" / "k8s"
KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
ISVC_SCHEMA = Path(__file__).parent / "schemas" / "inferenceservice-v1beta1.json"
DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def _validate_module() -> Any:
    tool("kubernetes-validate")
    import kubernetes_validate

    return kubernetes_validate


def _validate(obj: dict, version: str = K8S_VERSION) -> None:
    kv = _validate_module()
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}") from None


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object of each kind"
    return kinds


def test_kustomize_renders_every_manifest(rendered: list[dict]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert sorted(d["kind"] for d in rendered) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]


@pytest.mark.parametrize("version", [K8S_VERSION, "1.37.0"])
def test_every_object_validates_strictly(rendered: list[dict], version: str) -> None:
    for obj in rendered:
        _validate(obj, version)
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for obj in yaml.safe_load_all(path.read_text()):
                _validate(obj, version)


def test_the_validator_rejects_a_misspelt_field(rendered: list[dict]) -> None:
    deployment = copy.deepcopy(_by_kind(rendered)["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(AssertionError, match="readinesProbe"):
        _validate(deployment)


def test_the_deployment(rendered: list[dict]) -> None:
    kinds = _by_kind(rendered)
    deployment = kinds["Deployment"]
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    [c] = pod["containers"]
    assert c["image"].startswith("vae-serve:")
    assert not c.get("command") and not any("--workers" in a for a in c.get("args", [])), "one uvicorn worker"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    res = c["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys()
    env = {e["name"]: e for e in c["env"]}
    assert env["VAE_MODELS_DIR"]["value"] == "/models" and env["VAE_HOST"]["value"] == "0.0.0.0"
    assert env["VAE_PORT"]["value"] == "8000"
    assert env["VAE_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"

    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root filesystem"
    assert pod["automountServiceAccountToken"] is False

    service, hpa, pdb = kinds["Service"], kinds["HorizontalPodAutoscaler"], kinds["PodDisruptionBudget"]
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vae-serve"}
    assert hpa["spec"]["minReplicas"] >= 2, "a PodDisruptionBudget of maxUnavailable 1 needs 2 replicas"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


# ---- KServe


def _inline(node: Any, schema: dict, defs: dict, from_defs: bool = False) -> Any:
    """Expand 'x-inline-properties'; references inside what comes from the core definitions become absolute."""
    if isinstance(node, list):
        return [_inline(n, schema, defs, from_defs) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline(v, schema, defs, from_defs) for k, v in node.items() if k != "x-inline-properties"}
    if from_defs and isinstance(out.get("$ref"), str) and out["$ref"].startswith("#/"):
        out["$ref"] = DEFS_URI + out["$ref"]
    merged: dict = {}
    for ref in node.get("x-inline-properties", []):
        inner = ref.startswith(DEFS_URI)
        source = (defs if inner else schema)["$defs"][ref.rsplit("/", 1)[1]]
        merged.update(_inline(source.get("properties", {}), schema, defs, from_defs or inner))
    if merged:
        out["properties"] = {**merged, **out.get("properties", {})}
    return out


@pytest.fixture(scope="module")
def isvc_validator() -> Any:
    from importlib.resources import files

    import jsonschema
    import referencing

    kv = _validate_module()
    defs_path = files(kv).joinpath("kubernetes-json-schema", "v1.37.0-local-strict", "_definitions.json")
    defs = json.loads(defs_path.read_text())
    schema = json.loads(ISVC_SCHEMA.read_text())
    schema = _inline(schema, schema, defs)
    registry = referencing.Registry().with_resource(DEFS_URI, referencing.Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _isvc() -> dict:
    [doc] = [d for d in yaml.safe_load_all(KSERVE.read_text()) if d]
    return doc


def test_the_inference_service_validates(isvc_validator: Any) -> None:
    errors = sorted(isvc_validator.iter_errors(_isvc()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["predictor"].update(minReplica=1),  # misspelt extension field
        lambda d: d["spec"]["predictor"]["containers"][0].update(imagePullPolicy=3),  # wrong type, core Container
        lambda d: d["spec"]["predictor"].update(scaleMetric="gpu"),
        lambda d: d.update(apiVersion="serving.kserve.io/v1alpha1"),
    ],
)
def test_the_inference_service_schema_rejects_mistakes(isvc_validator: Any, mutate: Any) -> None:
    doc = _isvc()
    mutate(doc)
    assert list(isvc_validator.iter_errors(doc))


def test_the_inference_service_is_a_v2_custom_predictor_of_the_serving_image(rendered: list[dict]) -> None:
    predictor = _isvc()["spec"]["predictor"]
    assert not {"model", "sklearn", "onnx", "triton"} & predictor.keys(), "a custom predictor: containers only"
    [c] = predictor["containers"]
    assert c["name"] == "kserve-container"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PROTOCOL"] == "v2", "KServe takes a custom predictor's protocol from $PROTOCOL"
    [port] = c["ports"]
    assert port["containerPort"] == 8000 and port.get("name", "http1") in ("http1", "h2c")
    deployment = _by_kind(rendered)["Deployment"]
    [api] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"].split(":")[0] == api["image"].split(":")[0] == "vae-serve"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert env["VAE_MODELS_DIR"] == "/models" and env["VAE_PORT"] == "8000"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert "securityContext" not in predictor, "Knative rejects a pod securityContext unless a flag allows it"
    assert not any("valueFrom" in e for e in c["env"]), "Knative rejects fieldRef/resourceFieldRef by default"
