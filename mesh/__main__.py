"""`python -m agentplex.mesh` is the `agentplex` command."""

from agentplex.mesh.cli import main

main()
