from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SideEffect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_EFFECT_UNSPECIFIED: _ClassVar[SideEffect]
    SIDE_EFFECT_READ_ONLY: _ClassVar[SideEffect]
    SIDE_EFFECT_IDEMPOTENT: _ClassVar[SideEffect]
    SIDE_EFFECT_SIDE_EFFECTING: _ClassVar[SideEffect]

class ToolState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_STATE_UNSPECIFIED: _ClassVar[ToolState]
    TOOL_STATE_ACTIVE: _ClassVar[ToolState]
    TOOL_STATE_DEPRECATED: _ClassVar[ToolState]
    TOOL_STATE_RETIRED: _ClassVar[ToolState]

class BackendKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_KIND_UNSPECIFIED: _ClassVar[BackendKind]
    BACKEND_KIND_EXECUTOR: _ClassVar[BackendKind]
    BACKEND_KIND_AGENT: _ClassVar[BackendKind]
SIDE_EFFECT_UNSPECIFIED: SideEffect
SIDE_EFFECT_READ_ONLY: SideEffect
SIDE_EFFECT_IDEMPOTENT: SideEffect
SIDE_EFFECT_SIDE_EFFECTING: SideEffect
TOOL_STATE_UNSPECIFIED: ToolState
TOOL_STATE_ACTIVE: ToolState
TOOL_STATE_DEPRECATED: ToolState
TOOL_STATE_RETIRED: ToolState
BACKEND_KIND_UNSPECIFIED: BackendKind
BACKEND_KIND_EXECUTOR: BackendKind
BACKEND_KIND_AGENT: BackendKind

class ToolDefinition(_message.Message):
    __slots__ = ("name", "version", "description", "input_schema_json", "output_schema_json", "side_effect", "endpoint", "backend_kind", "state", "replacement", "endpoints", "argument_policies", "requires_approval")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SIDE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENT_POLICIES_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    input_schema_json: str
    output_schema_json: str
    side_effect: SideEffect
    endpoint: str
    backend_kind: BackendKind
    state: ToolState
    replacement: str
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    argument_policies: _containers.RepeatedCompositeFieldContainer[ArgumentPolicy]
    requires_approval: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., input_schema_json: _Optional[str] = ..., output_schema_json: _Optional[str] = ..., side_effect: _Optional[_Union[SideEffect, str]] = ..., endpoint: _Optional[str] = ..., backend_kind: _Optional[_Union[BackendKind, str]] = ..., state: _Optional[_Union[ToolState, str]] = ..., replacement: _Optional[str] = ..., endpoints: _Optional[_Iterable[str]] = ..., argument_policies: _Optional[_Iterable[_Union[ArgumentPolicy, _Mapping]]] = ..., requires_approval: _Optional[bool] = ...) -> None: ...

class ArgumentPolicy(_message.Message):
    __slots__ = ("argument", "url", "path", "host")
    ARGUMENT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    argument: str
    url: UrlPolicy
    path: PathPolicy
    host: HostPolicy
    def __init__(self, argument: _Optional[str] = ..., url: _Optional[_Union[UrlPolicy, _Mapping]] = ..., path: _Optional[_Union[PathPolicy, _Mapping]] = ..., host: _Optional[_Union[HostPolicy, _Mapping]] = ...) -> None: ...

class UrlPolicy(_message.Message):
    __slots__ = ("allowed_schemes", "allowed_hosts", "allowed_ports")
    ALLOWED_SCHEMES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PORTS_FIELD_NUMBER: _ClassVar[int]
    allowed_schemes: _containers.RepeatedScalarFieldContainer[str]
    allowed_hosts: _containers.RepeatedScalarFieldContainer[str]
    allowed_ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, allowed_schemes: _Optional[_Iterable[str]] = ..., allowed_hosts: _Optional[_Iterable[str]] = ..., allowed_ports: _Optional[_Iterable[int]] = ...) -> None: ...

class PathPolicy(_message.Message):
    __slots__ = ("allowed_extensions",)
    ALLOWED_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    allowed_extensions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allowed_extensions: _Optional[_Iterable[str]] = ...) -> None: ...

class HostPolicy(_message.Message):
    __slots__ = ("allowed_hosts", "allowed_ports")
    ALLOWED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PORTS_FIELD_NUMBER: _ClassVar[int]
    allowed_hosts: _containers.RepeatedScalarFieldContainer[str]
    allowed_ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, allowed_hosts: _Optional[_Iterable[str]] = ..., allowed_ports: _Optional[_Iterable[int]] = ...) -> None: ...

class ToolError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
