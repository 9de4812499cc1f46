"""`python -m agentplex.tasks --agent NAME`: run a worker for one agent's queue."""

from agentplex.tasks.app import main

main()
