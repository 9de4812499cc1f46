"""Validation of incoming task requests into a `TaskRequest`.

RunTask and StreamSteps carry the same fields; both go through
`TaskRequest.from_proto`, so limits and defaults live in one place and bad
input is rejected (INVALID_ARGUMENT, naming the field) before anything runs.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentplex.contract import limits, lineage
from agentplex.runtime.errors import InvalidArgument
from agentplex.v1 import agent_service_pb2, task_pb2

TaskMessage = (
    agent_service_pb2.RunTaskRequest | agent_service_pb2.StreamStepsRequest | task_pb2.TaskSpec
)

# A client-chosen task id: also what every read, watch and cancel is checked against,
# so no id can smuggle a tenant's record id (`tenant/id`) past the task API.
TASK_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
Identifier = Annotated[str, Field(pattern=TASK_ID_PATTERN)]


class TaskRequest(BaseModel):
    """A task that passed validation, with defaults filled in."""

    model_config = ConfigDict(frozen=True)

    task_id: Identifier
    prompt: str = Field(min_length=1)
    session_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)
    max_steps: int = Field(ge=1, le=limits.MAX_STEPS_LIMIT)
    token_budget: int = Field(ge=limits.MIN_TOKEN_BUDGET, le=limits.MAX_TOKEN_BUDGET)
    # Place in a delegation tree (all empty for a root task), kept as plain
    # fields so the model stays frozen and hashable; `lineage` rebuilds the proto.
    parent_task_id: str = ""
    root_task_id: str = ""
    depth: int = Field(default=0, ge=0)
    chain: tuple[str, ...] = ()
    # Wall-clock (Unix seconds) deadline a durable task carries; None: the caller's.
    deadline_unix: float | None = None

    @property
    def lineage(self) -> task_pb2.TaskLineage:
        return task_pb2.TaskLineage(
            parent_task_id=self.parent_task_id,
            root_task_id=self.root_task_id,
            depth=self.depth,
            agents=list(self.chain),
        )

    @field_validator("prompt")
    @classmethod
    def _prompt_fits(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be blank")
        size = len(prompt.encode("utf-8"))
        if size > limits.MAX_PROMPT_BYTES:
            raise ValueError(f"is {size} bytes; the limit is {limits.MAX_PROMPT_BYTES} (64 KiB)")
        return prompt

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, metadata: dict[str, str]) -> dict[str, str]:
        for key, value in metadata.items():
            if not key or len(key) > 64 or len(value) > 1024:
                raise ValueError("keys must be 1-64 characters and values at most 1024")
        return metadata

    @classmethod
    def from_proto(cls, request: TaskMessage) -> TaskRequest:
        lineage.check_shape(request.lineage)
        deadline = (
            request.deadline.ToMicroseconds() / 1e6
            if isinstance(request, task_pb2.TaskSpec) and request.HasField("deadline")
            else None
        )
        try:
            return cls(
                task_id=request.task_id or f"t-{uuid.uuid4().hex}",
                prompt=request.prompt,
                session_id=request.session_id or f"s-{uuid.uuid4().hex}",
                metadata=dict(request.metadata),
                max_steps=(
                    request.max_steps if request.HasField("max_steps") else limits.DEFAULT_MAX_STEPS
                ),
                token_budget=(
                    request.token_budget
                    if request.HasField("token_budget")
                    else limits.DEFAULT_TOKEN_BUDGET
                ),
                parent_task_id=request.lineage.parent_task_id,
                root_task_id=request.lineage.root_task_id,
                depth=request.lineage.depth,
                chain=tuple(request.lineage.agents),
                deadline_unix=deadline,
            )
        except ValidationError as exc:
            raise InvalidArgument(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """'max_steps: must be between 1 and 25 (got 26)'-style messages, one per problem."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "request"
        message = error["msg"].removeprefix("Value error, ")
        ctx = error.get("ctx") or {}
        if error["type"] in {"greater_than_equal", "less_than_equal"} and field in (
            "max_steps",
            "token_budget",
        ):
            low, high = (
                (1, limits.MAX_STEPS_LIMIT)
                if field == "max_steps"
                else (limits.MIN_TOKEN_BUDGET, limits.MAX_TOKEN_BUDGET)
            )
            message = f"must be between {low} and {high}"
        elif error["type"] == "string_pattern_mismatch":
            message = f"must match {ctx.get('pattern')}"
        elif error["type"] == "string_too_short" and field == "prompt":
            message = "is required"
        got = error.get("input")
        if field != "prompt" and isinstance(got, (int, str)):
            message += f" (got {got!r})"
        problems.append(f"{field}: {message}")
    return "; ".join(problems)
