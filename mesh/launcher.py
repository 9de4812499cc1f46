"""`agentplex up`: the whole mesh as local processes, started in dependency order.

Redis (embedded unless REDIS_URL is set) → memory → registry → tool backend → agents →
task workers (`--workers N` per agent) → the gateway's xDS control plane → Envoy
(unless `--no-gateway`). Each
service is its own process; it reports the address it bound through a ready
file, and counts as up once its gRPC health check says SERVING. Logs go to
`.agentplex/logs/<name>.log` so this terminal shows only progress. Stopping
runs in reverse order, each part drained through SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2

from agentplex.agents.catalog import CATALOG
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.envoy import EnvoyError, EnvoyProcess
from agentplex.gateway.resources import HostPort
from agentplex.mesh.local_model import LocalModelError, LocalModelServer
from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.mesh.state import pid_alive, write_state
from agentplex.runtime.children import terminate
from agentplex.runtime.clients import health_status
from agentplex.runtime.process import stop_each, stop_on_signals
from agentplex.runtime.settings import Settings

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0

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
# The gateway's control plane is a service like the others; Envoy's own ports:
DEFAULT_PORTS["gateway-xds"] = (50070, 9170)
GATEWAY_PORTS = {"gateway": 8080, "envoy-admin": 9901}


class LaunchError(Exception):
    """A part of the mesh failed to start; the message says which and why."""


@dataclass
class Part:
    name: str
    module: str
    args: list[str]
    port: int
    metrics_port: int
    process: asyncio.subprocess.Process | None = None
    address: str = ""
    metrics: int | None = None
    log_path: Path | None = None

    @property
    def exit_code(self) -> int | None:
        """The process's exit code; None while it runs (or before it started)."""
        return None if self.process is None else self.process.returncode

    async def stop(self) -> None:
        """SIGTERM (the part drains), SIGKILL if it outlasts the timeout; idempotent."""
        if self.process is not None:
            await terminate(self.process, timeout=STOP_TIMEOUT_SECONDS)


