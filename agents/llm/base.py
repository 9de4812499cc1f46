"""The provider interface and the data that crosses it.

A provider streams one completion as `TextDelta`s followed by exactly one
`Completion`. Errors are split by whether retrying can help: the runner
retries `TransientLLMError` (timeouts, 429, 5xx, dropped connections) and
fails the task at once on `LLMError` (bad request, bad key, unknown model).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A tool invocation the model asked for."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    # For role "tool": which call this message answers.
    tool_call_id: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model is shown it: name, description, JSON Schema of arguments."""

    name: str
    description: str
    parameters_json: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # True when the provider reported nothing and the tokens were estimated.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Completion:
    """The end of one model call: the full message, why it stopped, what it cost."""

    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    usage: Usage
    model: str


@dataclass(frozen=True)
class CompletionRequest:
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = field(default_factory=tuple)
    max_tokens: int | None = None


LLMEvent = TextDelta | Completion


class LLMError(Exception):
    """The model call failed and retrying the same call will not help."""


class TransientLLMError(LLMError):
    """The model call failed in a way that may succeed on retry."""


class LLMProvider(Protocol):
    @property
    def model(self) -> str:
        """Identifier shown in agent cards and events, e.g. 'scripted/scripted-1'."""
        ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        """Stream one completion: zero or more TextDelta, then one Completion."""
        ...

    async def aclose(self) -> None: ...
