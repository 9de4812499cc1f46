from agentplex.v1 import memory_pb2 as _memory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppendMessagesRequest(_message.Message):
    __slots__ = ("scope", "messages")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    scope: _memory_pb2.SessionScope
    messages: _containers.RepeatedCompositeFieldContainer[_memory_pb2.MemoryMessage]
    def __init__(self, scope: _Optional[_Union[_memory_pb2.SessionScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_memory_pb2.MemoryMessage, _Mapping]]] = ...) -> None: ...

class AppendMessagesResponse(_message.Message):
    __slots__ = ("message_count",)
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    message_count: int
    def __init__(self, message_count: _Optional[int] = ...) -> None: ...

class LoadContextRequest(_message.Message):
    __slots__ = ("scope", "max_tokens")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    scope: _memory_pb2.SessionScope
    max_tokens: int
    def __init__(self, scope: _Optional[_Union[_memory_pb2.SessionScope, _Mapping]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class LoadContextResponse(_message.Message):
    __slots__ = ("messages", "token_count", "omitted_count", "summary", "next_position")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    OMITTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    NEXT_POSITION_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_memory_pb2.MemoryMessage]
    token_count: int
    omitted_count: int
    summary: _memory_pb2.ContextSummary
    next_position: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_memory_pb2.MemoryMessage, _Mapping]]] = ..., token_count: _Optional[int] = ..., omitted_count: _Optional[int] = ..., summary: _Optional[_Union[_memory_pb2.ContextSummary, _Mapping]] = ..., next_position: _Optional[int] = ...) -> None: ...

class ClearSessionRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: _memory_pb2.SessionScope
    def __init__(self, scope: _Optional[_Union[_memory_pb2.SessionScope, _Mapping]] = ...) -> None: ...

class ClearSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class ReadMessagesRequest(_message.Message):
    __slots__ = ("scope", "start_position", "max_messages")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    scope: _memory_pb2.SessionScope
    start_position: int
    max_messages: int
    def __init__(self, scope: _Optional[_Union[_memory_pb2.SessionScope, _Mapping]] = ..., start_position: _Optional[int] = ..., max_messages: _Optional[int] = ...) -> None: ...

class ReadMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_position")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_POSITION_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_memory_pb2.MemoryMessage]
    next_position: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_memory_pb2.MemoryMessage, _Mapping]]] = ..., next_position: _Optional[int] = ...) -> None: ...

class StoreSummaryRequest(_message.Message):
    __slots__ = ("scope", "summary", "expected_through_position")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_THROUGH_POSITION_FIELD_NUMBER: _ClassVar[int]
    scope: _memory_pb2.SessionScope
    summary: _memory_pb2.ContextSummary
    expected_through_position: int
    def __init__(self, scope: _Optional[_Union[_memory_pb2.SessionScope, _Mapping]] = ..., summary: _Optional[_Union[_memory_pb2.ContextSummary, _Mapping]] = ..., expected_through_position: _Optional[int] = ...) -> None: ...

class StoreSummaryResponse(_message.Message):
    __slots__ = ("removed_count", "message_count")
    REMOVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    removed_count: int
    message_count: int
    def __init__(self, removed_count: _Optional[int] = ..., message_count: _Optional[int] = ...) -> None: ...