@dataclass
class MeshLauncher:
    state_file: Path
    redis_url: str | None = None
    ephemeral_ports: bool = False
    port_overrides: dict[str, int] = field(default_factory=dict)
    llm_provider: str | None = None
    workers: int = 1
    # Envoy in front of every agent, configured by its xDS control plane.
    gateway: bool = True
    # The launcher's own settings (docs_dir and llm_provider are passed on to the parts).
    settings: Settings = field(default_factory=Settings)
    say: Callable[[str], None] = print
    _redis: EmbeddedRedis | None = None
    _local_model: LocalModelServer | None = None
    _parts: list[Part] = field(default_factory=list)
    _run_dir: Path | None = None

    def _port(self, name: str, index: int) -> int:
        if name in self.port_overrides and index == 0:
            return self.port_overrides[name]
        if self.ephemeral_ports or name not in DEFAULT_PORTS:
            return 0  # workers serve only health and metrics: any free port
        return DEFAULT_PORTS[name][index]

    async def start(self) -> dict[str, Any]:
        """Start every part; returns the state written to the state file."""
        self._refuse_second_mesh()
        self._run_dir = self.state_file.parent
        (self._run_dir / "logs").mkdir(parents=True, exist_ok=True)
        redis_url = self.redis_url
        if redis_url is None:
            redis_port = self.port_overrides.get(
                "redis", 0 if self.ephemeral_ports else DEFAULT_REDIS_PORT
            )
            self._redis = EmbeddedRedis(port=redis_port, data_dir=self._run_dir / "redis")
            try:
                redis_url = await self._redis.start()
            except (RuntimeError, FileNotFoundError) as exc:
                raise LaunchError(
                    f"embedded Redis failed to start: {exc}. Is port {redis_port} "
                    "taken? Try --port redis=PORT or set REDIS_URL."
                ) from None
            self.say(f"  {'redis':<20} {redis_url}  (embedded)")
        else:
            self.say(f"  {'redis':<20} {redis_url}  (REDIS_URL)")
        env = self._child_env(redis_url)
        if (self.llm_provider or self.settings.llm_provider) == "local":
            env.update(await self._start_local_model())
        memory = await self._start_part("memory", "agentplex.memory", [], env)
        env["AGENTPLEX_MEMORY_ADDRESS"] = memory.address
        registry = await self._start_part("registry", "agentplex.registry", [], env)
        env["AGENTPLEX_REGISTRY_ADDRESS"] = registry.address
        # The built-in tool backend publishes its contracts to the registry on start.
        await self._start_part("tools", "agentplex.tools", [], env)
        # Agents depend only on memory and registry, not on each other.
        await asyncio.gather(
            *(
                self._start_part(name, "agentplex.agents", ["--agent", name], env)
                for name in CATALOG
            )
        )
        # Workers run queued tasks; they start once the agents they serve are up.
        await asyncio.gather(
            *(
                self._start_part(
                    f"{name}-worker-{index}",
                    "agentplex.agents.worker",
                    ["--agent", name, "--name", f"{name}-worker-{index}"],
                    env,
                )
                for name in CATALOG
                for index in range(1, self.workers + 1)
            )
        )
        if self.gateway:
            await self._start_gateway(env)
        state: dict[str, Any] = {"redis": redis_url}
        if self._local_model is not None:
            state["llm"] = self._local_model.base_url
        state.update(
            {part.name: part.address for part in self._parts if "-worker-" not in part.name}
        )
        state["workers"] = {
            part.name: part.address for part in self._parts if "-worker-" in part.name
        }
        state["metrics"] = {
            # Envoy serves Prometheus text on its admin API, not at /metrics.
            part.name: f"http://127.0.0.1:{part.metrics}"
            + ("/stats/prometheus" if part.name == "gateway" else "/metrics")
            for part in self._parts
            if part.metrics
        }
        gateway = next((p for p in self._parts if p.name == "gateway"), None)
        if gateway is not None:
            state["console"] = f"http://{gateway.address}/console/"
            state["envoy_admin"] = f"http://127.0.0.1:{gateway.metrics}"
        state["logs"] = str(self._run_dir / "logs")
        state["pid"] = os.getpid()
        write_state(self.state_file, state)
        return state

    def _gateway_port(self, name: str) -> int:
        if name in self.port_overrides:
            return self.port_overrides[name]
        return 0 if self.ephemeral_ports else GATEWAY_PORTS[name]

    async def _start_gateway(self, env: dict[str, str]) -> None:
        """The control plane (healthy once it has a snapshot), then Envoy booting from it."""
        assert self._run_dir is not None
        listen_port = self._gateway_port("gateway")
        xds = await self._start_part(
            "gateway-xds",
            "agentplex.gateway",
            [],
            {**env, "AGENTPLEX_GATEWAY_LISTEN_PORT": str(listen_port)},
        )
        log_path = self._run_dir / "logs" / "envoy.log"
        envoy = EnvoyProcess(
            BootstrapOptions(
                HostPort.parse(xds.address), admin_port=self._gateway_port("envoy-admin")
            ),
            work_dir=self._run_dir / "envoy",
            log_path=log_path,
        )
        try:
            admin = await envoy.start(timeout=START_TIMEOUT_SECONDS)
            listener = await envoy.listener(timeout=START_TIMEOUT_SECONDS)
        except EnvoyError as exc:
            await envoy.stop()
            hint = f" Is port {listen_port} taken? Use --port gateway=PORT." if listen_port else ""
            raise LaunchError(f"the Envoy gateway failed to start: {exc}{hint}") from None
        if not await _gateway_ready(listener, envoy):
            await envoy.stop()
            raise LaunchError(
                f"the gateway did not become ready within {START_TIMEOUT_SECONDS:g}s "
                f"(its default agent never passed a health check); see {log_path}"
            )
        # Envoy is one more part: watched for crashes, stopped first.
        part = Part("gateway", "envoy", [], listen_port, admin.port, process=envoy.process)
        part.address, part.metrics, part.log_path = (
            f"{listener.host}:{listener.port}",
            admin.port,
            log_path,
        )
        self._parts.append(part)
        self.say(
            f"  {'gateway':<20} {part.address}  (gRPC, gRPC-Web and JSON; "
            f"envoy admin :{admin.port}, log {log_path})"
        )
        self.say(f"  {'console':<20} http://{part.address}/console/")

    async def _start_local_model(self) -> dict[str, str]:
        """Start the offline model server; the env that points agents at it."""
        assert self._run_dir is not None
        log_path = self._run_dir / "logs" / "llm.log"
        self._local_model = LocalModelServer(log_path=log_path)
        try:
            base_url = await self._local_model.start()
        except LocalModelError as exc:
            raise LaunchError(f"local model: {exc}") from None
        self.say(f"  {'llm (local)':<20} {base_url}  (SmolLM2-135M-Instruct, log {log_path})")
        return self._local_model.agent_env()

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
        # Resolved here, so every part indexes the directory `up` runs in.
        env["AGENTPLEX_DOCS_DIR"] = str(self.settings.docs_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.llm_provider:
            env["AGENTPLEX_LLM_PROVIDER"] = self.llm_provider
        return env

    async def _start_part(
        self, name: str, module: str, args: list[str], env: dict[str, str]
    ) -> Part:
        assert self._run_dir is not None
        part = Part(name, module, args, self._port(name, 0), self._port(name, 1))
        ready_file = Path(tempfile.mkdtemp(prefix="agentplex-")) / f"{name}.ready"
        part.log_path = self._run_dir / "logs" / f"{name}.log"
        log = part.log_path.open("ab")
        try:
            part.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                "--port",
                str(part.port),
                "--metrics-port",
                str(part.metrics_port),
                "--ready-file",
                str(ready_file),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            )
        finally:
            log.close()
        self._parts.append(part)
        try:
            ready = await self._wait_ready(part, ready_file)
        finally:
            with contextlib.suppress(OSError):
                ready_file.unlink()
                ready_file.parent.rmdir()
        part.address, part.metrics = ready["address"], ready.get("metrics_port")
        self.say(f"  {name:<20} {part.address}  (metrics :{part.metrics}, log {part.log_path})")
        return part

    async def _wait_ready(self, part: Part, ready_file: Path) -> dict[str, Any]:
        assert part.process is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_SECONDS
        ready: dict[str, Any] | None = None
        while loop.time() < give_up:
            if part.process.returncode is not None:
                tail = _tail(part.log_path)
                hint = (
                    f"\nIs port {part.port} taken? Use --port {part.name}=PORT or "
                    "--ephemeral-ports."
                    if "cannot listen" in tail
                    else ""
                )
                raise LaunchError(
                    f"{part.name} exited with code {part.process.returncode} "
                    f"while starting:\n{tail}{hint}"
                )
            if ready is None:
                ready = await asyncio.to_thread(_read_ready, ready_file)
            if ready is not None and await _serving(ready["address"]):
                return ready
            await asyncio.sleep(0.05)
        raise LaunchError(
            f"{part.name} did not become healthy within {START_TIMEOUT_SECONDS:g}s:"
            f"\n{_tail(part.log_path)}"
        )

    async def stop(self) -> None:
        """Stop everything started, in reverse order; idempotent.

        Every step runs even when one fails: a part that cannot be stopped
        must not leave the others (or Redis) running.
        """
        parts, self._parts = self._parts, []
        for part in reversed(parts):
            await stop_each(part.name, [part.stop])
        await stop_each(
            "agentplex up", [self._stop_local_model, self._stop_redis, self._forget_state]
        )

    async def _stop_local_model(self) -> None:
        model, self._local_model = self._local_model, None
        if model is not None:
            await model.stop()

    async def _stop_redis(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.stop()

    async def _forget_state(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if json.loads(self.state_file.read_text()).get("pid") == os.getpid():
                self.state_file.unlink()

    def exited_parts(self) -> list[Part]:
        return [p for p in self._parts if p.exit_code is not None]


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            status = await health_status(channel, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def _tail(path: Path | None, lines: int = 6) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


async def _gateway_ready(listener: HostPort, envoy: EnvoyProcess) -> bool:
    """/ready answers 200 once Envoy has health-checked the default agent."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + START_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=1.0) as client:
        while loop.time() < give_up:
            if envoy.process is not None and envoy.process.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"http://{listener.host}:{listener.port}/ready")
                if response.status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    return False


def _state_address(launcher: MeshLauncher, name: str) -> str:
    return next((p.address for p in launcher._parts if p.name == name), "?")


async def run_until_signalled(launcher: MeshLauncher) -> int:
    """`agentplex up`'s main loop: start, report, wait for Ctrl-C/SIGTERM or a crash, stop."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    launcher.say("agentplex: starting the mesh")
    code = 0
    try:
        try:
            await launcher.start()
        except LaunchError as exc:
            launcher.say(f"agentplex: {exc}")
            return 1
        if launcher.gateway:
            launcher.say(
                "agentplex: through the gateway: grpcurl -plaintext "
                f"{_state_address(launcher, 'gateway')} list"
            )
        launcher.say(
            f"agentplex: mesh is up; addresses in {launcher.state_file}. "
            'Try: agentplex run --stream --agent assistant "what is 17*23?"  '
            "(Ctrl-C stops)"
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            crashed = launcher.exited_parts()
            if crashed:
                names = ", ".join(f"{p.name} (exit {p.exit_code})" for p in crashed)
                launcher.say(
                    f"agentplex: {names} stopped unexpectedly; shutting the mesh down. "
                    f"Logs: {crashed[0].log_path}"
                )
                code = 1
                break
        else:
            launcher.say("agentplex: stopping")
    finally:
        await launcher.stop()
    if code == 0:
        launcher.say("agentplex: stopped")
    return code
