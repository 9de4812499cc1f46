"""The benchmark suite in smoke mode: tiny counts, no thresholds, so it never rots."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_every_scenario(tmp_path) -> None:  # type: ignore[no-untyped-def]
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
