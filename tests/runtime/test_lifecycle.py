"""The process lifecycle every main shares (runtime/process.py): isolated stop steps, start
/run/stop of a part, and real processes (the gateway's control plane, a worker, a service)
parsing the shared flags, refusing bad settings and stopping gracefully on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentplex.runtime.process import (
    EXIT_STOP_OVERRAN,
    Endpoint,
    serve,
    stop_each,
    until_stopped,
)
from agentplex.runtime.server import ServiceHost

START_TIMEOUT = 20.0


# --- stop steps -----------------------------------------------------------------------------


async def test_stop_each_runs_every_step_and_names_the_one_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def close_redis() -> None:
        ran.append("redis")

    async def withdraw_tools() -> None:
        ran.append("withdraw")
        raise ConnectionError("registry is gone")

    async def close_channel() -> None:
        ran.append("channel")

    with caplog.at_level(logging.ERROR):
        ok = await stop_each("tools", [withdraw_tools, close_redis, close_channel])
    assert not ok
    assert ran == ["withdraw", "redis", "channel"]
    [record] = caplog.records
    assert record.getMessage().startswith("tools: stop step ")
    assert "withdraw_tools failed" in record.getMessage()
    assert record.exc_info is not None and "registry is gone" in str(record.exc_info[1])


async def test_stop_each_lets_cancellation_through() -> None:
    ran: list[str] = []

    async def cancelled() -> None:
        raise asyncio.CancelledError

    async def after() -> None:
        ran.append("after")

    with pytest.raises(asyncio.CancelledError):
        await stop_each("part", [cancelled, after])
    assert ran == []


async def test_a_failing_hook_does_not_skip_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")
        raise RuntimeError("first hook broke")

    async def second() -> None:
        ran.append("second")

    host = ServiceHost(
        name="probe",
        register=lambda server: [],
        metrics_port=0,
        grace_seconds=0.5,
        on_stop=[first, second],
    )
    await host.start()
    with caplog.at_level(logging.INFO):
        await host.stop()
        await host.stop()
        await asyncio.gather(host.stop(), host.stop())
    assert ran == ["first", "second"]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("first failed" in message for message in messages) == 1
    assert messages[-1] == "probe stopped"
    assert host._metrics is None  # the steps before the hooks ran too


# --- a part's life --------------------------------------------------------------------------


class FakePart:
    """A part that records what the lifecycle did to it."""

    def __init__(self, start_seconds: float = 0.0) -> None:
        self.start_seconds = start_seconds
        self.events: list[str] = []

    async def start(self) -> Endpoint:
        self.events.append("start")
        await asyncio.sleep(self.start_seconds)
        self.events.append("started")
        return Endpoint("127.0.0.1:1234", 9999)

    async def run(self, stop: asyncio.Event) -> None:
        self.events.append("run")
        await stop.wait()

    async def stop(self) -> None:
        self.events.append("stop")


async def test_serve_starts_announces_runs_and_stops(tmp_path: Path, eventually) -> None:
    part, stop = FakePart(), asyncio.Event()
    ready = tmp_path / "part.ready"
    serving = asyncio.create_task(serve(part, stop, ready))
    await eventually(lambda: "run" in part.events, message="the part never ran")
    assert json.loads(ready.read_text()) == {
        "address": "127.0.0.1:1234",
        "metrics_port": 9999,
        "pid": os.getpid(),
    }
    stop.set()
    await asyncio.wait_for(serving, timeout=5)
    assert part.events == ["start", "started", "run", "stop"]


async def test_a_stop_during_start_cancels_it_and_still_stops(tmp_path: Path, eventually) -> None:
    part, stop = FakePart(start_seconds=30), asyncio.Event()
    serving = asyncio.create_task(serve(part, stop, tmp_path / "part.ready"))
    await eventually(lambda: "start" in part.events, message="the part never started")
    stop.set()
    await asyncio.wait_for(serving, timeout=5)
    assert part.events == ["start", "stop"]
    assert not (tmp_path / "part.ready").exists()


async def test_a_failing_run_still_stops_the_part() -> None:
    class Broken(FakePart):
        async def run(self, stop: asyncio.Event) -> None:
            raise RuntimeError("worker crashed")

    part = Broken()
    with pytest.raises(RuntimeError, match="worker crashed"):
        await serve(part, asyncio.Event())
    assert part.events[-1] == "stop"


async def test_until_stopped_returns_the_result_or_none() -> None:
    async def answer() -> int:
        return 42

    assert await until_stopped(answer(), asyncio.Event()) == 42
    stop = asyncio.Event()
    stop.set()
    assert await until_stopped(asyncio.sleep(30, result=1), stop) is None


# --- real processes -------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTPLEX_")}
    return {**env, "AGENTPLEX_GRACE_SECONDS": "1", "AGENTPLEX_DRAIN_SECONDS": "0", **extra}


async def test_the_gateway_control_plane_runs_the_shared_lifecycle(
    tmp_path: Path, eventually
) -> None:
    ready_file = tmp_path / "gateway.ready"
    log_path = tmp_path / "gateway.log"
    # No registry answers there: the control plane serves anyway, NOT_SERVING until it has
    # a snapshot, which is all this test needs.
    env = child_env(AGENTPLEX_REGISTRY_ADDRESS="127.0.0.1:9", AGENTPLEX_LOG_LEVEL="INFO")
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentplex.gateway",
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
            message="the control plane never wrote its ready file",
        )
        assert process.returncode is None, log_path.read_text()
        ready = json.loads(ready_file.read_text())
        assert ready["pid"] == process.pid
        assert ready["address"].startswith("127.0.0.1:")
        assert isinstance(ready["metrics_port"], int)

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0, log_path.read_text()
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        messages = [line["message"] for line in lines]
        assert "gateway received a stop signal; draining" in messages
        assert messages[-1] == "gateway stopped"
        assert all(line["service"] == "gateway" for line in lines)
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(ProcessLookupError):
                await process.wait()


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_invalid_settings_stop_a_service_with_one_readable_message() -> None:
    done = run_module("agentplex.memory", "--port", "0", AGENTPLEX_GRACE_SECONDS="soon")
    assert done.returncode == 2
    assert done.stderr.startswith("python -m agentplex.memory: invalid settings:")
    assert "grace_seconds" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_refuses_the_launcher_only_local_model() -> None:
    done = run_module(
        "agentplex.agents.worker", "--agent", "assistant", AGENTPLEX_LLM_PROVIDER="local"
    )
    assert done.returncode == 1
    [line] = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert line["service"] == "assistant-worker"
    assert line["message"].startswith("cannot start: AGENTPLEX_LLM_PROVIDER=local is for")


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("agentplex.agents.worker", ["--agent", "--name", "--port", "--metrics-port"]),
        ("agentplex.agents", ["--agent", "--port", "--metrics-port", "--ready-file"]),
        ("agentplex.gateway", ["--port", "--metrics-port", "--ready-file"]),
        ("agentplex.registry", ["--port", "--metrics-port", "--ready-file"]),
    ],
)
def test_every_main_keeps_its_flags(module: str, flags: list[str]) -> None:
    done = run_module(module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}")
    for flag in flags:
        assert flag in done.stdout


def test_a_stop_that_overruns_its_bound_still_ends_the_process() -> None:
    # A stop step that hangs (here: the whole process sleeping) must not keep it alive.
    code = (
        "import time\n"
        "from agentplex.runtime.process import exit_if_still_stopping\n"
        "exit_if_still_stopping('stuck', 0.2)\n"
        "time.sleep(60)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_STOP_OVERRAN
    assert "stuck did not stop within" in done.stderr
