import datetime

from agentplex.v1 import principal_pb2 as _principal_pb2
from agentplex.v1 import task_pb2 as _task_pb2
from agentplex.v1 import tool_pb2 as _tool_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepEvent(_message.Message):
    __slots__ = ("task_id", "sequence", "time", "agent", "depth", "step", "source_task_id", "source_sequence", "task_accepted", "step_started", "llm_output_delta", "llm_call_finished", "tool_call", "tool_result", "final_result", "error", "delegation_started", "delegation_finished", "budget_warning")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TASK_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_FIELD_NUMBER: _ClassVar[int]
    LLM_OUTPUT_DELTA_FIELD_NUMBER: _ClassVar[int]
    LLM_CALL_FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FINISHED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_WARNING_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    agent: str
    depth: int
    step: int
    source_task_id: str
    source_sequence: int
    task_accepted: TaskAccepted
    step_started: StepStarted
    llm_output_delta: LlmOutputDelta
    llm_call_finished: LlmCallFinished
    tool_call: ToolCallStarted
    tool_result: ToolCallResult
    final_result: TaskFinished
    error: TaskFailed
    delegation_started: DelegationStarted
    delegation_finished: DelegationFinished
    budget_warning: BudgetWarning
    def __init__(self, task_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., agent: _Optional[str] = ..., depth: _Optional[int] = ..., step: _Optional[int] = ..., source_task_id: _Optional[str] = ..., source_sequence: _Optional[int] = ..., task_accepted: _Optional[_Union[TaskAccepted, _Mapping]] = ..., step_started: _Optional[_Union[StepStarted, _Mapping]] = ..., llm_output_delta: _Optional[_Union[LlmOutputDelta, _Mapping]] = ..., llm_call_finished: _Optional[_Union[LlmCallFinished, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCallStarted, _Mapping]] = ..., tool_result: _Optional[_Union[ToolCallResult, _Mapping]] = ..., final_result: _Optional[_Union[TaskFinished, _Mapping]] = ..., error: _Optional[_Union[TaskFailed, _Mapping]] = ..., delegation_started: _Optional[_Union[DelegationStarted, _Mapping]] = ..., delegation_finished: _Optional[_Union[DelegationFinished, _Mapping]] = ..., budget_warning: _Optional[_Union[BudgetWarning, _Mapping]] = ...) -> None: ...

class DelegationStarted(_message.Message):
    __slots__ = ("call_id", "agent", "task_id", "token_budget", "lineage")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    agent: str
    task_id: str
    token_budget: int
    lineage: _task_pb2.TaskLineage
    def __init__(self, call_id: _Optional[str] = ..., agent: _Optional[str] = ..., task_id: _Optional[str] = ..., token_budget: _Optional[int] = ..., lineage: _Optional[_Union[_task_pb2.TaskLineage, _Mapping]] = ...) -> None: ...

class DelegationFinished(_message.Message):
    __slots__ = ("call_id", "agent", "task_id", "result")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    agent: str
    task_id: str
    result: _task_pb2.TaskResult
    def __init__(self, call_id: _Optional[str] = ..., agent: _Optional[str] = ..., task_id: _Optional[str] = ..., result: _Optional[_Union[_task_pb2.TaskResult, _Mapping]] = ...) -> None: ...

class BudgetWarning(_message.Message):
    __slots__ = ("tokens_used", "token_budget")
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    tokens_used: int
    token_budget: int
    def __init__(self, tokens_used: _Optional[int] = ..., token_budget: _Optional[int] = ...) -> None: ...

class TaskAccepted(_message.Message):
    __slots__ = ("session_id", "max_steps", "token_budget", "principal")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_steps: int
    token_budget: int
    principal: _principal_pb2.Principal
    def __init__(self, session_id: _Optional[str] = ..., max_steps: _Optional[int] = ..., token_budget: _Optional[int] = ..., principal: _Optional[_Union[_principal_pb2.Principal, _Mapping]] = ...) -> None: ...

class StepStarted(_message.Message):
    __slots__ = ("tokens_used",)
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    tokens_used: int
    def __init__(self, tokens_used: _Optional[int] = ...) -> None: ...

class LlmOutputDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class LlmCallFinished(_message.Message):
    __slots__ = ("model", "prompt_tokens", "completion_tokens", "finish_reason", "tool_calls_requested", "usage_estimated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tool_calls_requested: int
    usage_estimated: bool
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., tool_calls_requested: _Optional[int] = ..., usage_estimated: _Optional[bool] = ...) -> None: ...

class ToolCallStarted(_message.Message):
    __slots__ = ("call_id", "tool_name", "tool_version", "arguments_json", "idempotency_key")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    tool_name: str
    tool_version: str
    arguments_json: str
    idempotency_key: str
    def __init__(self, call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., tool_version: _Optional[str] = ..., arguments_json: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ToolCallResult(_message.Message):
    __slots__ = ("call_id", "tool_name", "result_json", "error", "duration_ms")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    tool_name: str
    result_json: str
    error: _tool_pb2.ToolError
    duration_ms: int
    def __init__(self, call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., result_json: _Optional[str] = ..., error: _Optional[_Union[_tool_pb2.ToolError, _Mapping]] = ..., duration_ms: _Optional[int] = ...) -> None: ...

class TaskFinished(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _task_pb2.TaskResult
    def __init__(self, result: _Optional[_Union[_task_pb2.TaskResult, _Mapping]] = ...) -> None: ...

class TaskFailed(_message.Message):
    __slots__ = ("code", "message", "result", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    result: _task_pb2.TaskResult
    reason: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., result: _Optional[_Union[_task_pb2.TaskResult, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...
