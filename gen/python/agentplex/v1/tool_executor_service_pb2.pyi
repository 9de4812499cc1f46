from agentplex.v1 import tool_pb2 as _tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as _tool_registry_service_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecuteToolRequest(_message.Message):
    __slots__ = ("tool_name", "tool_version", "arguments_json", "caller", "idempotency_key")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    tool_version: str
    arguments_json: str
    caller: _tool_registry_service_pb2.Caller
    idempotency_key: str
    def __init__(self, tool_name: _Optional[str] = ..., tool_version: _Optional[str] = ..., arguments_json: _Optional[str] = ..., caller: _Optional[_Union[_tool_registry_service_pb2.Caller, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ExecuteToolResponse(_message.Message):
    __slots__ = ("result_json", "error")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    error: _tool_pb2.ToolError
    def __init__(self, result_json: _Optional[str] = ..., error: _Optional[_Union[_tool_pb2.ToolError, _Mapping]] = ...) -> None: ...
