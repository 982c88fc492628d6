"""The Kubernetes manifests in k8s/ and the Dockerfile, checked without a live cluster.

Each overlay is rendered with ``kubectl kustomize`` (kustomize v5 is built into kubectl, and
rendering reads only local files), so the tests skip when kubectl is not installed.
Core resources are validated with ``kubernetes-validate`` in strict mode against the schemas
of Kubernetes 1.32, and so are the pod templates inside the RayService. The RayService and its
RayCluster spec are validated against the ``openAPIV3Schema`` of the KubeRay CRDs in
``../shared/kuberay-crds/`` when that folder exists, including a check for fields that the API
server would prune without an error. Alert rules go through promtool. The policy checks are
functions that return their violations, so each one is also run on a broken manifest built in
the test, to show that it can fail.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arbor.errors import ConfigError
from tests.test_monitoring_rules import needs_promtool, run_promtool

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
SERVE_APP = K8S / "image" / "arbor_serve_app.py"
DOCKERFILE = ROOT / "Dockerfile"

# The Kubernetes version the manifests target; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.32.0"

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found; it renders the kustomize overlays (install kubectl 1.14 or newer)",
)
needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRDs not found at {CRD_DIR}; the RayService schema checks need them",
)

# API groups whose schemas kubernetes-validate contains; other kinds are custom resources.
CORE_GROUPS = re.compile(r"^(v1|[a-z.]*k8s\.io/\w+|apps/v1|policy/v1|batch/v1|autoscaling/v2)$")


# --- rendering ---------------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization folder with kubectl and return its objects."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl not found; it renders the kustomize overlays")
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def objects_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [item for item in objects_of(objects, kind) if item["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def pod_templates(item: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (label, pod template) for every pod template of a workload or RayService."""
    name = f"{item['kind']}/{item['metadata']['name']}"
    spec = item.get("spec", {})
    if item["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} worker group {group['groupName']}", group["template"]
    elif "template" in spec and "spec" in spec["template"]:
        yield name, spec["template"]


# --- policy checks -----------------------------------------------------------------------


def container_violations(item: dict[str, Any]) -> list[str]:
    """List the containers of ``item`` that break the resource, probe or security policy."""
    violations: list[str] = []
    for label, template in pod_templates(item):
        pod = template["spec"]
        pod_security = pod.get("securityContext", {})
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            violations.append(f"{label}: pod securityContext.seccompProfile is not RuntimeDefault")
        for container in pod.get("containers", []):
            where = f"{label} container {container.get('name')}"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(part, {}):
                        violations.append(f"{where}: no {part}.{resource}")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    violations.append(f"{where}: no {probe}")
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                violations.append(f"{where}: runAsNonRoot is not set")
            if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
                violations.append(f"{where}: runs as uid 0")
            if security.get("readOnlyRootFilesystem") is not True:
                violations.append(f"{where}: readOnlyRootFilesystem is not true")
            if security.get("allowPrivilegeEscalation") is not False:
                violations.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                violations.append(f"{where}: capabilities do not drop ALL")
    return violations


def image_violations(objects: list[dict[str, Any]]) -> list[str]:
    """List the images that are not pinned to a version tag or a digest."""
    violations = []
    for image in all_images(objects):
        name = image.rsplit("/", 1)[-1]
        if "@sha256:" in image:
            continue
        if ":" not in name:
            violations.append(f"{image}: no tag")
        elif name.endswith(":latest") or not re.search(r":\w*\d", name):
            violations.append(f"{image}: tag is not a version")
    return violations


def all_images(objects: list[dict[str, Any]]) -> list[str]:
    images = []
    for item in objects:
        for _, template in pod_templates(item):
            for key in ("containers", "initContainers"):
                images += [container["image"] for container in template["spec"].get(key, [])]
        if item["kind"] == "RayService":
            autoscaler = item["spec"]["rayClusterConfig"].get("autoscalerOptions", {})
            images += [autoscaler["image"]] if "image" in autoscaler else []
    return images


def credential_violations(objects: list[dict[str, Any]]) -> list[str]:
    """List Secrets with a literal value and URLs that carry a password."""
    violations = []
    for item in objects:
        name = f"{item['kind']}/{item['metadata']['name']}"
        if item["kind"] == "Secret" and (item.get("data") or item.get("stringData")):
            violations.append(f"{name}: holds literal values {sorted(values_of(item))}")
        if item["kind"] in ("ConfigMap", "Secret"):
            for key, value in values_of(item).items():
                if "://" in value and urlsplit(value).password:
                    violations.append(f"{name}: {key} is a URL with a password")
    return violations


def values_of(item: dict[str, Any]) -> dict[str, str]:
    return {**item.get("data", {}), **item.get("stringData", {})}


def pruned_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """List the fields of ``value`` that a structural CRD schema does not declare.

    The API server drops such fields without an error, so a misspelled field would be lost.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, child in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}/{key}")
            else:
                found += pruned_fields(child, schema["properties"][key], f"{path}/{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, child in value.items():
            found += pruned_fields(child, schema["additionalProperties"], f"{path}/{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, child in enumerate(value):
            found += pruned_fields(child, schema["items"], f"{path}/{index}")
    return found


@functools.cache
def crd_schema(file_name: str) -> dict[str, Any]:
    """Return the v1 openAPIV3Schema of a KubeRay CRD; callers must not change it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    definition = yaml.load((CRD_DIR / file_name).read_text(), Loader=loader)
    version = next(item for item in definition["spec"]["versions"] if item["name"] == "v1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def crd_validator(file_name: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(file_name)
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema)


def validate_core(item: dict[str, Any]) -> None:
    kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def pod_template_object(template: dict[str, Any]) -> dict[str, Any]:
    """Wrap a pod template in a core PodTemplate object, so kubernetes-validate checks it."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check"},
        "template": template,
    }


def dockerfile_stages(text: str) -> list[tuple[str, list[str]]]:
    """Split a Dockerfile into (FROM image, instructions) per stage, comments removed."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line.split()[1], []))
        elif stages:
            stages[-1][1].append(line)
    return stages


BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|cmake|clang|apt-get install)\b")


