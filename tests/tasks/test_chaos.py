"""The chaos script, small: workers killed at random, nothing lost or repeated."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_chaos_run_loses_nothing_and_repeats_nothing(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentplex.bench.chaos",
            "--tasks",
            "30",
            "--workers",
            "2",
            "--kill-every",
            "1",
            "--lease",
            "1",
            "--model-delay",
            "0.2",
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| lost (must be 0) | 0 |" in done.stdout
    assert "| side effects executed twice (must be 0) | 0 |" in done.stdout
    assert "| watcher gaps or repeats (must be 0) | 0 |" in done.stdout
    assert "| side effects missing from completed tasks (must be 0) | 0 |" in done.stdout
    kills = next(line for line in done.stdout.splitlines() if "workers killed" in line)
    assert int(kills.split("|")[2]) >= 1
