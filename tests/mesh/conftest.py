"""`agentplex up` as a process of its own, for the modules that test a whole mesh."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mesh_up(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., AbstractContextManager[tuple[Path, subprocess.Popen[str]]]]:
    """`with mesh_up("--no-auth") as (state_file, process):` `agentplex up --ephemeral-ports`
    and the flags, in a directory of its own with the default (relative) state file, as
    a newcomer runs it; stopped with SIGTERM afterwards. Without flags the mesh has the
    defaults: tokens at the gateway, mTLS between the parts."""

    @contextlib.contextmanager
    def up(*flags: str) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
        workdir = tmp_path_factory.mktemp("mesh")
        state_file = workdir / ".agentplex" / "mesh.json"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["AGENTPLEX_DOCS_DIR"] = str(REPO_ROOT)
        process = subprocess.Popen(
            [sys.executable, "-m", "agentplex.mesh", "up", "--ephemeral-ports", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=workdir,
            env=env,
        )
        try:
            give_up = time.monotonic() + 120
            while not state_file.exists() and process.poll() is None:
                if time.monotonic() > give_up:
                    pytest.fail("the mesh did not come up within 120s")
                time.sleep(0.05)
            if process.poll() is not None:
                assert process.stdout is not None
                pytest.fail(f"agentplex up exited early:\n{process.stdout.read()}")
            yield state_file, process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()

    return up
