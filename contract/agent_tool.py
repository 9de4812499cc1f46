"""The `agent.<name>` tool: how one agent (or an operator) delegates to another.

Every agent publishes this contract for itself when it starts, with its own
address and `BACKEND_KIND_AGENT`; the registry turns an invocation into a
durable sub-task on that agent's queue. Its input is a sub-task's request
(the limits are the protocol's own), its output the sub-task's result.
"""

from __future__ import annotations

from typing import Any

from agentplex.contract import limits
from agentplex.contract.tool_definition import define
from agentplex.v1 import tool_pb2

PREFIX = "agent."
SESSION_ID_PATTERN = "^[A-Za-z0-9._:-]{1,128}$"


def tool_name(agent: str) -> str:
    """'researcher' → 'agent.researcher'."""
    return f"{PREFIX}{agent}"


def agent_of_tool(name: str) -> str:
    """'agent.researcher' → 'researcher'."""
    return name.removeprefix(PREFIX)


def is_agent_tool(name: str) -> bool:
    return name.startswith(PREFIX)


INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": limits.MAX_PROMPT_BYTES},
        "session_id": {"type": "string", "pattern": SESSION_ID_PATTERN},
        "max_steps": {"type": "integer", "minimum": 1, "maximum": limits.MAX_STEPS_LIMIT},
        "token_budget": {
            "type": "integer",
            "minimum": limits.MIN_TOKEN_BUDGET,
            "maximum": limits.MAX_TOKEN_BUDGET,
        },
    },
    "required": ["prompt"],
    "additionalProperties": False,
}

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "output": {"type": "string"},
        "error": {"type": "string"},
        "steps_used": {"type": "integer"},
        "tokens_used": {"type": "integer"},
    },
    "required": ["task_id", "output", "error", "steps_used", "tokens_used"],
}


def definition(*, agent: str, version: str, description: str) -> tool_pb2.ToolDefinition:
    """The contract through which others delegate to `agent`."""
    return define(
        name=tool_name(agent),
        version=version,
        description=f"Delegates a task to the {agent} agent: {description}",
        input_schema=INPUT_SCHEMA,
        output_schema=OUTPUT_SCHEMA,
        side_effect=tool_pb2.SIDE_EFFECT_SIDE_EFFECTING,
    )
