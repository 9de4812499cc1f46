import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PartState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_STATE_UNSPECIFIED: _ClassVar[PartState]
    PART_STATE_STARTING: _ClassVar[PartState]
    PART_STATE_RUNNING: _ClassVar[PartState]
    PART_STATE_BACKOFF: _ClassVar[PartState]
    PART_STATE_STOPPING: _ClassVar[PartState]
    PART_STATE_STOPPED: _ClassVar[PartState]
PART_STATE_UNSPECIFIED: PartState
PART_STATE_STARTING: PartState
PART_STATE_RUNNING: PartState
PART_STATE_BACKOFF: PartState
PART_STATE_STOPPING: PartState
PART_STATE_STOPPED: PartState

class SupervisedPart(_message.Message):
    __slots__ = ("name", "group", "state", "pid", "address", "restarts", "last_exit_code", "started_at", "crash_looping", "log_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CRASH_LOOPING_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    group: str
    state: PartState
    pid: int
    address: str
    restarts: int
    last_exit_code: int
    started_at: _timestamp_pb2.Timestamp
    crash_looping: bool
    log_path: str
    def __init__(self, name: _Optional[str] = ..., group: _Optional[str] = ..., state: _Optional[_Union[PartState, str]] = ..., pid: _Optional[int] = ..., address: _Optional[str] = ..., restarts: _Optional[int] = ..., last_exit_code: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., crash_looping: _Optional[bool] = ..., log_path: _Optional[str] = ...) -> None: ...

class ListPartsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPartsResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[SupervisedPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[SupervisedPart, _Mapping]]] = ...) -> None: ...

class RestartPartRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RestartPartResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[SupervisedPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[SupervisedPart, _Mapping]]] = ...) -> None: ...
