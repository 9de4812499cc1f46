"""Chaos run: submit tasks to a pool of workers, keep killing workers, then audit.

    python -m agentplex.bench.chaos [--tasks 200] [--workers 3] [--kill-every 3]

Starts a private mesh (embedded Redis, memory, registry, agents) on free
ports, then `--workers` worker processes for the assistant. Every task asks
the assistant to remember a note — a real side effect through the registry's
`notes.write` — in a session of its own. While tasks run, a random worker is
SIGKILLed every `--kill-every` seconds and a fresh one started in its place.
Watchers follow every task and disconnect and resume at random.

At the end it checks, and prints:
- lost: tasks accepted but not completed;
- duplicated side effects: notes written more than once for one task;
- watcher gaps: events a resuming watcher missed or saw twice;
- recovery time: from a kill until each task the killed worker held had
  been taken over by another worker.

Exit code 0 only if lost, duplicates and gaps are all zero. `--write-docs`
puts the figures in docs/CHAOS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from agentplex.contract.events import is_final
from agentplex.mesh.launcher import MeshLauncher
from agentplex.runtime import loop as event_loop
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2


@dataclass
class Figures:
    accepted: int = 0
    completed: int = 0
    lost: int = 0
    dead_lettered: int = 0
    duplicated_side_effects: int = 0
    missing_side_effects: int = 0
    queue_left: int = 0
    watcher_gaps: int = 0
    watcher_reconnects: int = 0
    kills: int = 0
    reclaimed_tasks: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0


def worker_env(state: dict[str, object], **overrides: str) -> dict[str, str]:
    """Environment for worker processes joining the mesh described by `state`."""
    return {
        **os.environ,
        "AGENTPLEX_REDIS_URL": str(state["redis"]),
        "AGENTPLEX_MEMORY_ADDRESS": str(state["memory"]),
        "AGENTPLEX_REGISTRY_ADDRESS": str(state["registry"]),
        **overrides,
    }


class WorkerPool:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._started = 0

    async def start_one(self) -> str:
        self._started += 1
        name = f"assistant-chaos-{self._started}"
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            self.processes[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agentplex.agents.worker",
                "--agent",
                "assistant",
                "--name",
                name,
                "--metrics-port",
                "0",
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            log.close()
        return name

    async def kill_random(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.processes))
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()
        return name

    async def stop_one(self) -> str:
        """Stop the newest worker the way a deploy does: SIGTERM, its tasks drain."""
        name, process = self.processes.popitem()
        await _stop([process])
        return name

    async def stop_all(self) -> None:
        await _stop(list(self.processes.values()))


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), timeout=30)
        except TimeoutError:
            process.kill()
            await process.wait()


async def watch_with_reconnects(
    stub: agent_service_pb2_grpc.AgentServiceStub,
    task_id: str,
    rng: random.Random,
    figures: Figures,
) -> list[int]:
    """Follow a task, hanging up at random and resuming from the last sequence."""
    seen: list[int] = []
    while True:
        call = stub.WatchTask(
            pb.WatchTaskRequest(task_id=task_id, after_sequence=seen[-1] if seen else 0)
        )
        hang_up_after = rng.randint(1, 8)
        got = 0
        try:
            async for response in call:
                seen.append(response.event.sequence)
                got += 1
                if is_final(response.event):
                    return seen
                if got >= hang_up_after:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                await asyncio.sleep(0.2)  # the agent is busy; try again shortly
        figures.watcher_reconnects += 1


async def run(args: argparse.Namespace) -> Figures:
    rng = random.Random(args.seed)
    figures = Figures()
    workdir = Path(tempfile.mkdtemp(prefix="agentplex-chaos-"))
    mesh = MeshLauncher(
        state_file=workdir / "mesh.json",
        ephemeral_ports=True,
        workers=0,
        # Plaintext, no tokens: the chaos run's own channels are plaintext.
        auth=False,
        mtls=False,
        say=lambda line: print(line, flush=True),
    )
    env_overrides = {
        "AGENTPLEX_TASK_LEASE_SECONDS": str(args.lease),
        "AGENTPLEX_SCRIPTED_DELAY_SECONDS": str(args.model_delay),
        "AGENTPLEX_GRACE_SECONDS": "2",
        "AGENTPLEX_TASK_MAX_ATTEMPTS": str(args.max_attempts),
    }
    os.environ.update(env_overrides)
    started = time.monotonic()
    state = await mesh.start()
    pool = WorkerPool(worker_env(state), workdir / "logs")
    redis = aioredis.Redis.from_url(state["redis"])
    channel = grpc.aio.insecure_channel(state["assistant"])
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    try:
        for _ in range(args.workers):
            await pool.start_one()
        ids = [f"chaos-{n:04d}" for n in range(args.tasks)]
        for task_id in ids:
            await stub.SubmitTask(
                pb.SubmitTaskRequest(
                    task=task_pb2.TaskSpec(
                        task_id=task_id,
                        session_id=f"s-{task_id}",
                        prompt=f"remember that {task_id} ran",
                    )
                ),
                timeout=10,
            )
            figures.accepted += 1
        print(
            f"chaos: {figures.accepted} tasks accepted; killing a worker every "
            f"{args.kill_every:g}s",
            flush=True,
        )
        watchers = {
            task_id: asyncio.create_task(watch_with_reconnects(stub, task_id, rng, figures))
            for task_id in ids
        }
        recoveries: list[asyncio.Task[None]] = []
        killer = asyncio.create_task(
            _keep_killing(pool, redis, stub, ids, args, rng, figures, recoveries)
        )
        deadline = time.monotonic() + args.timeout
        sequences: dict[str, list[int]] = {}
        for task_id, watcher in watchers.items():
            try:
                sequences[task_id] = await asyncio.wait_for(
                    watcher, timeout=max(1.0, deadline - time.monotonic())
                )
            except TimeoutError:
                sequences[task_id] = []
        killer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await killer
        if recoveries:
            await asyncio.wait(recoveries, timeout=30)
        await _audit(stub, redis, ids, sequences, figures)
    finally:
        figures.wall_seconds = time.monotonic() - started
        await channel.close()
        await redis.aclose()
        await pool.stop_all()
        await mesh.stop()
    return figures


async def _keep_killing(
    pool: WorkerPool,
    redis: aioredis.Redis,
    stub: agent_service_pb2_grpc.AgentServiceStub,
    ids: list[str],
    args: argparse.Namespace,
    rng: random.Random,
    figures: Figures,
    recoveries: list[asyncio.Task[None]],
) -> None:
    while True:
        await asyncio.sleep(args.kill_every)
        name = await pool.kill_random(rng)
        killed_at = time.monotonic()
        # What the victim held at its death (its lease still names it as owner).
        held = await _tasks_held(redis, ids)
        figures.kills += 1
        await pool.start_one()
        victims = {
            task_id: attempts for task_id, (owner, attempts) in held.items() if owner == name
        }
        if victims:
            recoveries.append(
                asyncio.create_task(_time_recovery(stub, victims, killed_at, figures))
            )


async def _tasks_held(redis: aioredis.Redis, ids: list[str]) -> dict[str, tuple[str, int]]:
    prefix = Settings().key_prefix
    async with redis.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hmget(f"{prefix}:task:assistant:{task_id}", "status", "owner", "attempt")
        rows = await pipe.execute()
    held = {}
    for task_id, (status, owner, attempt) in zip(ids, rows, strict=True):
        if status == str(task_pb2.TASK_STATUS_RUNNING).encode() and owner:
            held[task_id] = (owner.decode(), int(attempt))
    return held


async def _time_recovery(
    stub: agent_service_pb2_grpc.AgentServiceStub,
    victims: dict[str, int],
    killed_at: float,
    figures: Figures,
) -> None:
    """Seconds until every task the dead worker held was taken over (or done)."""
    pending = dict(victims)
    while pending:
        for task_id, attempts in list(pending.items()):
            try:
                task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10)).task
            except grpc.aio.AioRpcError:
                continue  # busy: ask again on the next round
            if task.attempts > attempts or task.status == task_pb2.TASK_STATUS_COMPLETED:
                if task.attempts > attempts:
                    figures.reclaimed_tasks += 1
                del pending[task_id]
        await asyncio.sleep(0.05)
    figures.recovery_seconds.append(time.monotonic() - killed_at)


async def _audit(
    stub: agent_service_pb2_grpc.AgentServiceStub,
    redis: aioredis.Redis,
    ids: list[str],
    sequences: dict[str, list[int]],
    figures: Figures,
) -> None:
    prefix = Settings().key_prefix
    queue = f"{prefix}:queue:assistant"
    figures.queue_left = await redis.xlen(queue) + int(await redis.get(f"{queue}:depth") or 0)
    for task_id in ids:
        task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10)).task
        if task.status == task_pb2.TASK_STATUS_COMPLETED:
            figures.completed += 1
        else:
            figures.lost += 1
            figures.dead_lettered += task.status == task_pb2.TASK_STATUS_FAILED
            status = task_pb2.TaskStatus.Name(task.status)
            print(
                f"chaos: LOST {task_id}: {status} after {task.attempts} attempt(s) "
                f"{task.result.error}",
                flush=True,
            )
        notes = await redis.llen(f"{prefix}:notes:s-{task_id}")
        figures.duplicated_side_effects += max(0, notes - 1)
        if task.status == task_pb2.TASK_STATUS_COMPLETED and notes == 0:
            figures.missing_side_effects += 1
        expected = list(range(1, task.last_sequence + 1))  # every event, once, in order
        if sequences.get(task_id) != expected:
            figures.watcher_gaps += 1


def report(figures: Figures, args: argparse.Namespace) -> str:
    recovery = figures.recovery_seconds
    median = f"{statistics.median(recovery):.2f} s" if recovery else "n/a"
    worst = f"{max(recovery):.2f} s" if recovery else "n/a"
    rows = [
        ("tasks accepted", figures.accepted),
        ("tasks completed", figures.completed),
        ("lost (must be 0)", figures.lost),
        ("of which dead-lettered", figures.dead_lettered),
        ("side effects executed twice (must be 0)", figures.duplicated_side_effects),
        ("side effects missing from completed tasks (must be 0)", figures.missing_side_effects),
        ("watcher gaps or repeats (must be 0)", figures.watcher_gaps),
        ("queue entries and unfinished count left at the end (must be 0)", figures.queue_left),
        ("workers killed (SIGKILL)", figures.kills),
        ("tasks taken over from a killed worker", figures.reclaimed_tasks),
        ("watcher reconnects", figures.watcher_reconnects),
        ("recovery after a kill, median", median),
        ("recovery after a kill, worst", worst),
        ("wall time", f"{figures.wall_seconds:.1f} s"),
    ]
    lines = [
        f"`python -m agentplex.bench.chaos --tasks {args.tasks} --workers {args.workers} "
        f"--kill-every {args.kill_every:g} --lease {args.lease:g} "
        f"--model-delay {args.model_delay:g} --max-attempts {args.max_attempts} "
        f"--seed {args.seed}`",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agentplex.bench.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument(
        "--lease",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="worker lease: how soon a dead worker's task is reclaimed",
    )
    parser.add_argument(
        "--model-delay",
        type=float,
        default=0.4,
        metavar="SECONDS",
        help="simulated model latency per call, so kills land mid-task",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=10,
        help="attempts before dead-lettering; above the kills a task can meet here, since "
        "these kills are external, not the task's fault (production default: 3)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--write-docs", action="store_true", help="write the figures to docs/CHAOS.md"
    )
    args = parser.parse_args(argv)
    figures = event_loop.run(run(args))
    text = report(figures, args)
    print(text)
    if args.write_docs:
        path = Path("docs/CHAOS.md")
        path.write_text(CHAOS_DOC.format(report=text))
        print(f"chaos: figures written to {path}")
    ok = not (
        figures.lost
        or figures.duplicated_side_effects
        or figures.missing_side_effects
        or figures.watcher_gaps
        or figures.queue_left
    )
    sys.exit(0 if ok else 1)


CHAOS_DOC = """# Chaos run

The durable task queue under fire: tasks with a real side effect, workers
SIGKILLed at random and replaced, watchers hanging up and resuming at random.
`bench/chaos.py` runs it and checks the invariants; this is its last recorded
run on a 2-core machine.

{report}

How to read it: *lost* counts accepted tasks that never completed; *side
effects executed twice* counts notes written more than once for one task (the
registry's idempotency ledger must replay, not repeat, a completed tool call
when a reclaimed task runs again); *watcher gaps* counts tasks whose resuming
watcher missed or repeated an event. *Recovery* is the time from a kill until
every task the killed worker held had been taken over: at most the worker
lease plus one claim poll.

Dead-lettering is raised to 10 attempts for this run. A worker runs several
tasks at once, so one SIGKILL counts an attempt against each of them; killing
a random worker every 2 seconds lets a few tasks meet three kills in a row,
and at the production default of 3 they would be dead-lettered (recorded
FAILED with a clear error, not lost). The default of 3 is for tasks that kill
their worker themselves; this run's kills come from outside.
"""


if __name__ == "__main__":
    main()
