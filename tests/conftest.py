"""Shared fixtures: one real Redis per test session, isolated per test by key prefix,
and the real services started in-process on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.runtime.settings import Settings

if TYPE_CHECKING:
    from agentplex.agents.llm.base import LLMProvider
    from agentplex.runtime.server import ServiceHost

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (started on its own loop)."""
    server = EmbeddedRedis()
    loop = asyncio.new_event_loop()
    try:
        url = loop.run_until_complete(server.start())
        yield url
    finally:
        loop.run_until_complete(server.stop())
        loop.close()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        docs_dir=REPO_ROOT,
        health_interval_seconds=0.2,
        grace_seconds=1.0,
        drain_seconds=0,
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Mesh:
    """Addresses of the in-process services of one test."""

    memory: str
    registry: str
    tools: str
    agents: dict[str, str]
    settings: Settings


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[Mesh]:
    """Memory, registry and both catalog agents, real gRPC servers on port 0."""
    from agentplex.agents import app as agents_app
    from agentplex.agents.catalog import CATALOG
    from agentplex.memory import app as memory_app
    from agentplex.registry import app as registry_app
    from agentplex.tools import app as tools_app

    hosts = []
    try:
        memory_host = memory_app.build_host(settings, metrics_port=None)
        hosts.append(memory_host)
        memory = (await memory_host.start()).address
        registry_host = await registry_app.build_host(settings, metrics_port=None)
        hosts.append(registry_host)
        registry = (await registry_host.start()).address
        agent_settings = settings.model_copy(
            update={"memory_address": memory, "registry_address": registry}
        )
        tools_host = await tools_app.build_host(agent_settings, metrics_port=None)
        hosts.append(tools_host)
        tools = (await tools_host.start()).address
        agents = {}
        for name, spec in CATALOG.items():
            host = agents_app.build_host(spec, agent_settings, metrics_port=None)
            hosts.append(host)
            agents[name] = (await host.start()).address
        yield Mesh(
            memory=memory, registry=registry, tools=tools, agents=agents, settings=agent_settings
        )
    finally:
        for host in reversed(hosts):
            await host.stop()


@pytest.fixture
async def channel_to():
    """Open channels by address; all are closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        await channel.close()


async def _eventually(
    condition: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"{message} within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def eventually():
    """`await eventually(condition, timeout=…, message=…)`: poll instead of sleeping."""
    return _eventually


class GatedModel:
    """A real HTTP server speaking the OpenAI chat-completions wire format.

    Plays a two-step agent: the first call for a prompt asks for `notes.write`
    with the prompt as the note (a real side effect); the call after the tool
    result answers "saved" — but only once `gate` is open. Tests use the gate
    to hold a task between its side effect and its end, then kill, stop or
    drain the worker running it.
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.gate = threading.Event()
        self.answer_calls = 0
        self.tool_calls = 0
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import json as _json

                body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]
                if last["role"] == "user":
                    with model._lock:
                        model.tool_calls += 1
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {
                                    "name": "notes__write",
                                    "arguments": _json.dumps({"text": last["content"]}),
                                },
                            }
                        ],
                    }
                    finish = "tool_calls"
                else:
                    with model._lock:
                        model.answer_calls += 1
                    model.gate.wait(timeout=60)
                    message, finish = {"role": "assistant", "content": "saved"}, "stop"
                payload = _json.dumps(
                    {
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 5},
                    }
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the worker that asked was killed

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def gated_model() -> Iterator[GatedModel]:
    model = GatedModel()
    try:
        yield model
    finally:
        model.close()


