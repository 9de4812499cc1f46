"""`python -m agentplex.tools`: run the built-in tool backend."""

from agentplex.tools.app import main

main()
