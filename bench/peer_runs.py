"""Peer runtimes, measured in the same run: each in its own virtualenv.

A peer's script (bench/peers/<name>_peer.py) runs in a virtualenv that holds
only that peer's pinned packages (bench/peers/requirements-<name>.txt) —
autogen-ext, for one, pins an older grpcio than ours. The virtualenv is
built once and cached; the script starts the peer's server and client as
separate processes and prints one JSON line of figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PEERS_DIR = Path(__file__).parent / "peers"
CACHE_DIR = Path(os.environ.get("AGENTPLEX_BENCH_CACHE", Path.home() / ".cache/agentplex-bench"))
PEERS = ("a2a", "autogen")


@dataclass(frozen=True)
class PeerResult:
    name: str
    figures: dict[str, object] | None
    error: str = ""


def available() -> list[str]:
    return [
        name
        for name in PEERS
        if (PEERS_DIR / f"{name}_peer.py").exists()
        and (PEERS_DIR / f"requirements-{name}.txt").exists()
    ]


async def _run(*command: str, timeout: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"timed out after {timeout:g}s"
    return int(process.returncode or 0), output.decode(errors="replace")


async def _venv(name: str) -> Path:
    requirements = PEERS_DIR / f"requirements-{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    venv = CACHE_DIR / f"{name}-{digest}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    code, output = await _run(sys.executable, "-m", "venv", str(venv), timeout=120)
    if code == 0:
        code, output = await _run(
            str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements), timeout=900
        )
    if code != 0:
        raise RuntimeError(f"could not build the {name} virtualenv: {output[-500:]}")
    return python


async def run_peer(name: str, *, count: int, in_flight: int) -> PeerResult:
    try:
        python = await _venv(name)
    except RuntimeError as exc:
        return PeerResult(name, None, str(exc))
    code, output = await _run(
        str(python),
        str(PEERS_DIR / f"{name}_peer.py"),
        "--count",
        str(count),
        "--in-flight",
        str(in_flight),
        timeout=600,
    )
    lines = [line for line in output.strip().splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        return PeerResult(name, None, f"exit {code}: {output[-500:]}")
    return PeerResult(name, json.loads(lines[-1]))
