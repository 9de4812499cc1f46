from agentplex.v1 import step_event_pb2 as _step_event_pb2
from agentplex.v1 import task_pb2 as _task_pb2
from agentplex.v1 import tool_pb2 as _tool_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterToolRequest(_message.Message):
    __slots__ = ("tool",)
    TOOL_FIELD_NUMBER: _ClassVar[int]
    tool: _tool_pb2.ToolDefinition
    def __init__(self, tool: _Optional[_Union[_tool_pb2.ToolDefinition, _Mapping]] = ...) -> None: ...

class RegisterToolResponse(_message.Message):
    __slots__ = ("tool", "created")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    tool: _tool_pb2.ToolDefinition
    created: bool
    def __init__(self, tool: _Optional[_Union[_tool_pb2.ToolDefinition, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListToolsRequest(_message.Message):
    __slots__ = ("agent", "all_versions")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    all_versions: bool
    def __init__(self, agent: _Optional[str] = ..., all_versions: _Optional[bool] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "revision")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_tool_pb2.ToolDefinition]
    revision: int
    def __init__(self, tools: _Optional[_Iterable[_Union[_tool_pb2.ToolDefinition, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class GetToolRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetToolResponse(_message.Message):
    __slots__ = ("tool",)
    TOOL_FIELD_NUMBER: _ClassVar[int]
    tool: _tool_pb2.ToolDefinition
    def __init__(self, tool: _Optional[_Union[_tool_pb2.ToolDefinition, _Mapping]] = ...) -> None: ...

class InvokeToolRequest(_message.Message):
    __slots__ = ("tool_name", "arguments_json", "idempotency_key", "caller", "version", "token_budget")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    arguments_json: str
    idempotency_key: str
    caller: Caller
    version: str
    token_budget: int
    def __init__(self, tool_name: _Optional[str] = ..., arguments_json: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., version: _Optional[str] = ..., token_budget: _Optional[int] = ...) -> None: ...

class InvokeToolStreamRequest(_message.Message):
    __slots__ = ("invocation",)
    INVOCATION_FIELD_NUMBER: _ClassVar[int]
    invocation: InvokeToolRequest
    def __init__(self, invocation: _Optional[_Union[InvokeToolRequest, _Mapping]] = ...) -> None: ...

class InvokeToolStreamResponse(_message.Message):
    __slots__ = ("subtask", "event", "response")
    SUBTASK_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    subtask: _task_pb2.Task
    event: _step_event_pb2.StepEvent
    response: InvokeToolResponse
    def __init__(self, subtask: _Optional[_Union[_task_pb2.Task, _Mapping]] = ..., event: _Optional[_Union[_step_event_pb2.StepEvent, _Mapping]] = ..., response: _Optional[_Union[InvokeToolResponse, _Mapping]] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("agent", "session_id", "task_id", "lineage")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    agent: str
    session_id: str
    task_id: str
    lineage: _task_pb2.TaskLineage
    def __init__(self, agent: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lineage: _Optional[_Union[_task_pb2.TaskLineage, _Mapping]] = ...) -> None: ...

class InvokeToolResponse(_message.Message):
    __slots__ = ("tool_name", "tool_version", "result_json", "error", "replayed", "warning", "registry_revision")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_REVISION_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    tool_version: str
    result_json: str
    error: _tool_pb2.ToolError
    replayed: bool
    warning: str
    registry_revision: int
    def __init__(self, tool_name: _Optional[str] = ..., tool_version: _Optional[str] = ..., result_json: _Optional[str] = ..., error: _Optional[_Union[_tool_pb2.ToolError, _Mapping]] = ..., replayed: _Optional[bool] = ..., warning: _Optional[str] = ..., registry_revision: _Optional[int] = ...) -> None: ...

class SetToolStateRequest(_message.Message):
    __slots__ = ("name", "version", "state", "replacement")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: _tool_pb2.ToolState
    replacement: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[_tool_pb2.ToolState, str]] = ..., replacement: _Optional[str] = ...) -> None: ...

class SetToolStateResponse(_message.Message):
    __slots__ = ("tool",)
    TOOL_FIELD_NUMBER: _ClassVar[int]
    tool: _tool_pb2.ToolDefinition
    def __init__(self, tool: _Optional[_Union[_tool_pb2.ToolDefinition, _Mapping]] = ...) -> None: ...

class ToolGrant(_message.Message):
    __slots__ = ("name", "major")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    major: int
    def __init__(self, name: _Optional[str] = ..., major: _Optional[int] = ...) -> None: ...

class SetAgentToolsRequest(_message.Message):
    __slots__ = ("agent", "grants", "only_if_unset")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    ONLY_IF_UNSET_FIELD_NUMBER: _ClassVar[int]
    agent: str
    grants: _containers.RepeatedCompositeFieldContainer[ToolGrant]
    only_if_unset: bool
    def __init__(self, agent: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[ToolGrant, _Mapping]]] = ..., only_if_unset: _Optional[bool] = ...) -> None: ...

class SetAgentToolsResponse(_message.Message):
    __slots__ = ("grants", "applied")
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[ToolGrant]
    applied: bool
    def __init__(self, grants: _Optional[_Iterable[_Union[ToolGrant, _Mapping]]] = ..., applied: _Optional[bool] = ...) -> None: ...

class WithdrawEndpointRequest(_message.Message):
    __slots__ = ("name", "version", "endpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    endpoint: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class WithdrawEndpointResponse(_message.Message):
    __slots__ = ("remaining",)
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    remaining: int
    def __init__(self, remaining: _Optional[int] = ...) -> None: ...
