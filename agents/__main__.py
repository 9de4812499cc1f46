"""`python -m agentplex.agents --agent NAME`: run one agent."""

from agentplex.agents.app import main

main()
