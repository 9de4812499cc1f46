"""A real service process: `python -m agentplex.memory` starts, reports readiness,
serves, and exits cleanly on SIGTERM (or SIGINT)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplex.clients.memory import MemoryClient
from agentplex.runtime.settings import Settings
from agentplex.v1 import memory_pb2

START_TIMEOUT = 20.0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_memory_process_serves_and_exits_cleanly_on_signal(
    settings: Settings, tmp_path: Path, eventually, stop_signal: signal.Signals
) -> None:
    ready_file = tmp_path / "run" / "memory.json"
    log_path = tmp_path / "memory.log"
    env = {
        **os.environ,
        "AGENTPLEX_REDIS_URL": settings.redis_url,
        "AGENTPLEX_KEY_PREFIX": settings.key_prefix,
        "AGENTPLEX_GRACE_SECONDS": "2",
        "AGENTPLEX_DRAIN_SECONDS": "0",
        "AGENTPLEX_HEALTH_INTERVAL_SECONDS": "0.2",
    }
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentplex.memory",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready_file),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
    try:
        await eventually(
            lambda: ready_file.exists() or process.returncode is not None,
            timeout=START_TIMEOUT,
            message="memory process never wrote its ready file",
        )
        assert process.returncode is None, log_path.read_text()
        ready = json.loads(ready_file.read_text())
        assert ready["pid"] == process.pid
        assert isinstance(ready["metrics_port"], int)
        address = ready["address"]
        assert address.startswith("127.0.0.1:")

        async with grpc.aio.insecure_channel(address) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
                health_pb2.HealthCheckRequest(service="agentplex.v1.MemoryService"), timeout=5
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING

        client = MemoryClient(address)
        try:
            message = memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content="hi")
            assert await client.append("assistant", "proc-1", [message], timeout=5) == 1
            packet = await client.load("assistant", "proc-1", 100, timeout=5)
            assert [m.content for m in packet.messages] == ["hi"]
        finally:
            await client.close()

        async with httpx.AsyncClient(timeout=5) as http:
            metrics = await http.get(f"http://127.0.0.1:{ready['metrics_port']}/metrics")
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="AppendMessages",'
            'grpc_service="agentplex.v1.MemoryService",grpc_type="unary"}'
        ) in metrics.text

        process.send_signal(stop_signal)
        code = await asyncio.wait_for(process.wait(), timeout=10)
        logs = log_path.read_text()
        assert code == 0, logs
        # Logs are one JSON object per line, and the stop was graceful.
        lines = [json.loads(line) for line in logs.splitlines() if line.strip()]
        messages = [line["message"] for line in lines]
        assert "memory listening" in messages
        assert "memory received a stop signal; draining" in messages
        assert messages[-1] == "memory stopped"
        assert all(line["service"] == "memory" for line in lines)
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
