"""The mesh as a whole: the `agentplex` command, the local process launcher
(`agentplex up`), the embedded Redis, and the state file that tells every
other command where the parts listen.
"""

import os

# Before anything imports grpc: the launcher forks children (which exec at once)
# while its own gRPC threads run; grpc's fork handlers are for children that go
# on using gRPC, and with them on, every restart logs a warning to the terminal.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
