"""`python -m agentplex.registry`: run the Tool Registry service."""

from agentplex.registry.app import main

main()
