"""The kinds of process `agentplex up` runs, each as a supervisor `Runner`.

A Python part (`python -m agentplex.<part>`) reports its bound address in a
ready file and counts as started once its gRPC health check says SERVING.
Redis, Envoy and the model server have their own readiness checks. Every
relaunch reuses the first start's port: the other parts were given the
address once, in their environment, and must find the part there again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
from grpc_health.v1 import health_pb2

from agentplex.gateway.envoy import EnvoyError, listener_address
from agentplex.gateway.resources import HostPort
from agentplex.mesh.local_model import LocalModelError, LocalModelServer
from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.mesh.supervisor import LaunchError
from agentplex.runtime.children import spawn, terminate
from agentplex.runtime.clients import health_status

if TYPE_CHECKING:
    from agentplex.runtime.tls import MeshTls

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


class ServicePart:
    """An agentplex process: a service, a task worker or the gateway's control plane,
    started as `agentplex serve` starts it anywhere else (`serve` is its part and
    arguments, e.g. `["agent", "assistant"]`)."""

    def __init__(
        self,
        name: str,
        serve: list[str],
        *,
        port: int,
        metrics_port: int,
        env: dict[str, str],
        log_path: Path,
        group: str | None = None,
        tls: MeshTls | None = None,
    ) -> None:
        """`tls`: the launcher's credentials for the health probe, when the part serves
        mTLS."""
        self.name = name
        self.group = group or name
        self.serve = serve
        self.port = port
        self.metrics_port = metrics_port
        self.env = env
        self.log_path: Path | None = log_path
        self.metrics: int | None = None
        self.tls = tls
        self._process: asyncio.subprocess.Process | None = None
        self._address = ""

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._process

    @property
    def address(self) -> str:
        return self._address

    async def launch(self) -> None:
        assert self.log_path is not None
        ready_dir = Path(tempfile.mkdtemp(prefix="agentplex-"))
        ready_file = ready_dir / f"{self.name}.ready"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await spawn(
                sys.executable,
                "-m",
                "agentplex.mesh.serve",
                *self.serve,
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--ready-file",
                str(ready_file),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            ready = await self._wait_ready(ready_file)
        except BaseException:
            await self.stop(graceful=False)
            raise
        finally:
            shutil.rmtree(ready_dir, ignore_errors=True)
        self._address, self.metrics = ready["address"], ready.get("metrics_port")
        # Relaunches keep the ports: peers and the state file were told them.
        self.port = int(self._address.rsplit(":", 1)[1])
        if self.metrics:
            self.metrics_port = int(self.metrics)

    async def _wait_ready(self, ready_file: Path) -> dict[str, Any]:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_SECONDS
        ready: dict[str, Any] | None = None
        while loop.time() < give_up:
            if self._process.returncode is not None:
                tail = log_tail(self.log_path)
                hint = (
                    f"\nIs port {self.port} taken? Use --port {self.name}=PORT or "
                    "--ephemeral-ports."
                    if "cannot listen" in tail
                    else ""
                )
                raise LaunchError(
                    f"{self.name} exited with code {self._process.returncode} "
                    f"while starting:\n{tail}{hint}"
                )
            if ready is None:
                ready = await asyncio.to_thread(_read_ready, ready_file)
            if ready is not None and await serving(ready["address"], tls=self.tls):
                return ready
            await asyncio.sleep(0.05)
        raise LaunchError(
            f"{self.name} did not become healthy within {START_TIMEOUT_SECONDS:g}s:"
            f"\n{log_tail(self.log_path)}"
        )

    async def stop(self, *, graceful: bool) -> None:
        await stop_process(self._process, graceful=graceful)


class RedisPart:
    """The embedded redis-server; restarted on the same port and AOF file, so every
    accepted task and stored turn comes back with it."""

    def __init__(self, *, port: int, data_dir: Path) -> None:
        self.name = self.group = "redis"
        self.log_path: Path | None = data_dir / "redis.log"
        self._port = port
        self._data_dir = data_dir
        self._redis: EmbeddedRedis | None = None

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._redis.process if self._redis is not None else None

    @property
    def address(self) -> str:
        return self._redis.url if self._redis is not None else ""

    async def launch(self) -> None:
        self._redis = EmbeddedRedis(port=self._port, data_dir=self._data_dir)
        try:
            await self._redis.start()
        except (RuntimeError, FileNotFoundError) as exc:
            raise LaunchError(
                f"embedded Redis failed to start: {exc}. Is port {self._port} "
                "taken? Try --port redis=PORT or set REDIS_URL."
            ) from None
        self._port = self._redis.port

    async def stop(self, *, graceful: bool) -> None:
        if self._redis is not None:
            await self._redis.stop()


class LocalModelPart:
    """The offline model server (`--llm local`), restarted on the same port."""

    def __init__(self, *, log_path: Path) -> None:
        self.name = self.group = "llm"
        self.log_path: Path | None = log_path
        self._port = 0
        self._server: LocalModelServer | None = None

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._server.process if self._server is not None else None

    @property
    def address(self) -> str:
        return self._server.base_url if self._server is not None else ""

    def agent_env(self) -> dict[str, str]:
        assert self._server is not None
        return self._server.agent_env()

    async def launch(self) -> None:
        self._server = LocalModelServer(log_path=self.log_path, port=self._port)
        try:
            await self._server.start()
        except LocalModelError as exc:
            raise LaunchError(f"local model: {exc}") from None
        self._port = int(self._server.base_url.rsplit(":", 1)[1].split("/", 1)[0])

    async def stop(self, *, graceful: bool) -> None:
        if self._server is not None:
            await self._server.stop()


class EnvoyPart:
    """Envoy as `agentplex serve envoy` runs it anywhere, booting from the control plane;
    ready once it routes to an agent. A relaunch keeps the admin port (`routes_to`
    and the state file name it)."""

    def __init__(
        self, *, xds: str, listen_port: int, admin_port: int, run_dir: Path, env: dict[str, str]
    ) -> None:
        self.name = self.group = "gateway"
        self.log_path: Path | None = run_dir / "logs" / "envoy.log"
        self.metrics: int | None = None
        self._listen_port = listen_port
        self._admin_port = admin_port
        self._env = {**env, "AGENTPLEX_GATEWAY_CONTROL_PLANE_ADDRESS": xds}
        self._work_dir = run_dir / "envoy"  # its bootstrap, kept for whoever debugs it
        self._process: asyncio.subprocess.Process | None = None
        self._address = ""

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._process

    @property
    def address(self) -> str:
        return self._address

    async def launch(self) -> None:
        assert self.log_path is not None
        ready_dir = Path(tempfile.mkdtemp(prefix="agentplex-"))
        ready_file = ready_dir / "envoy.ready"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**self._env, "AGENTPLEX_GATEWAY_ADMIN_PORT": str(self._admin_port)}
        try:
            with self.log_path.open("ab") as log:
                self._process = await spawn(
                    sys.executable,
                    "-m",
                    "agentplex.mesh.serve",
                    "envoy",
                    "--work-dir",
                    str(self._work_dir),
                    "--ready-file",
                    str(ready_file),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            admin = await self._admin(ready_file)
            listener = await listener_address(admin, self._process, timeout=START_TIMEOUT_SECONDS)
            if not await _gateway_ready(listener, self._process):
                raise LaunchError(
                    f"the gateway did not become ready within {START_TIMEOUT_SECONDS:g}s "
                    f"(its default agent never passed a health check); see {self.log_path}"
                )
        except EnvoyError as exc:
            await self.stop(graceful=False)
            hint = (
                f" Is port {self._listen_port} taken? Use --port gateway=PORT."
                if self._listen_port
                else ""
            )
            raise LaunchError(
                f"the Envoy gateway failed to start: {exc}{hint}\n{log_tail(self.log_path)}"
            ) from None
        except BaseException:
            await self.stop(graceful=False)
            raise
        finally:
            shutil.rmtree(ready_dir, ignore_errors=True)
        self._admin_port = self.metrics = admin.port
        self._address = f"{listener.host}:{listener.port}"

    async def _admin(self, ready_file: Path) -> HostPort:
        """The admin address `serve envoy` reports once Envoy runs."""
        assert self._process is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_SECONDS
        while loop.time() < give_up:
            if self._process.returncode is not None:
                raise EnvoyError(f"envoy exited with code {self._process.returncode}")
            ready = _read_ready(ready_file)
            if ready is not None:
                return HostPort.parse(ready["address"])
            await asyncio.sleep(0.05)
        raise EnvoyError(f"envoy did not start within {START_TIMEOUT_SECONDS:g}s")

    async def stop(self, *, graceful: bool) -> None:
        """SIGTERM drains (health check failed first, then the listeners); SIGINT is quick."""
        await stop_process(self._process, graceful=graceful)

    async def routes_to(self, cluster: str, address: str, *, timeout: float) -> bool:
        """Wait until Envoy has `address` in `cluster` and its health checks pass."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        async with httpx.AsyncClient(timeout=1.0) as client:
            while loop.time() < give_up:
                with contextlib.suppress(httpx.HTTPError):
                    listing = await client.get(f"http://127.0.0.1:{self.metrics}/clusters")
                    if f"{cluster}::{address}::health_flags::healthy" in listing.text:
                        return True
                await asyncio.sleep(0.1)
        return False


async def stop_process(process: asyncio.subprocess.Process | None, *, graceful: bool) -> None:
    """An agentplex process's stop: SIGTERM drains, SIGINT skips the drain delay (the whole
    mesh is going); SIGKILL if it outlasts STOP_TIMEOUT_SECONDS."""
    if process is not None:
        await terminate(
            process,
            timeout=STOP_TIMEOUT_SECONDS,
            sig=signal.SIGTERM if graceful else signal.SIGINT,
        )


async def serving(address: str, *, tls: MeshTls | None = None) -> bool:
    """True once the gRPC server at `address` says SERVING (over mTLS with `tls`: health
    accepts any mesh certificate)."""
    channel = (
        # A part this launcher started: `localhost` is in every certificate it issued.
        grpc.aio.secure_channel(
            address,
            tls.channel_credentials(),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        if tls is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
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


def log_tail(path: Path | None, lines: int = 6) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


async def _gateway_ready(listener: HostPort, process: asyncio.subprocess.Process) -> bool:
    """/ready answers 200 once Envoy has health-checked the default agent."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + START_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=1.0) as client:
        while loop.time() < give_up:
            if process.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"http://{listener.host}:{listener.port}/ready")
                if response.status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    return False
