"""`agentplex serve PART`: one part of the mesh, on its own, configured from the environment.

This is the one way every part starts, wherever it runs: a container
(deploy/kubernetes runs `agentplex serve memory`, `agentplex serve agent
assistant`…), a systemd unit, a shell, and `agentplex up`, which starts each of
its children with `python -m agentplex.mesh.serve PART`. A part binds
`AGENTPLEX_HOST:AGENTPLEX_PORT` (flags win), reaches its peers at the addresses
its settings name (DNS names work: no loopback assumption, no state file) and
publishes `AGENTPLEX_ADVERTISE_HOST` as where others reach it (docs/SETTINGS.md).

Each part's main is imported only when chosen, so `serve memory` never loads
Envoy's config classes or the agent runner.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    main: str  # "module:function"; the function takes the part's own argv
    help: str
    # The part serves one agent, named right after the part: `serve agent NAME`.
    per_agent: bool = False

    def load(self) -> Callable[[list[str]], None]:
        module, _, function = self.main.partition(":")
        main: Callable[[list[str]], None] = getattr(importlib.import_module(module), function)
        return main


PARTS: dict[str, Part] = {
    "memory": Part("agentplex.memory.app:main", "the Memory service (sessions in Redis)"),
    "registry": Part("agentplex.registry.app:main", "the Tool Registry"),
    "tools": Part("agentplex.tools.app:main", "the built-in tool backend (ToolExecutorService)"),
    "agent": Part("agentplex.agents.app:main", "one agent's AgentService", per_agent=True),
    "worker": Part(
        "agentplex.agents.worker:main", "a task worker for one agent's queue", per_agent=True
    ),
    "gateway-control-plane": Part(
        "agentplex.gateway.app:main", "the gateway's xDS control plane (configures Envoy)"
    ),
    "envoy": Part(
        "agentplex.gateway.edge:main",
        "Envoy, booted from the control plane at AGENTPLEX_GATEWAY_CONTROL_PLANE_ADDRESS",
    ),
}
EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(
        f"  {name + (' NAME' if part.per_agent else ''):<24}{part.help}"
        for name, part in PARTS.items()
    )
    parser = argparse.ArgumentParser(
        prog="agentplex serve",
        description="Run one part of the mesh, configured by AGENTPLEX_* variables "
        "(docs/SETTINGS.md). Flags after the part go to it: "
        "agentplex serve memory --help.",
        epilog=f"parts:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("part", choices=sorted(PARTS), metavar="PART")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the part's own flags")
    return parser


def part_argv(part: str, args: Sequence[str]) -> list[str]:
    """The argv the part's main gets: `agent NAME --x` becomes `--agent NAME --x`."""
    if not PARTS[part].per_agent:
        return list(args)
    if not args or args[0].startswith("-"):
        raise ValueError(
            f"agentplex serve {part}: name the agent, e.g. agentplex serve {part} assistant"
        )
    return ["--agent", args[0], *args[1:]]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        own_argv = part_argv(args.part, args.args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    PARTS[args.part].load()(own_argv)


if __name__ == "__main__":
    main()
