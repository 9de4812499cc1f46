from agentplex.gateway.app import main

main()
