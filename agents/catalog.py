"""The agents the mesh runs: the built-in specs shipped with the package, and any team's own.

The built-in three (assistant, researcher, supervisor) are declared in
agents/specs/builtin.yaml, in the same format a team uses for its own agents
(agents/spec_file.py). `agentplex up --agents FILE` (or `agentplex.agents.yaml`
in the working directory) adds a file's agents; an agent process is started
with the same file (`--agents FILE`) and picks its spec by name.

Each agent publishes its own grants to the registry when it starts (as the
access list's default: an operator's `SetAgentTools` is kept), so what an
agent's model is shown and what it may invoke come from one list: its spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agentplex.agents.spec import AgentSpec, MemoryPolicy, ModelChoice, SpecLimits
from agentplex.agents.spec_file import AgentSpecError, Loaded, load_catalog

__all__ = [
    "ASSISTANT",
    "BUILTIN_SPECS",
    "CATALOG",
    "DEFAULT_SPEC_FILE",
    "RESEARCHER",
    "SUPERVISOR",
    "AgentSpec",
    "AgentSpecError",
    "Loaded",
    "MemoryPolicy",
    "ModelChoice",
    "SpecLimits",
    "UnknownAgent",
    "agents",
    "resolve",
]

BUILTIN_SPECS = Path(__file__).parent / "specs" / "builtin.yaml"
# Picked up by `agentplex up` when present in its working directory.
DEFAULT_SPEC_FILE = "agentplex.agents.yaml"

CATALOG: dict[str, AgentSpec] = load_catalog(BUILTIN_SPECS, []).agents
"""The built-in agents by name."""

ASSISTANT = CATALOG["assistant"]
RESEARCHER = CATALOG["researcher"]
SUPERVISOR = CATALOG["supervisor"]


class UnknownAgent(LookupError):
    """An agent name that none of the loaded specs declares."""


def agents(files: Sequence[Path] = ()) -> Loaded:
    """The built-in agents plus the files' (a file's agent replaces a built-in of its name)."""
    return load_catalog(BUILTIN_SPECS, files)


def resolve(name: str, files: Sequence[Path] = ()) -> AgentSpec:
    """The spec of agent `name`, from the built-ins and `files`."""
    loaded = agents(files).agents
    if name not in loaded:
        raise UnknownAgent(f"no agent {name!r}; the specs define: {', '.join(sorted(loaded))}")
    return loaded[name]
