from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentCard(_message.Message):
    __slots__ = ("name", "version", "description", "tools", "limits", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    limits: AgentLimits
    model: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[AgentLimits, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class AgentLimits(_message.Message):
    __slots__ = ("max_steps_limit", "default_max_steps", "min_token_budget", "max_token_budget", "default_token_budget", "max_prompt_bytes")
    MAX_STEPS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_steps_limit: int
    default_max_steps: int
    min_token_budget: int
    max_token_budget: int
    default_token_budget: int
    max_prompt_bytes: int
    def __init__(self, max_steps_limit: _Optional[int] = ..., default_max_steps: _Optional[int] = ..., min_token_budget: _Optional[int] = ..., max_token_budget: _Optional[int] = ..., default_token_budget: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ...) -> None: ...
