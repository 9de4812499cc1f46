"""The mesh state file: where each part of a running mesh listens.

`agentplex up` writes it once everything is serving and removes it on exit;
`agentplex run`, `agentplex tools` and scripts (`jq -r .assistant`) read it.
Each address sits under its part's name at the top level; a mesh with mTLS (the
default; not with `--no-mtls`) also names its PKI directory under "pki", whose
`cli` certificate the commands present, and one whose gateway checks tokens (not
with `--no-auth`) its development issuer under "auth".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentplex.contract import callers
from agentplex.runtime.settings import Settings

if TYPE_CHECKING:  # imported when used: cryptography is slow to load for every command
    from agentplex.runtime.tls import MeshTls

DEFAULT_STATE_FILE: Path = Settings.model_fields["state_file"].default


class MeshNotRunning(Exception):
    """No state file, or the mesh that wrote it is gone."""


def state_file_path(explicit: Path | None = None, settings: Settings | None = None) -> Path:
    """`--state-file` when given, else `settings.state_file` (AGENTPLEX_STATE_FILE).

    Without settings they are read here.
    """
    if explicit is not None:
        return explicit
    return (settings or Settings()).state_file


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeshNotRunning(
            f"no mesh is running here ({path} does not exist); start one with `agentplex up`"
        ) from None
    except json.JSONDecodeError as exc:
        raise MeshNotRunning(
            f"{path} is not valid JSON ({exc}); restart with `agentplex up`"
        ) from None
    if not isinstance(state, dict):
        raise MeshNotRunning(f"{path} does not hold a mesh state; restart with `agentplex up`")
    pid = state.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        raise MeshNotRunning(
            f"the mesh recorded in {path} (pid {pid}) is no longer running; "
            "start one with `agentplex up`"
        )
    return dict(state)


def cli_tls(state: dict[str, Any]) -> MeshTls | None:
    """The `cli` credentials of a mesh with mTLS, or None (`--no-mtls`: plaintext)."""
    pki = state.get("pki")
    if not isinstance(pki, str):
        return None
    from agentplex.runtime.tls import TlsFiles

    try:
        return TlsFiles.for_identity(Path(pki), callers.CLI).read()
    except (OSError, ValueError) as exc:
        raise MeshNotRunning(
            f"cannot read the mesh's {callers.CLI} certificate in {pki} ({exc}); "
            "restart with `agentplex up`"
        ) from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