class WorkerProcesses:
    """Real worker processes (`python -m agentplex.tasks`) for one agent."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self._tmp = tmp_path
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []
        self.metrics: dict[int, int] = {}

    async def start(self, agent: str = "assistant", **env: str) -> subprocess.Popen[bytes]:
        index = len(self.processes)
        ready = self._tmp / f"worker-{index}.ready"
        log = (self._tmp / f"worker-{index}.log").open("wb")
        # Popen only forks and execs; the waiting is done by polling below.
        process = subprocess.Popen(  # noqa: ASYNC220
            [
                sys.executable,
                "-m",
                "agentplex.agents.worker",
                "--agent",
                agent,
                "--name",
                f"{agent}-w{index}",
                "--ready-file",
                str(ready),
            ],
            env={**os.environ, **self.env, **env},
            stdout=log,
            stderr=log,
        )
        log.close()
        self.processes.append(process)
        await _eventually(
            lambda: ready.exists() or process.poll() is not None,
            timeout=30,
            message="worker did not start",
        )
        if process.poll() is not None:
            raise AssertionError(f"worker exited: {self.log(process)}")
        self.metrics[process.pid] = json.loads(ready.read_text())["metrics_port"]
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        index = self.processes.index(process)
        return (self._tmp / f"worker-{index}.log").read_text(errors="replace")[-3000:]

    async def metric(self, process: subprocess.Popen[bytes], name: str, **labels: str) -> float:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{self.metrics[process.pid]}/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait(timeout=10)


@pytest.fixture
def worker_processes(
    mesh: Mesh, tmp_path: Path, gated_model: GatedModel
) -> Iterator[WorkerProcesses]:
    """Workers as separate processes, pointed at the test's mesh and the gated model."""
    settings = mesh.settings
    env = {
        "AGENTPLEX_REDIS_URL": settings.redis_url,
        "AGENTPLEX_KEY_PREFIX": settings.key_prefix,
        "AGENTPLEX_MEMORY_ADDRESS": settings.memory_address,
        "AGENTPLEX_REGISTRY_ADDRESS": settings.registry_address,
        "AGENTPLEX_LLM_PROVIDER": "openai",
        "AGENTPLEX_OPENAI_BASE_URL": gated_model.base_url,
        "AGENTPLEX_TASK_LEASE_SECONDS": "1.5",
        "AGENTPLEX_GRACE_SECONDS": "1",
        "AGENTPLEX_DRAIN_SECONDS": "0",
        "AGENTPLEX_HEALTH_INTERVAL_SECONDS": "0.2",
        "AGENTPLEX_LOG_LEVEL": "INFO",
    }
    workers = WorkerProcesses(tmp_path, env)
    try:
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
async def start_worker(mesh: Mesh) -> AsyncIterator[Callable[..., Awaitable[object]]]:
    """`await start_worker("assistant", llm=…)`: a task worker for that agent's queue,
    in this event loop, pointed at the test's mesh; drained and stopped afterwards.
    Delegation (agent.<name> tools) runs sub-tasks on these queues."""
    from agentplex.agents.catalog import CATALOG
    from agentplex.agents.worker import build_worker

    running: list[tuple[asyncio.Event, asyncio.Task[None], ServiceHost]] = []

    async def start(agent: str, *, llm: LLMProvider | None = None) -> object:
        worker, host = build_worker(
            CATALOG[agent],
            mesh.settings,
            consumer=f"{agent}-test-{len(running)}",
            metrics_port=None,
            llm=llm,
        )
        worker.cancel_poll_seconds = 0.05
        await host.start()
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(worker.run(stop)), host))
        return worker

    try:
        yield start
    finally:
        for stop, _, _ in running:
            stop.set()
        for _, task, host in reversed(running):
            await asyncio.wait_for(task, timeout=15)
            await host.stop()


@pytest.fixture
async def workers(start_worker) -> None:
    """One plain worker per catalog agent, so delegated sub-tasks run."""
    from agentplex.agents.catalog import CATALOG

    for agent in CATALOG:
        await start_worker(agent)


@pytest.fixture(scope="session")
def spans():
    """Finished spans of this test process (one exporter for the session: `clear()` first)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentplex.runtime.telemetry import add_span_processor

    exporter = InMemorySpanExporter()
    add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
