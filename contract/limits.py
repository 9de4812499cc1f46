"""The limits every task is held to, and the defaults for what a caller leaves unset.

Part of the protocol, not of one agent: the agent validates against them,
publishes them on its AgentCard, and the registry sizes a delegated
sub-task's budget by them.
"""

from __future__ import annotations

MAX_STEPS_LIMIT = 25
DEFAULT_MAX_STEPS = 10
MIN_TOKEN_BUDGET = 512
MAX_TOKEN_BUDGET = 32768
DEFAULT_TOKEN_BUDGET = 8192
MAX_PROMPT_BYTES = 64 * 1024
