"""The benchmark suite in smoke mode: tiny counts, no thresholds, so it never rots."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_every_scenario(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agentplex.bench", "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for title in (
        "a. Per-task overhead",
        "b. Throughput",
        "g. Gateway overhead (goal f)",
        "c. Streaming",
        "d. Queue",
        "d. Recovery after a worker is killed",
        "f. Peers",
        "e. Open streams",
    ):
        assert f"## {title}" in done.stdout
    assert "through the gateway tasks/s" in done.stdout
    assert "(f) gateway's added latency (same echo)" in done.stdout
    assert not (tmp_path / "docs").exists()  # smoke mode writes nothing


def test_profile_accounts_cpu_per_task_for_every_process(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agentplex.bench.profile", "--tasks", "96"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:4]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| process")
    }
    # Every part of a one-tool task shows up, the worker only on the queued path
    # (the light ones may round to nothing over so few tasks: present is enough).
    for process in ("agents:assistant", "registry", "memory"):
        direct, queued = (float(cell) for cell in rows[process])
        assert direct > 0 and queued > 0, process
    assert {"tools", "redis", "client (this process)"} <= set(rows)
    assert rows["agents.worker:assistant"][0].strip() == "–"
    assert float(rows["agents.worker:assistant"][1]) > 0
    assert float(rows["all"][1]) > float(rows["all"][0])  # the queued path does more work
