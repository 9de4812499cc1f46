"""The mesh as a whole: the `agentplex` command, the local process launcher
(`agentplex up`), the embedded Redis, and the state file that tells every
other command where the parts listen.
"""
