"""The mesh state file: atomic writes, and helpful errors when no mesh is running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentplex.mesh.state import (
    DEFAULT_STATE_FILE,
    MeshNotRunning,
    pid_alive,
    read_state,
    state_file_path,
    write_state,
)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(process.stdout)
    assert not pid_alive(pid)
    return pid


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "mesh.json"
    state = {
        "pid": os.getpid(),
        "memory": "127.0.0.1:1111",
        "registry": "127.0.0.1:2222",
        "assistant": "127.0.0.1:3333",
        "metrics": {"memory": 9100},
    }
    write_state(path, state)
    assert read_state(path) == state
    # Readable by `jq -r .assistant`: plain top-level JSON object.
    assert json.loads(path.read_text())["assistant"] == "127.0.0.1:3333"
    assert path.read_text().endswith("\n")


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    write_state(path, {"pid": os.getpid(), "memory": "old"})
    first_inode = path.stat().st_ino
    write_state(path, {"pid": os.getpid(), "memory": "new"})
    assert read_state(path)["memory"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.json"]
    # Replaced by rename, never rewritten in place (a reader never sees half a file).
    assert path.stat().st_ino != first_inode


def test_state_without_pid_is_returned_as_is(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    write_state(path, {"memory": "127.0.0.1:1"})
    assert read_state(path) == {"memory": "127.0.0.1:1"}


def test_missing_file_is_mesh_not_running(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "mesh.json"
    with pytest.raises(MeshNotRunning) as caught:
        read_state(path)
    message = str(caught.value)
    assert str(path) in message
    assert "does not exist" in message
    assert "agentplex up" in message


def test_dead_pid_is_mesh_not_running(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    pid = dead_pid()
    write_state(path, {"pid": pid, "memory": "127.0.0.1:1"})
    with pytest.raises(MeshNotRunning) as caught:
        read_state(path)
    message = str(caught.value)
    assert f"pid {pid}" in message
    assert "no longer running" in message
    assert "agentplex up" in message


@pytest.mark.parametrize("content", ["", "{", "not json", '{"pid": 1,}'])
def test_invalid_json_is_mesh_not_running(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mesh.json"
    path.write_text(content)
    with pytest.raises(MeshNotRunning) as caught:
        read_state(path)
    message = str(caught.value)
    assert "is not valid JSON" in message
    assert "agentplex up" in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("content", ["[]", "null", "42"])
def test_non_object_json_is_mesh_not_running(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mesh.json"
    path.write_text(content)
    with pytest.raises(MeshNotRunning):
        read_state(path)


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())


def test_state_file_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.json"
    monkeypatch.setenv("AGENTPLEX_STATE_FILE", str(tmp_path / "from-env.json"))
    assert state_file_path(explicit) == explicit
    assert state_file_path() == tmp_path / "from-env.json"
    monkeypatch.delenv("AGENTPLEX_STATE_FILE")
    assert state_file_path() == DEFAULT_STATE_FILE == Path(".agentplex/mesh.json")


def test_state_file_path_from_the_settings_read_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agentplex.runtime.settings import Settings

    monkeypatch.setenv("AGENTPLEX_STATE_FILE", str(tmp_path / "from-env.json"))
    settings = Settings(state_file=tmp_path / "read-once.json")
    assert state_file_path(None, settings) == tmp_path / "read-once.json"
    assert state_file_path(tmp_path / "explicit.json", settings) == tmp_path / "explicit.json"
