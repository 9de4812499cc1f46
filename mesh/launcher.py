"""`agentplex up`: the whole mesh as local processes, started in dependency order and
kept running.

Redis (embedded unless REDIS_URL is set) → memory → registry → tool backend → agents
(the built-in ones and those of the spec files, each process given the files with
`--agents FILE`; `--replicas NAME=N` each) → task workers (`--workers N` per agent) → the gateway's
xDS control plane → Envoy (unless `--no-gateway`). Each service is its own process;
it reports the address it bound through a ready file, and counts as up once its
gRPC health check says SERVING. Logs go to `.agentplex/logs/<name>.log` so this
terminal shows only progress. Once up, the supervisor restarts any part that exits
(mesh/supervisor.py); `agentplex ps` and `agentplex restart` reach it over the
MeshControlService on loopback, whose address the state file holds under
"control". Every child dies with the launcher, even a SIGKILLed one
(runtime/orphan_guard.py). Stopping runs in reverse order, without the drain delay.

Secure by default: the gateway requires bearer tokens from a development issuer
(`auth`, mesh/dev_auth.py; `--no-auth` turns it off, on loopback only) and the parts
talk mutual TLS (`mtls`; `--no-mtls`). With mTLS every gRPC part serves mutual TLS
with its own identity's certificate from a development PKI kept in `.agentplex/pki/`
(made once, then reused), and Envoy reaches agents and the registry with the
`gateway` certificate. Two servers stay plaintext, on loopback only: the launcher's
MeshControlService and the gateway control plane's xDS server (Envoy's bootstrap
reaches it without TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentplex.agents.catalog import CATALOG, AgentSpec
from agentplex.contract import callers
from agentplex.gateway.resources import agent_cluster
from agentplex.gateway.settings import GatewaySettings
from agentplex.mesh import dev_auth
from agentplex.mesh.control_service import control_host
from agentplex.mesh.parts import EnvoyPart, LocalModelPart, RedisPart, ServicePart
from agentplex.mesh.redis_process import free_port
from agentplex.mesh.state import pid_alive, write_state
from agentplex.mesh.supervisor import LaunchError, Runner, Supervised, Supervisor
from agentplex.runtime import audit
from agentplex.runtime.process import stop_each, stop_on_signals
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import ENV_PREFIX, Settings
from agentplex.runtime.tls import (
    CA_FILE,
    MeshTls,
    TlsFiles,
    cert_file,
    create_mesh_pki,
    key_file,
)

__all__ = ["LaunchError", "MeshLauncher", "run_until_signalled"]

# Documented defaults (README); `--ephemeral-ports` or `--port NAME=PORT` override them.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    # name: (gRPC port, metrics port)
    "memory": (50051, 9151),
    "registry": (50052, 9152),
    "tools": (50053, 9153),
    "assistant": (50061, 9161),
    "researcher": (50062, 9162),
    "supervisor": (50063, 9163),
}
DEFAULT_REDIS_PORT = 6399
# A rolling restart waits this long for the gateway to route to a restarted replica.
SETTLE_TIMEOUT_SECONDS = 30.0
# The gateway's control plane is a service like the others; Envoy's own ports:
DEFAULT_PORTS["gateway-xds"] = (50070, 9170)
GATEWAY_PORTS = {"gateway": 8080, "envoy-admin": 9901}
# Every part is reached on loopback, by name or address.
PKI_DNS_NAMES = ("localhost",)
PKI_IP_ADDRESSES = ("127.0.0.1",)


def ensure_pki(directory: Path) -> Path:
    """The development PKI in `directory`, made unless every file is already there (a
    restarted mesh keeps its certificates). Blocking. Returns the absolute path."""
    wanted = [directory / CA_FILE]
    for identity in callers.IDENTITIES:
        wanted += [cert_file(directory, identity), key_file(directory, identity)]
    if not all(path.is_file() for path in wanted):
        create_mesh_pki(
            directory,
            callers.IDENTITIES,
            dns_names=PKI_DNS_NAMES,
            ip_addresses=PKI_IP_ADDRESSES,
        )
    return directory.resolve()


def tls_env(pki: Path, identity: str) -> dict[str, str]:
    """The settings that give a part `identity`'s certificate from `pki`."""
    files = TlsFiles.for_identity(pki, identity)
    return {
        f"{ENV_PREFIX}TLS_CA_FILE": str(files.ca),
        f"{ENV_PREFIX}TLS_CERT_FILE": str(files.cert),
        f"{ENV_PREFIX}TLS_KEY_FILE": str(files.key),
    }


