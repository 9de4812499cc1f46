"""Where a task's CPU goes: every mesh process's CPU time per task, under load.

    python -m agentplex.bench.profile                 # direct RunTask and the queued path
    python -m agentplex.bench.profile --py-spy 12     # plus each process's hottest frames

The table behind "What the profile says" in docs/BENCHMARKS.md. A private
mesh (as the suite's) runs one-tool tasks 16 at a time, first as direct
RunTask, then submitted to one worker and awaited with WatchTask
(`final_only`), and each process's user + system CPU time over the run is
divided by the tasks run. With `--py-spy N`, py-spy samples every Python
process of the mesh for N seconds of direct RunTask and prints the frames
each spends most of its samples in (py-spy must be on PATH; `pip install
py-spy`). Frames inside grpc's C core and uvloop are invisible to it: they
show up as the event loop's own frame.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from agentplex.bench.chaos import WorkerPool, worker_env
from agentplex.bench.run import PROMPT, _mesh_pids, bench_mesh
from agentplex.runtime import loop as event_loop
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2

IN_FLIGHT = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# `agentplex serve` parts, named by the package that serves them (as the report has them).
SERVED_PARTS = {"agent": "agents", "worker": "agents.worker", "gateway-control-plane": "gateway"}


def _label(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if any(b"redis-server" in arg for arg in args):
        return "redis"
    if b"agentplex.mesh.serve" in args:
        # `python -m agentplex.mesh.serve PART [NAME] …`: labelled by the part's package.
        part = args.index(b"agentplex.mesh.serve") + 1
        name = SERVED_PARTS.get(args[part].decode(), args[part].decode())
        return f"{name}:{args[part + 1].decode()}" if args[part] in (b"agent", b"worker") else name
    module = next((a.decode() for a in args if a.startswith(b"agentplex.")), args[0].decode())
    if b"--agent" in args:
        module += ":" + args[args.index(b"--agent") + 1].decode()
    return module.removeprefix("agentplex.")


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of every mesh process, and of this (the calling) one."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for pid in _mesh_pids(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[_label(pid)] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    own = os.times()
    seconds["client (this process)"] = own.user + own.system
    return dict(seconds)


async def _per_task(
    count: int, run: Callable[[], Awaitable[None]]
) -> tuple[float, dict[str, float]]:
    before = _cpu_seconds()
    started = time.perf_counter()
    await run()
    elapsed = time.perf_counter() - started
    after = _cpu_seconds()
    per_task = {
        name: (after[name] - before.get(name, 0.0)) * 1000 / count
        for name in after
        if after[name] - before.get(name, 0.0) > 0
    }
    return count / elapsed, per_task


async def _direct(stub: agent_service_pb2_grpc.AgentServiceStub, count: int) -> None:
    async def one_caller() -> None:
        for _ in range(count // IN_FLIGHT):
            await stub.RunTask(pb.RunTaskRequest(prompt=PROMPT), timeout=30)

    await asyncio.gather(*(one_caller() for _ in range(IN_FLIGHT)))


async def _queued(stub: agent_service_pb2_grpc.AgentServiceStub, count: int) -> None:
    async def one_caller(caller: int) -> None:
        for n in range(count // IN_FLIGHT):
            task_id = f"profile-{caller}-{n}-{time.monotonic_ns()}"
            spec = task_pb2.TaskSpec(prompt=PROMPT, task_id=task_id)
            await stub.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=10)
            request = pb.WatchTaskRequest(task_id=task_id, final_only=True)
            async for _ in stub.WatchTask(request, timeout=60):
                pass

    await asyncio.gather(*(one_caller(caller) for caller in range(IN_FLIGHT)))


def _hottest(raw: Path, top: int) -> list[tuple[float, str]]:
    """The frames with the most samples of their own, from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(n / total, frame) for frame, n in own.most_common(top)] if total else []


def _start_py_spy(spy: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    command = [spy, "record", "--nonblocking", "-r", "200", "-d", str(seconds)]
    command += ["-f", "raw", "-o", str(out), "-p", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _py_spy(
    stub: agent_service_pb2_grpc.AgentServiceStub, seconds: int, workdir: Path
) -> None:
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not on PATH: pip install py-spy")
        return
    records = {}
    for pid in _mesh_pids(os.getpid()):
        if _label(pid) == "redis":
            continue
        out = workdir / f"{pid}.txt"
        records[pid] = (out, _start_py_spy(spy, pid, seconds, out))
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            await stub.RunTask(pb.RunTaskRequest(prompt=PROMPT), timeout=30)

    callers = [asyncio.create_task(load()) for _ in range(IN_FLIGHT)]
    for _out, process in records.values():
        await asyncio.to_thread(process.wait)
    stop.set()
    await asyncio.gather(*callers)
    for pid, (out, _process) in records.items():
        if out.exists():
            print(f"\n{_label(pid)}: hottest frames (own samples)")
            for share, frame in _hottest(out, 8):
                print(f"  {share:6.1%}  {frame[:110]}")


async def profile(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentplex-profile-"))
    mesh = bench_mesh(workdir)
    state = await mesh.start()
    pool = WorkerPool(worker_env(state), workdir)
    channel = grpc.aio.insecure_channel(state["assistant"])
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    try:
        await _direct(stub, IN_FLIGHT * 4)  # warm up
        direct_rate, direct = await _per_task(args.tasks, lambda: _direct(stub, args.tasks))
        await pool.start_one()
        await _queued(stub, IN_FLIGHT * 2)  # warm up, the worker included
        queued_rate, queued = await _per_task(args.tasks, lambda: _queued(stub, args.tasks))
        await pool.stop_all()
        pool.processes.clear()
        names = sorted(set(direct) | set(queued), key=lambda n: -queued.get(n, direct.get(n, 0)))
        print(f"CPU ms per task, {args.tasks} one-tool tasks, {IN_FLIGHT} in flight")
        print(f"| process | direct RunTask ({direct_rate:.0f}/s) | queued ({queued_rate:.0f}/s) |")
        print("|---|---|---|")
        for name in names:
            cells = [f"{table[name]:.2f}" if name in table else "–" for table in (direct, queued)]
            print(f"| {name} | {cells[0]} | {cells[1]} |")
        print(f"| all | {sum(direct.values()):.2f} | {sum(queued.values()):.2f} |")
        if args.py_spy:
            await _py_spy(stub, args.py_spy, workdir)
    finally:
        await channel.close()
        await pool.stop_all()
        await mesh.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agentplex.bench.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=800, help="tasks per path (default 800)")
    parser.add_argument(
        "--py-spy", type=int, default=0, metavar="SECONDS", help="also sample with py-spy"
    )
    event_loop.run(profile(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
