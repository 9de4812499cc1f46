"""The vendored google/api and google/rpc protos: the pinned package's, byte for byte,
and enough for buf to lint, build and generate from a fresh clone without Python."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agentplex.gateway import googleapis

REPO_ROOT = Path(__file__).resolve().parents[2]
VENDORED = REPO_ROOT / googleapis.VENDORED_DIR
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", [*googleapis.FILES, googleapis.LICENSE])
def test_vendored_copy_is_the_pinned_packages(name: str) -> None:
    vendored = VENDORED / name
    assert vendored.is_file(), f"{name} is not vendored: run `make googleapis`"
    assert vendored.read_bytes() == googleapis.source(name).read_bytes(), (
        f"{googleapis.VENDORED_DIR / name} differs from the installed "
        f"{googleapis.DISTRIBUTION}: run `make googleapis`"
    )


def test_nothing_else_is_vendored() -> None:
    found = sorted(
        path.relative_to(VENDORED).as_posix() for path in VENDORED.rglob("*") if path.is_file()
    )
    assert found == sorted([*googleapis.FILES, googleapis.LICENSE])
    assert googleapis.differences(VENDORED) == []


def test_the_check_reports_a_drifted_copy(tmp_path: Path) -> None:
    googleapis.stage(tmp_path)
    assert googleapis.differences(tmp_path) == []
    googleapis.main(["--check", str(tmp_path)])
    edited = tmp_path / "google/rpc/status.proto"
    edited.write_bytes(edited.read_bytes() + b"\n")
    assert googleapis.differences(tmp_path) == ["google/rpc/status.proto"]
    with pytest.raises(SystemExit, match=re.escape("google/rpc/status.proto")):
        googleapis.main(["--check", str(tmp_path)])


def test_buf_yaml_names_the_vendored_module_and_never_lints_it() -> None:
    config = yaml.safe_load((REPO_ROOT / "buf.yaml").read_text())
    modules = {module["path"]: module for module in config["modules"]}
    vendored = googleapis.VENDORED_DIR.as_posix()
    assert vendored in modules
    assert modules[vendored]["lint"]["ignore"] == [vendored]


def test_buf_works_from_a_fresh_clone(tmp_path: Path) -> None:
    """Only what git tracks for buf (no .build/, nothing staged by Python): lint,
    build and generate succeed, and only our contracts are generated."""
    buf = shutil.which("buf", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert buf is not None, "buf is missing: install the dev extra (pip install -e '.[dev]')"
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "gen" / "python").mkdir(parents=True)
    # buf runs `python -m grpc_tools.protoc`: the dev install's python must come first.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["lint"], ["build", "-o", str(tmp_path / "image.binpb")], ["generate"]):
        done = subprocess.run(
            [buf, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"buf {args[0]}: {done.stdout}{done.stderr}"
    generated = {
        path.relative_to(tmp_path / "gen/python").parts[0]
        for path in (tmp_path / "gen/python").rglob("*.py")
    }
    # google/api and google/rpc come, generated, with googleapis-common-protos.
    assert generated == {"agentplex"}
