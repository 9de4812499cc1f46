"""Run what the rendered Kubernetes manifests say, as processes on simulated hosts.

There is no cluster and no container runtime here, so this harness plays the
kubelet and the network, and nothing else:

- every pod of every Deployment (replicas of each) gets a Linux network
  namespace of its own, a "host" with one IP, joined to the others by a bridge
  in a namespace of the harness's own (the root namespace gets one leg into it,
  so the test can call the gateway and read Redis);
- Services are names in each pod's hosts file (`/etc/netns/<ns>/hosts`),
  resolving to the IPs of the pods their selector picks, like a headless
  Service; each pod also gets its own UTS namespace with the pod's name as its
  hostname, as in Kubernetes;
- each container runs its `command` + `args` (the first word from this
  virtualenv's bin, where the image has it), with the environment Kubernetes
  would give it: `envFrom` ConfigMaps and Secrets, `value`s, `valueFrom`
  (`configMapKeyRef`, `secretKeyRef`, `fieldRef` for the pod's name, namespace,
  node and IP) and `$(VAR)` references; emptyDir mounts become per-pod
  directories; a container that exits is restarted (restartPolicy Always);
- readiness is the container's own readinessProbe (gRPC health, HTTP GET, TCP).

What it does not play: the image (the processes run from this checkout's
install, as root), resource limits, the read-only root filesystem and the
NetworkPolicies (tests/deploy/test_manifests.py checks those statically).
Every namespace, link and file it makes is removed afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
START_TIMEOUT_SECONDS = 180.0
RESTART_BACKOFF_SECONDS = 1.0
MAX_RESTARTS = 20  # per container: a crash loop fails the test instead of spinning
NAMESPACE = "agentplex"

Obj = dict[str, Any]


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def render(overlay: Path) -> list[Obj]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [obj for obj in yaml.safe_load_all(out) if obj]


def render_overlay(directory: Path, base: Path, kustomization: Obj) -> list[Obj]:
    """Render `base` (an overlay of the repository) with the test's own changes on top,
    through kustomize like any other overlay."""
    directory.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base, directory)],
        **kustomization,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(directory)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 that no route of this machine covers, so nothing outside the test is reachable."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    used = [
        ipaddress.ip_network(word, strict=False)
        for line in routes.splitlines()
        for word in line.split()[:2]
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word)
    ]
    for _ in range(100):
        candidate = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(100) + 150}.{secrets.randbelow(256)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError("no free /24 for the test network")


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    readiness: Obj | None
    ports: dict[str, int]  # containerPort by name, for probes that name theirs
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log: Path | None = None


@dataclass
class Pod:
    name: str
    deployment: str
    labels: dict[str, str]
    ip: str
    netns: str
    link: str  # the bridge side of its cable: down is a partition
    directory: Path
    containers: list[Container] = field(default_factory=list)
    alive: bool = True

    def log(self) -> str:
        return "".join(
            c.log.read_text(errors="replace") for c in self.containers if c.log and c.log.exists()
        )


class Cluster:
    """The rendered objects, run as pods on namespace hosts (see the module docstring)."""

    def __init__(self, objects: list[Obj], workdir: Path) -> None:
        self.objects = objects
        self.workdir = workdir
        self.token = secrets.token_hex(3)
        self.subnet = _free_subnet()
        self.switch = f"apx{self.token}-sw"
        self.root_link = f"apx{self.token}r"
        self.pods: list[Pod] = []
        self._next_host = 1
        self._generation: dict[str, int] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._created_netns: list[str] = []

    # -- objects --------------------------------------------------------------------

    def _find(self, kind: str, name: str) -> Obj:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"{kind}/{name} is not in the rendered manifests")

    def _data(self, kind: str, name: str) -> dict[str, str]:
        obj = self._find(kind, name)
        data = dict(obj.get("stringData") or {})
        if kind == "Secret":
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value).decode()
        else:
            data.update(obj.get("data") or {})
        return data

    @property
    def deployments(self) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == "Deployment"]

    # -- network --------------------------------------------------------------------

    def _network_up(self) -> None:
        run("ip", "netns", "add", self.switch)
        self._created_netns.append(self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        gateway_ip = self.subnet[254]
        run(
            "ip",
            "link",
            "add",
            self.root_link,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            self.switch,
        )
        run("ip", "addr", "add", f"{gateway_ip}/24", "dev", self.root_link)
        run("ip", "link", "set", self.root_link, "up")
        run("ip", "-n", self.switch, "link", "set", "up0", "master", "br0", "up")

    def _host_up(self, pod_name: str) -> tuple[str, str, str]:
        index = self._next_host
        self._next_host += 1
        ip = str(self.subnet[index])
        netns = f"apx{self.token}-{index}"
        link = f"p{index}"
        run("ip", "netns", "add", netns)
        self._created_netns.append(netns)
        run(
            "ip",
            "-n",
            self.switch,
            "link",
            "add",
            link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        run("ip", "-n", self.switch, "link", "set", link, "master", "br0", "up")
        run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "link", "set", "lo", "up")
        return ip, netns, link

    def _write_hosts(self) -> None:
        """Every pod's hosts file: itself, and every Service's pods (headless style)."""
        services: list[tuple[str, str]] = []
        for service in (obj for obj in self.objects if obj["kind"] == "Service"):
            selector = service["spec"].get("selector") or {}
            for pod in self.pods:
                if pod.alive and all(pod.labels.get(k) == v for k, v in selector.items()):
                    name = service["metadata"]["name"]
                    services.append((pod.ip, f"{name} {name}.{NAMESPACE} {name}.{NAMESPACE}.svc"))
        for pod in self.pods:
            hosts = Path("/etc/netns") / pod.netns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost", f"{pod.ip} {pod.name}"]
            lines += [f"{ip} {names}" for ip, names in services]
            # In place: a running process's mount of the file sees the new content.
            with hosts.open("w") as out:
                out.write("\n".join(lines) + "\n")

    def partition(self, pod: Pod) -> None:
        run("ip", "-n", self.switch, "link", "set", pod.link, "down")

    def heal(self, pod: Pod) -> None:
        run("ip", "-n", self.switch, "link", "set", pod.link, "up")

    # -- pods -----------------------------------------------------------------------

    def _schedule(self, deployment: Obj) -> Pod:
        name = deployment["metadata"]["name"]
        generation = self._generation.get(name, 0)
        self._generation[name] = generation + 1
        pod_name = f"{name}-{generation}"
        ip, netns, link = self._host_up(pod_name)
        template = deployment["spec"]["template"]
        pod = Pod(
            name=pod_name,
            deployment=name,
            labels=dict(template["metadata"].get("labels") or {}),
            ip=ip,
            netns=netns,
            link=link,
            directory=self.workdir / pod_name,
        )
        pod.directory.mkdir(parents=True)
        volumes = {
            volume["name"]: pod.directory / "volumes" / volume["name"]
            for volume in template["spec"].get("volumes", [])
            if "emptyDir" in volume
        }
        for spec in template["spec"]["containers"]:
            pod.containers.append(self._container(pod, spec, volumes))
        self.pods.append(pod)
        return pod

    def _container(self, pod: Pod, spec: Obj, volumes: dict[str, Path]) -> Container:
        mounts = {
            mount["mountPath"]: volumes[mount["name"]]
            for mount in spec.get("volumeMounts", [])
            if mount["name"] in volumes
        }
        for directory in mounts.values():
            directory.mkdir(parents=True, exist_ok=True)
        env = self._env(pod, spec)
        argv = [_expand(word, env) for word in [*spec.get("command", []), *spec.get("args", [])]]
        # emptyDir paths in arguments point at the pod's own directory.
        argv = [_remap(word, mounts) for word in argv]
        assert argv, f"{pod.deployment}: a container without a command (the image's default)"
        executable = BIN / argv[0]
        assert executable.exists(), f"{pod.deployment}: {argv[0]} is not installed with the mesh"
        argv[0] = str(executable)
        tmp = mounts.get("/tmp", pod.directory / "tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        env = {
            **env,
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
        }
        ports = {p["name"]: p["containerPort"] for p in spec.get("ports", []) if "name" in p}
        return Container(spec["name"], argv, env, spec.get("readinessProbe"), ports)

    def _env(self, pod: Pod, spec: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self._data("ConfigMap", source["configMapRef"]["name"]))
            if "secretRef" in source:
                env.update(self._data("Secret", source["secretRef"]["name"]))
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": NAMESPACE,
            "spec.nodeName": pod.netns,
            "status.podIP": pod.ip,
            "status.hostIP": pod.ip,
        }
        for variable in spec.get("env", []):
            source = variable.get("valueFrom")
            if source is None:
                env[variable["name"]] = _expand(variable.get("value", ""), env)
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                env[variable["name"]] = pod.labels[label.group(1)] if label else fields[path]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[variable["name"]] = self._data("ConfigMap", ref["name"])[ref["key"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[variable["name"]] = self._data("Secret", ref["name"])[ref["key"]]
            else:
                raise AssertionError(f"{pod.deployment}: unsupported env source {source}")
        return env

    def _start(self, pod: Pod, container: Container) -> None:
        container.log = pod.directory / f"{container.name}.log"
        with container.log.open("ab") as log:
            log.write(f"--- start {container.restarts} ---\n".encode())
            log.flush()
            container.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    pod.netns,
                    "unshare",
                    "--uts",
                    "--",
                    "sh",
                    "-c",
                    'hostname "$0" && exec "$@"',
                    pod.name,
                    *container.argv,
                ],
                env=container.env,
                cwd=pod.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def _keep_running(self) -> None:
        """restartPolicy Always, with a fixed backoff and a bound."""
        while True:
            for pod in self.pods:
                for container in pod.containers:
                    process = container.process
                    if not pod.alive or process is None or process.poll() is None:
                        continue
                    container.restarts += 1
                    assert container.restarts <= MAX_RESTARTS, (
                        f"{pod.name}/{container.name} is crash-looping:\n{pod.log()[-3000:]}"
                    )
                    self._start(pod, container)
            await asyncio.sleep(RESTART_BACKOFF_SECONDS)

    async def up(self) -> None:
        self._network_up()
        for deployment in self.deployments:
            for _ in range(deployment["spec"].get("replicas", 1)):
                self._schedule(deployment)
        self._write_hosts()
        for pod in self.pods:
            for container in pod.containers:
                self._start(pod, container)
        self._supervisor = asyncio.create_task(self._keep_running())
        await self.wait_ready(self.pods)

    async def reschedule(self, pod: Pod) -> Pod:
        """What a ReplicaSet does for a pod whose node died: a new pod on another host."""
        replacement = self._schedule(self._find("Deployment", pod.deployment))
        self._write_hosts()
        for container in replacement.containers:
            self._start(replacement, container)
        await self.wait_ready([replacement])
        return replacement

    def _signal_host(self, pod: Pod, sig: signal.Signals) -> None:
        pids = subprocess.run(
            ["ip", "netns", "pids", pod.netns], capture_output=True, text=True, check=True
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), sig)

    def freeze(self, pod: Pod) -> None:
        """Every process on the host stopped (SIGSTOP): a stalled VM, a long GC pause."""
        self._signal_host(pod, signal.SIGSTOP)

    def thaw(self, pod: Pod) -> None:
        self._signal_host(pod, signal.SIGCONT)

    def kill_host(self, pod: Pod) -> None:
        """Every process on the host, at once (SIGKILL): a machine losing power."""
        pod.alive = False
        self._signal_host(pod, signal.SIGKILL)
        for container in pod.containers:
            if container.process is not None:
                container.process.wait(timeout=10)
        self.partition(pod)  # and its address is gone from the network

    async def wait_ready(self, pods: list[Pod], timeout: float = START_TIMEOUT_SECONDS) -> None:
        give_up = time.monotonic() + timeout
        waiting = {(pod.name, c.name): (pod, c) for pod in pods for c in pod.containers}
        while waiting:
            for key, (pod, container) in list(waiting.items()):
                if await self.ready(pod, container):
                    del waiting[key]
            if waiting and time.monotonic() > give_up:
                names = ", ".join(sorted(f"{p}/{c}" for p, c in waiting))
                logs = "\n".join(
                    f"== {pod.name}\n{pod.log()[-1500:]}" for pod, _ in waiting.values()
                )
                raise AssertionError(f"not ready within {timeout:g}s: {names}\n{logs}")
            await asyncio.sleep(0.25)

    async def ready(self, pod: Pod, container: Container) -> bool:
        probe = container.readiness
        if probe is None:
            return container.process is not None and container.process.poll() is None
        try:
            if "grpc" in probe:
                address = f"{pod.ip}:{probe['grpc']['port']}"
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    response = await stub.Check(  # type: ignore[attr-defined]  # untyped stub
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=1,
                    )
                return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = _port(get["port"], container)
                async with httpx.AsyncClient(timeout=1.0) as http:
                    answer = await http.get(f"http://{pod.ip}:{port}{get.get('path', '/')}")
                return 200 <= answer.status_code < 400
            if "tcpSocket" in probe:
                port = _port(probe["tcpSocket"]["port"], container)
                _, writer = await asyncio.wait_for(asyncio.open_connection(pod.ip, port), 1)
                writer.close()
                return True
            if "exec" in probe:
                done = await asyncio.create_subprocess_exec(
                    "ip",
                    "netns",
                    "exec",
                    pod.netns,
                    *_in_bin(probe["exec"]["command"]),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                return await asyncio.wait_for(done.wait(), 5) == 0
        except (grpc.aio.AioRpcError, httpx.HTTPError, OSError, TimeoutError):
            return False
        raise AssertionError(f"{pod.name}: unsupported readiness probe {probe}")

    def pod(self, deployment: str, *, alive: bool = True) -> list[Pod]:
        return [p for p in self.pods if p.deployment == deployment and p.alive == alive]

    def address(self, service: str, port: int) -> str:
        """A Service as the test reaches it: its first live pod's IP."""
        selector = self._find("Service", service)["spec"]["selector"]
        for pod in self.pods:
            if pod.alive and all(pod.labels.get(k) == v for k, v in selector.items()):
                return f"{pod.ip}:{port}"
        raise AssertionError(f"no live pod behind Service {service}")

    async def down(self) -> None:
        try:
            if self._supervisor is not None:
                self._supervisor.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):  # tear down anyway
                    await self._supervisor
        finally:
            self._tear_down()

    def _tear_down(self) -> None:
        """Every process killed, every namespace, link and hosts file removed."""
        for pod in self.pods:
            for container in pod.containers:
                if container.process is not None and container.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(container.process.pid, signal.SIGKILL)
        for netns in self._created_netns:
            pids = subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for pod in self.pods:
            for container in pod.containers:
                if container.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        container.process.wait(timeout=10)
        subprocess.run(["ip", "link", "del", self.root_link], capture_output=True)
        for netns in reversed(self._created_netns):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` references to variables defined earlier; `$$(` escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def _remap(word: str, mounts: dict[str, Path]) -> str:
    for mount, directory in mounts.items():
        if word == mount or word.startswith(mount.rstrip("/") + "/"):
            return str(directory) + word[len(mount.rstrip("/")) :]
    return word


def _in_bin(command: list[str]) -> list[str]:
    first = BIN / command[0]
    return [str(first) if first.exists() else command[0], *command[1:]]


def _port(port: int | str, container: Container) -> int:
    if isinstance(port, int):
        return port
    assert port in container.ports, f"{container.name}: the probe names no port of it ({port})"
    return container.ports[port]


def _can_build_hosts() -> str | None:
    """Why namespace hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture
async def cluster_of(tmp_path: Path) -> AsyncIterator[Callable[[list[Obj]], Any]]:
    """`await cluster_of(objects)`: the objects running on namespace hosts, all ready."""
    reason = _can_build_hosts()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host test {reason}, and CI must run it")
        pytest.skip(f"the multi-host test {reason}")
    clusters: list[Cluster] = []

    async def start(objects: list[Obj]) -> Cluster:
        cluster = Cluster(objects, tmp_path / "hosts")
        clusters.append(cluster)
        await cluster.up()
        return cluster

    try:
        yield start
    finally:
        for cluster in clusters:
            try:
                await cluster.down()
            except Exception as exc:  # the next cluster is still torn down
                print(f"tearing down a test cluster failed: {exc!r}", file=sys.stderr)


@pytest.fixture
def overlay(tmp_path: Path) -> Callable[[str, Obj], list[Obj]]:
    """`overlay("dev", {...})`: that overlay of deploy/kubernetes with the test's kustomize
    changes on top (replicas, patches), rendered."""

    def render_it(name: str, kustomization: Obj) -> list[Obj]:
        base = REPO / "deploy" / "kubernetes" / "overlays" / name
        return render_overlay(tmp_path / f"overlay-{name}", base, kustomization)

    return render_it
