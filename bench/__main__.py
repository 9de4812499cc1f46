"""`python -m agentplex.bench`: run the benchmark suite."""

from agentplex.bench.run import main

main()
