"""`agentplex up` keeps the mesh up, for real: a worker, an agent replica, the
registry and Redis are each killed with SIGKILL while queued tasks run; each
comes back and every accepted task completes. Then the launcher itself is
SIGKILLed: its children go with it, and the next `up` starts in the same place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from agentplex.v1 import task_pb2
from agentplex.v1.agent_service_pb2 import GetTaskRequest
from agentplex.v1.agent_service_pb2_grpc import AgentServiceStub
from agentplex.v1.mesh_control_service_pb2 import ListPartsRequest
from agentplex.v1.mesh_control_service_pb2_grpc import MeshControlServiceStub

pytestmark = pytest.mark.slow

TASKS = 12
FINISHED = ("TASK_STATUS_COMPLETED", "TASK_STATUS_FAILED", "TASK_STATUS_CANCELLED")


def cli(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentplex.mesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.1)


def state(workdir: Path) -> dict[str, Any]:
    return dict(json.loads((workdir / ".agentplex" / "mesh.json").read_text()))


def parts(workdir: Path) -> dict[str, dict[str, Any]]:
    """What `agentplex ps --json` prints, asked over gRPC (polling through the CLI is slow)."""
    with grpc.insecure_channel(state(workdir)["control"]) as channel:
        listed = MeshControlServiceStub(channel).ListParts(ListPartsRequest(), timeout=10)
    return {
        part.name: json_format.MessageToDict(part, preserving_proto_field_name=True)
        for part in listed.parts
    }


def task_status(workdir: Path, task_id: str) -> str:
    """The task's status name; "" while the mesh cannot answer (a part is restarting)."""
    with grpc.insecure_channel(state(workdir)["assistant"]) as channel:
        try:
            task = AgentServiceStub(channel).GetTask(GetTaskRequest(task_id=task_id), timeout=5)
        except grpc.RpcError:
            return ""
    return task_pb2.TaskStatus.Name(task.task.status)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone too
            return stat.read().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # it finished exiting meanwhile
        return True


def start_up(workdir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        {
            # Slow enough that kills land while tasks run; short leases, so a dead
            # worker's task is reclaimed quickly; no drain (nothing to drain to here).
            "AGENTPLEX_SCRIPTED_DELAY_SECONDS": "0.3",
            "AGENTPLEX_TASK_LEASE_SECONDS": "2",
            "AGENTPLEX_TASK_MAX_ATTEMPTS": "10",
            "AGENTPLEX_DRAIN_SECONDS": "0",
            "AGENTPLEX_GRACE_SECONDS": "2",
            "AGENTPLEX_HEALTH_INTERVAL_SECONDS": "0.3",
            "AGENTPLEX_RESTART_BACKOFF_SECONDS": "0.2",
        }
    )
    log = (workdir / "up.out").open("a")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentplex.mesh",
            "up",
            "--ephemeral-ports",
            "--no-gateway",
            # Plaintext: this module calls the agents with plaintext channels.
            "--no-auth",
            "--no-mtls",
            "--workers",
            "2",
            "--replicas",
            "assistant=2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
        env=env,
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    workdir = tmp_path_factory.mktemp("supervised")
    state_file = workdir / ".agentplex" / "mesh.json"
    process = start_up(workdir)
    try:
        wait_for(lambda: state_file.exists() or process.poll() is not None, 120, "the mesh came up")
        if process.poll() is not None:
            pytest.fail(f"agentplex up exited early:\n{(workdir / 'up.out').read_text()}")
        yield workdir, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def kill_and_wait_back(workdir: Path, name: str) -> None:
    before = parts(workdir)[name]
    assert before["state"] == "PART_STATE_RUNNING", before
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> bool:
        part = parts(workdir)[name]
        return (
            part["state"] == "PART_STATE_RUNNING"
            and part.get("restarts", 0) == before.get("restarts", 0) + 1
            and part.get("pid", 0) not in (0, before["pid"])
        )

    wait_for(back, 60, f"{name} came back after SIGKILL")
    after = parts(workdir)[name]
    assert after["last_exit_code"] == -signal.SIGKILL
    assert after["address"] == before["address"]  # its peers find it where it was


def test_every_part_killed_comes_back_and_every_task_completes(mesh) -> None:
    workdir, _ = mesh
    task_ids = []
    for index in range(TASKS):
        done = cli(workdir, "submit", "--agent", "assistant", f"what is {index}*3?")
        assert done.returncode == 0, done.stderr
        task_ids.append(done.stdout.strip())
    # No wait before killing Redis: it writes the AOF before it replies (only the
    # fsync is once a second), so a killed redis-server loses nothing it acknowledged.

    for name in ("assistant-worker-1", "assistant-2", "registry", "redis"):
        kill_and_wait_back(workdir, name)

    wait_for(
        lambda: all(task_status(workdir, t) in FINISHED for t in task_ids),
        180,
        "every task finished",
    )
    for index, task_id in enumerate(task_ids):
        done = cli(workdir, "status", "--json", task_id)
        assert done.returncode == 0, done.stderr
        task = json.loads(done.stdout)
        assert task["status"] == "TASK_STATUS_COMPLETED", task
        assert f"{index}*3 = {index * 3}." in task["result"]["output"], task


def test_ps_and_restart(mesh) -> None:
    workdir, _ = mesh
    table = cli(workdir, "ps")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "PART",
        "STATE",
        "PID",
        "ADDRESS",
        "RESTARTS",
        "LAST",
        "EXIT",
    ]
    before = parts(workdir)
    done = cli(workdir, "restart", "assistant", "--json")
    assert done.returncode == 0, done.stderr
    restarted = [json.loads(line) for line in done.stdout.splitlines()]
    assert [part["name"] for part in restarted] == ["assistant", "assistant-2"]
    for part in restarted:
        assert part["state"] == "PART_STATE_RUNNING"
        assert part["pid"] != before[part["name"]]["pid"]
        assert part["last_exit_code"] == 0  # a graceful stop

    unknown = cli(workdir, "restart", "asistant")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "assistant-worker" in unknown.stderr


def test_a_killed_launcher_takes_its_children_and_the_next_up_starts(mesh) -> None:
    workdir, process = mesh
    parts_before = parts(workdir)
    pids = [part["pid"] for part in parts_before.values() if part.get("pid")]
    assert len(pids) >= 10

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    names = {part["pid"]: name for name, part in parts_before.items() if part.get("pid")}
    try:
        wait_for(lambda: all(pid_gone(pid) for pid in pids), 30, "every child exited")
    except AssertionError:
        alive = [names[pid] for pid in pids if not pid_gone(pid)]
        raise AssertionError(f"still running 30 s after the launcher's SIGKILL: {alive}") from None

    again = start_up(workdir)
    try:
        state_file = workdir / ".agentplex" / "mesh.json"
        wait_for(
            lambda: (
                again.poll() is not None
                or (state_file.exists() and json.loads(state_file.read_text())["pid"] == again.pid)
            ),
            120,
            "the second mesh came up",
        )
        assert again.poll() is None, (workdir / "up.out").read_text()[-3000:]
        done = cli(workdir, "run", "what is 6*7")
        assert (done.returncode, done.stdout.strip()) == (0, "6*7 = 42."), done.stderr
    finally:
        again.send_signal(signal.SIGTERM)
        try:
            again.wait(timeout=60)
        except subprocess.TimeoutExpired:
            again.kill()
