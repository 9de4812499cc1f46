"""Contracts first: buf lint is clean and the committed stubs are what the protos generate."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentplex.gateway import googleapis
from agentplex.v1 import agent_service_pb2, memory_service_pb2, tool_registry_service_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def buf() -> str:
    found = shutil.which("buf", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("buf is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def run_buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # buf runs `python -m grpc_tools.protoc`: the dev install's python must come first.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [buf(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_buf_lint_is_clean() -> None:
    googleapis.stage(REPO_ROOT / ".build" / "googleapis")
    done = run_buf("lint", cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_code_is_current(tmp_path: Path) -> None:
    for item in ("proto", "buf.yaml", "buf.gen.yaml"):
        source = REPO_ROOT / item
        if source.is_dir():
            shutil.copytree(source, tmp_path / item)
        else:
            shutil.copy(source, tmp_path / item)
    googleapis.stage(tmp_path / ".build" / "googleapis")
    (tmp_path / "gen" / "python").mkdir(parents=True)
    done = run_buf("generate", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    fresh, committed = tmp_path / "gen/python/agentplex/v1", REPO_ROOT / "gen/python/agentplex/v1"
    fresh_files = sorted(p.name for p in fresh.iterdir())
    committed_files = sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    assert fresh_files == committed_files, "run `make gen` and commit the result"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, fresh_files, shallow=False)
    assert not mismatch and not errors, f"stale generated files {mismatch}: run `make gen`"


def test_service_names_are_the_published_ones() -> None:
    assert agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name == (
        "agentplex.v1.AgentService"
    )
    assert (
        tool_registry_service_pb2.DESCRIPTOR.services_by_name["ToolRegistryService"].full_name
        == "agentplex.v1.ToolRegistryService"
    )
    assert memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name == (
        "agentplex.v1.MemoryService"
    )


def _image_of(tree: Path, out: Path) -> Path:
    done = run_buf("build", "-o", str(out), cwd=tree)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _breaking(image: Path) -> subprocess.CompletedProcess[str]:
    baseline = REPO_ROOT / "proto" / "released.json"
    return run_buf(
        "breaking",
        str(image),
        "--against",
        str(baseline),
        "--config",
        str(REPO_ROOT / "buf.yaml"),
        cwd=REPO_ROOT,
    )


def test_contracts_keep_every_released_field(tmp_path: Path) -> None:
    """`buf breaking` against proto/released.json (the last released contracts)."""
    googleapis.stage(REPO_ROOT / ".build" / "googleapis")
    done = _breaking(_image_of(REPO_ROOT, tmp_path / "current.binpb"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_baseline_catches_a_removed_field(tmp_path: Path) -> None:
    """The check can fail: a released field deleted from a copy of the contracts is a break."""
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    googleapis.stage(tmp_path / ".build" / "googleapis")
    service = tmp_path / "proto/agentplex/v1/tool_registry_service.proto"
    text = service.read_text()
    assert "  bool only_if_unset = 3;\n" in text
    service.write_text(text.replace("  bool only_if_unset = 3;\n", ""))
    done = _breaking(_image_of(tmp_path, tmp_path / "edited.binpb"))
    assert done.returncode != 0
    assert "only_if_unset" in done.stdout + done.stderr
