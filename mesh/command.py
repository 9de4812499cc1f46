"""The `agentplex` command's entry point.

`pip install agentplex` alone brings only what calling agents needs (the
contracts and `agentplex.clients.agent`); the command runs the mesh, which is
the `mesh` extra. Without it, one line says what to install instead of an
import traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


def main() -> None:
    try:
        if sys.argv[1:2] == ["serve"]:
            # One part alone: its own main, without the rest of the command's imports.
            from agentplex.mesh import serve

            serve.main(sys.argv[2:])
            return
        from agentplex.mesh import cli
    except ModuleNotFoundError as exc:
        print(
            f"agentplex: the command runs the mesh, which is not installed (no module "
            f"{exc.name!r}): pip install 'agentplex[mesh]'",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE) from None
    cli.main()
