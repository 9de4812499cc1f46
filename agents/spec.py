"""`AgentSpec`: the configuration of one agent, as its spec file declares it.

Every field past `tools` has a default that means "as the mesh's settings
say", so code that builds a spec by hand keeps working. Spec files are read
by agents/spec_file.py; the built-in agents are agents/specs/builtin.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentplex.contract import agent_tool as delegation_tool
from agentplex.runtime.settings import Settings
from agentplex.v1 import tool_registry_service_pb2


@dataclass(frozen=True)
class ModelChoice:
    """The model an agent calls; None: the mesh's setting (AGENTPLEX_LLM_PROVIDER, …).

    Never a secret: an API key comes from the environment (AGENTPLEX_OPENAI_API_KEY).
    """

    provider: str | None = None
    name: str | None = None
    base_url: str | None = None


@dataclass(frozen=True)
class SpecLimits:
    """Caps on this agent's tasks, within agentplex.contract.limits; None: the contract's.

    A task asking for more steps or tokens than its agent's cap runs with the cap.
    """

    max_steps: int | None = None
    token_budget: int | None = None
    # The deepest delegation chain this agent's own delegations may reach.
    delegation_depth: int | None = None


@dataclass(frozen=True)
class MemoryPolicy:
    """How much of a session each task sees; None: the mesh's AGENTPLEX_CONTEXT_* settings."""

    context_tokens: int | None = None
    max_messages: int | None = None
    summary_tokens: int | None = None


@dataclass(frozen=True)
class AgentSpec:
    """Configuration of one agent."""

    name: str
    version: str
    description: str
    instructions: str
    # Tool grants as "name@major"; delegation grants are "agent.<name>@1".
    tools: tuple[str, ...]
    model: ModelChoice = ModelChoice()
    limits: SpecLimits = SpecLimits()
    memory: MemoryPolicy = MemoryPolicy()
    # Where the spec was declared ("FILE:LINE"); not part of the agent's identity.
    source: str = field(default="", compare=False)

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(grant.partition("@")[0] for grant in self.tools)

    @property
    def delegates_to(self) -> tuple[str, ...]:
        """The agents this one may delegate to (its `agent.<name>` grants)."""
        return tuple(
            delegation_tool.agent_of_tool(name)
            for name in self.tool_names
            if delegation_tool.is_agent_tool(name)
        )

    @property
    def grants(self) -> list[tool_registry_service_pb2.ToolGrant]:
        """The access list this agent publishes for itself: 'calculator@1' → (calculator, 1)."""
        return [
            tool_registry_service_pb2.ToolGrant(name=name, major=int(major or 0))
            for name, _, major in (grant.partition("@") for grant in self.tools)
        ]

    def settings(self, settings: Settings) -> Settings:
        """The mesh's settings with this spec's model and memory policy applied."""
        update: dict[str, object] = {}
        if self.model.provider is not None:
            update["llm_provider"] = self.model.provider
        if self.model.name is not None:
            update["openai_model"] = self.model.name
        if self.model.base_url is not None:
            update["openai_base_url"] = self.model.base_url
        if self.memory.context_tokens is not None:
            update["context_tokens"] = self.memory.context_tokens
        if self.memory.max_messages is not None:
            update["context_max_messages"] = self.memory.max_messages
        if self.memory.summary_tokens is not None:
            update["context_summary_tokens"] = self.memory.summary_tokens
        return settings.model_copy(update=update) if update else settings