def dockerfile_violations(text: str) -> list[str]:
    """List the breaks of the image policy in the final stage of a Dockerfile."""
    stages = dockerfile_stages(text)
    if not stages:
        return ["no FROM instruction"]
    image, instructions = stages[-1]
    violations = []
    if not re.fullmatch(r"rayproject/ray:2\.60\.\d+(-py3\d+)?", image):
        violations.append(f"final stage FROM {image}: not the official Ray 2.60 image")
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        violations.append("final stage does not end with a non-root USER")
    for line in instructions:
        if line.upper().startswith("RUN ") and BUILD_TOOLS.search(line):
            violations.append(f"final stage installs or runs build tools: {line}")
    for stage_image, _ in stages:
        if ":" not in stage_image or stage_image.endswith(":latest"):
            violations.append(f"FROM {stage_image}: not pinned to a version")
    return violations


# --- rendering and core validation -------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_core_resources_valid(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    core = [item for item in objects if CORE_GROUPS.match(item["apiVersion"])]
    assert len(core) >= 15
    for item in core:
        validate_core(item)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_pod_templates_valid(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    templates = list(pod_templates(service))
    assert len(templates) == 2
    for _, template in templates:
        validate_core(pod_template_object(template))


def test_kubernetes_validate_rejects_broken_container() -> None:
    broken = pod_template_object(
        {"spec": {"containers": [{"name": "ray-worker", "image": "arbor:0.1.0", "port": 8000}]}}
    )
    with pytest.raises(kubernetes_validate.ValidationError, match="port"):
        validate_core(broken)


def test_kubernetes_validate_rejects_bad_replicas() -> None:
    broken = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "broken"},
        "spec": {"maxUnavailable": {"count": 1}, "selector": {}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken)


# --- KubeRay schemas ---------------------------------------------------------------------


