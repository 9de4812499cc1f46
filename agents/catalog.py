"""The agents the mesh ships with.

Each agent publishes its own grants to the registry when it starts (as the
access list's default: an operator's `SetAgentTools` is kept), so what an
agent's model is shown and what it may invoke come from one list.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentplex.v1 import tool_registry_service_pb2


@dataclass(frozen=True)
class AgentSpec:
    """Configuration of one agent."""

    name: str
    version: str
    description: str
    instructions: str
    # Tool grants as "name@major".
    tools: tuple[str, ...]

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(grant.partition("@")[0] for grant in self.tools)

    @property
    def grants(self) -> list[tool_registry_service_pb2.ToolGrant]:
        """The access list this agent publishes for itself: 'calculator@1' → (calculator, 1)."""
        return [
            tool_registry_service_pb2.ToolGrant(name=name, major=int(major or 0))
            for name, _, major in (grant.partition("@") for grant in self.tools)
        ]


ASSISTANT = AgentSpec(
    name="assistant",
    version="1.0.0",
    description="General helper: exact arithmetic and per-session notes.",
    instructions=(
        "You are a precise assistant. Use the calculator for any arithmetic instead of "
        "computing in your head. When asked to remember something, save it with "
        "notes.write; when asked what you were told, read notes.read. Answer briefly."
    ),
    # Each tool pinned to a major version: a breaking 2.0 never reaches this agent unasked.
    tools=("calculator@1", "notes.read@1", "notes.write@1"),
)

RESEARCHER = AgentSpec(
    name="researcher",
    version="1.0.0",
    description="Answers questions about agentplex from its own documentation.",
    instructions=(
        "You answer questions about agentplex. Search the documentation with docs.search "
        "and answer only from what it returns, naming the source file."
    ),
    tools=("docs.search@1",),
)

SUPERVISOR = AgentSpec(
    name="supervisor",
    version="1.0.0",
    description=(
        "Plans, hands independent sub-tasks to the other agents in parallel and "
        "answers from their results."
    ),
    instructions=(
        "You coordinate other agents; you have no tools of your own. Split the request "
        "into independent parts and delegate each in the same turn: arithmetic and notes "
        "to agent.assistant, questions about agentplex to agent.researcher. Give each a "
        "self-contained prompt. When their results are in, answer from them, saying which "
        "agent found what. If a delegation fails, answer with what you have and say what "
        "is missing."
    ),
    # Delegation is tool use: the same grants, pins and checks as any other tool.
    tools=("agent.assistant@1", "agent.researcher@1"),
)

CATALOG: dict[str, AgentSpec] = {spec.name: spec for spec in (ASSISTANT, RESEARCHER, SUPERVISOR)}
