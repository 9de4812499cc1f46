"""`python -m agentplex.memory`: run the Memory service."""

from agentplex.memory.app import main

main()