@dataclass
class MeshLauncher:
    state_file: Path
    redis_url: str | None = None
    ephemeral_ports: bool = False
    port_overrides: dict[str, int] = field(default_factory=dict)
    llm_provider: str | None = None
    workers: int = 1
    # Replicas per agent beyond the first (`--replicas assistant=2`), all behind the gateway.
    replicas: dict[str, int] = field(default_factory=dict)
    # Envoy in front of every agent, configured by its xDS control plane.
    gateway: bool = True
    # Bearer tokens required at the gateway, from a development issuer (mesh/dev_auth.py).
    auth: bool = True
    # Mutual TLS between the parts, from a development PKI (`ensure_pki`).
    mtls: bool = True
    # The agents to run (the built-ins, and those of `agent_files`) and the spec files
    # each agent and worker process is given (`--agents FILE`) to find its own.
    agents: dict[str, AgentSpec] = field(default_factory=lambda: dict(CATALOG))
    agent_files: tuple[Path, ...] = ()
    # The launcher's own settings (docs_dir and llm_provider are passed on to the parts).
    settings: Settings = field(default_factory=Settings)
    say: Callable[[str], None] = print
    supervisor: Supervisor = field(init=False)
    _control: ServiceHost | None = None
    _issuer: dev_auth.DevIssuer | None = None
    _run_dir: Path | None = None
    _pki: Path | None = None
    # The `cli` credentials the launcher probes its mTLS parts' health with.
    _probe_tls: MeshTls | None = None

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(
            backoff_seconds=self.settings.restart_backoff_seconds,
            backoff_max_seconds=self.settings.restart_backoff_max_seconds,
            say=self.say,
            settle=self._settle,
        )

    def _port(self, name: str, index: int) -> int:
        if name in self.port_overrides and index == 0:
            return self.port_overrides[name]
        if self.ephemeral_ports or name not in DEFAULT_PORTS:
            return 0  # workers serve only health and metrics: any free port
        return DEFAULT_PORTS[name][index]

    async def start(self) -> dict[str, Any]:
        """Start every part; returns the state written to the state file."""
        self._refuse_second_mesh()
        self._refuse_an_open_gateway()
        self._run_dir = self.state_file.parent
        (self._run_dir / "logs").mkdir(parents=True, exist_ok=True)
        # The launcher serves MeshControlService (restarts are administrative calls):
        # its audit lines join the children's in the mesh's one trail.
        audit.write_to(self._audit_log(), "mesh")
        if self.mtls:
            self._pki = await asyncio.to_thread(ensure_pki, self._run_dir / "pki")
            self._probe_tls = await TlsFiles.for_identity(self._pki, callers.CLI).load()
            self.say(f"  {'mtls':<20} {self._pki}  (development CA, a certificate per identity)")
        redis_url = self.redis_url
        if redis_url is None:
            redis_port = self.port_overrides.get(
                "redis", 0 if self.ephemeral_ports else DEFAULT_REDIS_PORT
            )
            redis = await self._supervise(
                RedisPart(port=redis_port, data_dir=self._run_dir / "redis")
            )
            redis_url = redis.address
            self.say(f"  {'redis':<20} {redis_url}  (embedded, supervised)")
        else:
            self.say(f"  {'redis':<20} {redis_url}  (REDIS_URL)")
        env = self._child_env(redis_url)
        if (self.llm_provider or self.settings.llm_provider) == "local":
            model = LocalModelPart(log_path=self._run_dir / "logs" / "llm.log")
            await self._supervise(model)
            env.update(model.agent_env())
            self.say(
                f"  {'llm (local)':<20} {model.address}  (SmolLM2-135M-Instruct, "
                f"log {model.log_path})"
            )
        memory = await self._start_part("memory", ["memory"], env, identity=callers.MEMORY)
        env["AGENTPLEX_MEMORY_ADDRESS"] = memory.address
        registry = await self._start_part("registry", ["registry"], env, identity=callers.REGISTRY)
        env["AGENTPLEX_REGISTRY_ADDRESS"] = registry.address
        # The built-in tool backend publishes its contracts to the registry on start.
        await self._start_part("tools", ["tools"], env, identity=callers.TOOLS)
        # Agents depend only on memory and registry, not on each other.
        await asyncio.gather(
            *(
                self._start_part(
                    replica,
                    ["agent", name, *self._spec_args],
                    env,
                    group=name,
                    identity=callers.AGENT,
                )
                for name in self.agents
                for replica in self._replica_names(name)
            )
        )
        # Workers run queued tasks; they start once the agents they serve are up.
        await asyncio.gather(
            *(
                self._start_part(
                    f"{name}-worker-{index}",
                    ["worker", name, *self._spec_args, "--name", f"{name}-worker-{index}"],
                    env,
                    group=f"{name}-worker",
                    identity=callers.WORKER,
                )
                for name in self.agents
                for index in range(1, self.workers + 1)
            )
        )
        if self.gateway:
            await self._start_gateway(env)
        self._control = control_host(self.supervisor)
        control = await self._control.start()
        return self._write_state(redis_url, control.address)

    @property
    def _spec_args(self) -> list[str]:
        """`--agents FILE` for each spec file, absolute: a part's working directory may differ."""
        return [arg for path in self.agent_files for arg in ("--agents", str(path.resolve()))]

    def _replica_names(self, agent: str) -> list[str]:
        """The first replica is named after the agent (the state file's key); then name-2..."""
        count = self.replicas.get(agent, 1)
        return [agent, *(f"{agent}-{index}" for index in range(2, count + 1))]

    def _write_state(self, redis_url: str, control_address: str) -> dict[str, Any]:
        assert self._run_dir is not None
        parts = self.supervisor.parts
        state: dict[str, Any] = {"redis": redis_url}
        model = next((p.runner for p in parts if p.name == "llm"), None)
        if model is not None:
            state["llm"] = model.address
        services = [p.runner for p in parts if isinstance(p.runner, ServicePart | EnvoyPart)]
        state.update({part.name: part.address for part in services if "-worker-" not in part.name})
        state["workers"] = {part.name: part.address for part in services if "-worker-" in part.name}
        state["metrics"] = {
            # Envoy serves Prometheus text on its admin API, not at /metrics.
            part.name: f"http://127.0.0.1:{part.metrics}"
            + ("/stats/prometheus" if part.name == "gateway" else "/metrics")
            for part in services
            if part.metrics
        }
        gateway = next((part for part in services if isinstance(part, EnvoyPart)), None)
        if gateway is not None:
            state["console"] = f"http://{gateway.address}/console/"
            state["envoy_admin"] = f"http://127.0.0.1:{gateway.metrics}"
        # The agents this mesh runs (each also under its own name, with its address).
        state["agents"] = sorted(self.agents)
        state["control"] = control_address
        if self._issuer is not None:
            state["auth"] = self._issuer.state()
        if self._pki is not None:
            state["pki"] = str(self._pki)
        state["logs"] = str(self._run_dir / "logs")
        state["pid"] = os.getpid()
        write_state(self.state_file, state)
        return state

    def _gateway_port(self, name: str) -> int:
        if name in self.port_overrides:
            return self.port_overrides[name]
        # A fixed port even when ephemeral: a restarted Envoy must listen where the first did.
        return free_port() if self.ephemeral_ports else GATEWAY_PORTS[name]

    async def _start_gateway(self, env: dict[str, str]) -> None:
        """The control plane (healthy once it has a snapshot), then Envoy booting from it."""
        assert self._run_dir is not None
        listen_port = self._gateway_port("gateway")
        xds_env = {**env, "AGENTPLEX_GATEWAY_LISTEN_PORT": str(listen_port)}
        if self.auth:
            self._issuer = await asyncio.to_thread(dev_auth.ensure_issuer, self._run_dir / "auth")
            xds_env.update(self._issuer.gateway_env())
            self.say(
                f"  {'auth':<20} {self._issuer.key_file.parent}  (development issuer; "
                "a token: agentplex token --tenant dev)"
            )
        if self._pki is not None:
            # The control plane's own certificate for the registry, and Envoy's, whose
            # paths it puts in Envoy's upstream TLS configuration.
            gateway = TlsFiles.for_identity(self._pki, callers.GATEWAY)
            xds_env.update(tls_env(self._pki, callers.GATEWAY_CONTROL_PLANE))
            xds_env[f"{ENV_PREFIX}TLS_GATEWAY_CERT_FILE"] = str(gateway.cert)
            xds_env[f"{ENV_PREFIX}TLS_GATEWAY_KEY_FILE"] = str(gateway.key)
        # Its xDS server stays plaintext on loopback: Envoy's bootstrap reaches it so.
        xds = await self._start_part(
            "gateway-xds", ["gateway-control-plane"], xds_env, plaintext=True
        )
        envoy = EnvoyPart(
            xds=xds.address,
            listen_port=listen_port,
            admin_port=self._gateway_port("envoy-admin"),
            run_dir=self._run_dir,
            env=env,
        )
        await self._supervise(envoy)
        self.say(
            f"  {'gateway':<20} {envoy.address}  (gRPC, gRPC-Web and JSON; "
            f"envoy admin :{envoy.metrics}, log {envoy.log_path})"
        )
        self.say(f"  {'console':<20} http://{envoy.address}/console/")

    async def _settle(self, part: Supervised) -> None:
        """After a requested restart of an agent replica: wait until the gateway routes to
        it again, so a rolling restart never stops the next replica before this one
        takes traffic (its own health check says SERVING a poll and a health check
        earlier than that)."""
        envoy = next((p.runner for p in self.supervisor.parts if p.name == "gateway"), None)
        if not isinstance(envoy, EnvoyPart) or part.group not in self.agents:
            return
        if not await envoy.routes_to(
            agent_cluster(part.group), part.runner.address, timeout=SETTLE_TIMEOUT_SECONDS
        ):
            self.say(
                f"agentplex: the gateway does not route to {part.name} yet after "
                f"{SETTLE_TIMEOUT_SECONDS:g}s; going on"
            )

    async def _supervise(self, runner: Runner) -> Runner:
        await self.supervisor.add(runner)
        return runner

    def _refuse_an_open_gateway(self) -> None:
        """Before anything starts, the control plane's own refusal (GatewaySettings)."""
        if not self.gateway or self.auth:
            return
        problem = GatewaySettings.from_settings(self.settings).open_to_anyone()
        if problem is not None:
            raise LaunchError(problem)

    def _refuse_second_mesh(self) -> None:
        if not self.state_file.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = json.loads(self.state_file.read_text()).get("pid")
            if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                raise LaunchError(
                    f"a mesh is already running here (pid {pid}, {self.state_file}); "
                    "stop it first or use --state-file for a second one"
                )

    def _child_env(self, redis_url: str) -> dict[str, str]:
        """The children's environment: ours, plus where the mesh's shared parts are."""
        env = dict(os.environ)
        env["AGENTPLEX_REDIS_URL"] = redis_url
        # Resolved here, so every part indexes the same directory; unset, the parts
        # search the documentation shipped with the package.
        if self.settings.docs_dir is not None:
            env["AGENTPLEX_DOCS_DIR"] = str(self.settings.docs_dir.resolve())
        env.setdefault("PYTHONUNBUFFERED", "1")
        # A part that dies of a signal leaves a Python traceback in its log.
        env.setdefault("PYTHONFAULTHANDLER", "1")
        if self.llm_provider:
            env["AGENTPLEX_LLM_PROVIDER"] = self.llm_provider
        # One audit trail for the mesh: the services' and the gateway's refusals and
        # administrative calls, each a JSON line (docs/SECURITY.md).
        env["AGENTPLEX_AUDIT_LOG_FILE"] = str(self._audit_log())
        # One port per machine: every part here would try to bind it (it is for probes
        # in a pod of one part).
        env.pop("AGENTPLEX_HEALTH_PORT", None)
        return env

    def _audit_log(self) -> Path:
        assert self._run_dir is not None
        configured = self.settings.audit_log_file
        return configured if configured is not None else self._run_dir / "logs" / "audit.log"

    async def _start_part(
        self,
        name: str,
        serve: list[str],
        env: dict[str, str],
        *,
        group: str | None = None,
        identity: str | None = None,
        plaintext: bool = False,
    ) -> ServicePart:
        """With `--mtls`, the part gets `identity`'s certificate and is probed over mTLS,
        unless it serves `plaintext` (its `env` then carries whatever TLS it uses)."""
        assert self._run_dir is not None
        port_name = group if group in DEFAULT_PORTS and name == group else name
        if self._pki is not None and identity is not None:
            env = {**env, **tls_env(self._pki, identity)}
        part = ServicePart(
            name,
            serve,
            port=self._port(port_name, 0),
            metrics_port=self._port(port_name, 1),
            env=env,
            log_path=self._run_dir / "logs" / f"{name}.log",
            group=group,
            tls=None if plaintext else self._probe_tls,
        )
        await self._supervise(part)
        self.say(f"  {name:<20} {part.address}  (metrics :{part.metrics}, log {part.log_path})")
        return part

    async def stop(self) -> None:
        """Stop everything started, in reverse order; idempotent.

        Every step runs even when one fails: a part that cannot be stopped
        must not leave the others (or Redis) running.
        """
        await stop_each(
            "agentplex up", [self._stop_control, self.supervisor.stop, self._forget_state]
        )

    async def _stop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            await control.stop()

    async def _forget_state(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if json.loads(self.state_file.read_text()).get("pid") == os.getpid():
                self.state_file.unlink()


def _state_address(launcher: MeshLauncher, name: str) -> str:
    return next((p.runner.address for p in launcher.supervisor.parts if p.name == name), "?")


def _banner(launcher: MeshLauncher) -> list[str]:
    """What `up` says once the mesh serves: how to reach it, and how secure it is."""
    lines = []
    if launcher.gateway:
        gateway = _state_address(launcher, "gateway")
        if launcher.auth:
            lines.append(
                "agentplex: the gateway requires a token: TOKEN=$(agentplex token --tenant dev), "
                f'then grpcurl -plaintext -H "authorization: Bearer $TOKEN" {gateway} list'
            )
        else:
            lines.append(
                "agentplex: the gateway checks no tokens (--no-auth; loopback only): "
                f"grpcurl -plaintext {gateway} list"
            )
    lines.append(
        f"agentplex: mesh is up; addresses in {launcher.state_file}. "
        'Try: agentplex run --stream --agent assistant "what is 17*23?"  '
        "(the agentplex commands need no token; agentplex ps shows the parts; Ctrl-C stops)"
    )
    return lines


async def run_until_signalled(launcher: MeshLauncher) -> int:
    """`agentplex up`'s main loop: start, report, keep the parts running until Ctrl-C or
    SIGTERM, stop. A part that exits is restarted by the supervisor, never fatal."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    launcher.say("agentplex: starting the mesh")
    try:
        try:
            await launcher.start()
        except LaunchError as exc:
            launcher.say(f"agentplex: {exc}")
            return 1
        for line in _banner(launcher):
            launcher.say(line)
        await stop.wait()
        launcher.say("agentplex: stopping")
    finally:
        await launcher.stop()
    launcher.say("agentplex: stopped")
    return 0