@needs_kubectl
@needs_crds
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_matches_kuberay_schema(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    schema = crd_schema("ray.io_rayservices.yaml")
    crd_validator("ray.io_rayservices.yaml").validate(service)
    assert pruned_fields(service["spec"], schema["properties"]["spec"]) == []


@needs_kubectl
@needs_crds
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_spec_matches_kuberay_schema(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "arbor"},
        "spec": service["spec"]["rayClusterConfig"],
    }
    schema = crd_schema("ray.io_rayclusters.yaml")
    crd_validator("ray.io_rayclusters.yaml").validate(cluster)
    assert pruned_fields(cluster["spec"], schema["properties"]["spec"]) == []


@needs_kubectl
@needs_crds
def test_kuberay_schema_rejects_broken_rayservice(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    broken = copy.deepcopy(one(rendered["dev"], "RayService", "arbor"))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        crd_validator("ray.io_rayservices.yaml").validate(broken)


@needs_kubectl
@needs_crds
def test_pruned_field_check_finds_misspelling(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    schema = crd_schema("ray.io_rayservices.yaml")
    broken = copy.deepcopy(one(rendered["dev"], "RayService", "arbor"))
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    found = pruned_fields(broken["spec"], schema["properties"]["spec"])
    assert found == ["/rayClusterConfig/enableInTreeAutoscalling"]


# --- the RayService ----------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_runs_gateway_builder(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    from ray.serve.schema import ServeDeploySchema

    service = one(rendered[overlay], "RayService", "arbor")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert [app.import_path for app in config.applications] == ["arbor_serve_app:build"]
    assert config.applications[0].route_prefix == "/"
    assert config.http_options.port == 8000


def load_serve_app() -> Any:
    spec = importlib.util.spec_from_file_location("arbor_serve_app", SERVE_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_builder_rejects_args() -> None:
    module = load_serve_app()
    with pytest.raises(ConfigError, match="replicas"):
        module.build({"replicas": 3})


def test_dockerfile_puts_serve_builder_on_path() -> None:
    text = DOCKERFILE.read_text()
    _, instructions = dockerfile_stages(text)[-1]
    copies = [line for line in instructions if "arbor_serve_app.py" in line]
    assert copies == ["COPY k8s/image/arbor_serve_app.py /home/ray/arbor-serve/arbor_serve_app.py"]
    assert any("PYTHONPATH=/home/ray/arbor-serve" in line for line in instructions)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_autoscales_with_bounds(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    cluster = one(rendered[overlay], "RayService", "arbor")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_uses_token_auth(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    auth = service["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "arbor-ray-token"}
    for label, template in pod_templates(service):
        env = {item["name"]: item for item in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", label
        token_source = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token_source == {"name": "arbor-ray-token", "key": "auth_token"}, label


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_exposes_metrics_port(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {
            port["name"]: port["containerPort"]
            for port in group["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["metrics"] == 8080
    monitor = one(rendered[overlay], "PodMonitor", "arbor-ray")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "arbor"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_probe_gateway_health_routes(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    service = one(rendered[overlay], "RayService", "arbor")
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "serve"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


# --- PostgreSQL and Vault ----------------------------------------------------------------


@needs_kubectl
def test_dev_database_url_from_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["dev"]
    secret = one(objects, "Secret", "arbor-database")
    url = urlsplit(decode(secret, "ARBOR_DATABASE_URL"))
    assert url.hostname == "arbor-postgres"
    assert url.path == "/arbor"
    one(objects, "StatefulSet", "arbor-postgres")
    one(objects, "Service", "arbor-postgres")
    service = one(objects, "RayService", "arbor")
    for label, template in pod_templates(service):
        sources = template["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "arbor-database"}} in sources, label


def decode(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


@needs_kubectl
def test_prod_database_url_verifies_tls(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config = one(rendered["prod"], "ConfigMap", "arbor-config")["data"]
    url = urlsplit(config["ARBOR_DATABASE_URL"])
    query = parse_qs(url.query)
    assert url.password is None
    assert query["sslmode"] == ["verify-full"]
    assert query["sslrootcert"] == ["/vault/secrets/pg-ca.crt"]
    assert config["ARBOR_SECRET_PROVIDER"] == "vault"
    assert config["ARBOR_VAULT_AUTH"] == "kubernetes"
    assert config["ARBOR_DATABASE_PASSWORD_SECRET"] == "db/password"


@needs_kubectl
def test_prod_has_no_postgres_or_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["prod"]
    assert objects_of(objects, "StatefulSet") == []
    assert objects_of(objects, "Secret") == []
    assert credential_violations(objects) == []


@needs_kubectl
def test_prod_pods_carry_vault_annotations(rendered: dict[str, list[dict[str, Any]]]) -> None:
    service = one(rendered["prod"], "RayService", "arbor")
    for label, template in pod_templates(service):
        annotations = template["metadata"]["annotations"]
        assert annotations["vault.hashicorp.com/agent-inject"] == "true", label
        assert annotations["vault.hashicorp.com/role"] == "arbor", label
        assert "vault.hashicorp.com/agent-inject-template-pg-ca.crt" in annotations, label
    dev_service = one(rendered["dev"], "RayService", "arbor")
    for label, template in pod_templates(dev_service):
        assert "annotations" not in template["metadata"], label


def test_credential_check_flags_literal_password() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "arbor-database"},
        "stringData": {"ARBOR_DATABASE_URL": "postgresql://arbor:hunter2@db/arbor"},
    }
    assert credential_violations([secret]) == [
        "Secret/arbor-database: holds literal values ['ARBOR_DATABASE_URL']",
        "Secret/arbor-database: ARBOR_DATABASE_URL is a URL with a password",
    ]


# --- policy ------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_follow_pod_policy(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    checked = [item for item in rendered[overlay] if list(pod_templates(item))]
    assert {item["kind"] for item in checked} >= {"RayService"}
    violations = [line for item in checked for line in container_violations(item)]
    assert violations == []


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_sidecar_limited(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    options = one(rendered[overlay], "RayService", "arbor")["spec"]["rayClusterConfig"][
        "autoscalerOptions"
    ]
    assert set(options["resources"]["limits"]) == {"cpu", "memory"}
    assert options["securityContext"]["runAsNonRoot"] is True
    assert options["securityContext"]["readOnlyRootFilesystem"] is True


def test_pod_policy_flags_broken_container() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "broken"},
        "spec": {
            "template": {
                "spec": {
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "app",
                            "image": "arbor:0.1.0",
                            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                            "readinessProbe": {"tcpSocket": {"port": 80}},
                            "securityContext": {
                                "runAsNonRoot": True,
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                }
            }
        },
    }
    assert container_violations(deployment) == [
        "Deployment/broken container app: no limits.cpu",
        "Deployment/broken container app: no limits.memory",
        "Deployment/broken container app: no livenessProbe",
    ]
    root = copy.deepcopy(deployment)
    security = root["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security.update(runAsNonRoot=False, runAsUser=0, readOnlyRootFilesystem=False)
    assert "Deployment/broken container app: runs as uid 0" in container_violations(root)
    assert (
        "Deployment/broken container app: readOnlyRootFilesystem is not true"
        in container_violations(root)
    )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_pinned_by_version(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    images = all_images(rendered[overlay])
    assert len(images) >= 2
    assert image_violations(rendered[overlay]) == []


def test_image_check_flags_latest_and_untagged() -> None:
    pod = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "broken"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "image": "registry.example.com:5000/arbor"},
                        {"name": "b", "image": "postgres:latest"},
                        {"name": "c", "image": "postgres:16.6"},
                    ]
                }
            }
        },
    }
    assert image_violations([pod]) == [
        "registry.example.com:5000/arbor: no tag",
        "postgres:latest: tag is not a version",
    ]


# --- network, disruption, identity, ingress -----------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_denied_by_default(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deny = one(rendered[overlay], "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {}
    assert sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny
    assert "egress" not in deny


def allowed_ports(objects: list[dict[str, Any]], direction: str) -> set[int]:
    ports = set()
    for policy in objects_of(objects, "NetworkPolicy"):
        for rule in policy["spec"].get(direction, []):
            ports |= {port["port"] for port in rule.get("ports", [])}
    return ports


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_allows_arbor_traffic(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    assert {8000, 8080, 8265} <= allowed_ports(objects, "ingress")
    assert {53, 5432} <= allowed_ports(objects, "egress")
    internal = one(objects, "NetworkPolicy", "arbor-ray-internal")["spec"]
    peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "arbor"}}}
    assert internal["ingress"] == [{"from": [peer]}]
    assert internal["egress"] == [{"to": [peer]}]


@needs_kubectl
def test_prod_network_allows_vault(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert 8200 in allowed_ports(rendered["prod"], "egress")
    assert 8200 not in allowed_ports(rendered["dev"], "egress")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_match_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    service = one(objects, "RayService", "arbor")
    labels = [template["metadata"]["labels"] for _, template in pod_templates(service)]
    budgets = objects_of(objects, "PodDisruptionBudget")
    assert len(budgets) == 2
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [item for item in labels if selector.items() <= item.items()]
        assert len(matched) == 1, budget["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_account_least_privilege(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    role = one(objects, "Role", "arbor-autoscaler")
    assert objects_of(objects, "ClusterRole") == []
    for rule in role["rules"]:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]
        assert not {"create", "delete", "deletecollection"} & set(rule["verbs"])
    binding = one(objects, "RoleBinding", "arbor-autoscaler")
    assert binding["subjects"][0]["name"] == "arbor"
    service = one(objects, "RayService", "arbor")
    for label, template in pod_templates(service):
        assert template["spec"]["serviceAccountName"] == "arbor", label


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_terminates_tls(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    ingress = one(rendered[overlay], "Ingress", "arbor-gateway")["spec"]
    hosts = [rule["host"] for rule in ingress["rules"]]
    assert ingress["tls"] == [{"hosts": hosts, "secretName": "arbor-gateway-tls"}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    # KubeRay names the Serve Service of a RayService <name>-serve-svc.
    assert backend == {"name": "arbor-serve-svc", "port": {"number": 8000}}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    namespaces = objects_of(rendered[overlay], "Namespace")
    assert len(namespaces) == 1
    labels = namespaces[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    others = {item["metadata"].get("namespace") for item in rendered[overlay]} - {None}
    assert others == {namespaces[0]["metadata"]["name"]}


# --- monitoring --------------------------------------------------------------------------


@needs_kubectl
def test_dashboards_configmap_holds_each_dashboard(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    config = one(rendered["prod"], "ConfigMap", "arbor-grafana-dashboards")
    files = sorted(path.name for path in (K8S / "monitoring" / "dashboards").glob("*.json"))
    assert sorted(config["data"]) == files
    for name, text in config["data"].items():
        assert json.loads(text)["uid"], name


@needs_kubectl
@needs_promtool
def test_rules_configmap_passes_promtool(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    config = one(rendered["prod"], "ConfigMap", "arbor-prometheus-rules")
    rules = tmp_path / "prometheus-rules.yaml"
    rules.write_text(config["data"]["prometheus-rules.yaml"])
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rejects_broken_rule(tmp_path: Path) -> None:
    rules = tmp_path / "broken.yaml"
    rules.write_text(
        "groups:\n  - name: broken\n    rules:\n"
        "      - alert: Broken\n        expr: sum(rate(ray_arbor_x[5m])\n"
    )
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode != 0


# --- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_follows_image_policy() -> None:
    assert dockerfile_violations(DOCKERFILE.read_text()) == []


def test_dockerfile_ray_matches_pinned_series() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]>=(\d+\.\d+),<', pyproject)
    assert pin is not None
    image, _ = dockerfile_stages(DOCKERFILE.read_text())[-1]
    assert image.startswith(f"rayproject/ray:{pin.group(1)}.")


def test_dockerfile_check_flags_broken_image() -> None:
    broken = (
        "FROM python:3.11 AS build\nRUN pip wheel .\n"
        "FROM rayproject/ray:latest\n"
        "RUN apt-get install -y \\\n    build-essential\nUSER root\n"
    )
    assert dockerfile_violations(broken) == [
        "final stage FROM rayproject/ray:latest: not the official Ray 2.60 image",
        "final stage does not end with a non-root USER",
        "final stage installs or runs build tools: RUN apt-get install -y build-essential",
        "FROM rayproject/ray:latest: not pinned to a version",
    ]
