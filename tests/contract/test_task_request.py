"""Validation of RunTask/StreamSteps input into a TaskRequest."""

from __future__ import annotations

import pytest

from agentplex.contract.task_request import TaskRequest
from agentplex.runtime.errors import InvalidArgument
from agentplex.v1 import agent_service_pb2 as pb


def test_defaults_fill_unset_fields() -> None:
    task = TaskRequest.from_proto(pb.RunTaskRequest(prompt="hi"))
    assert (task.max_steps, task.token_budget) == (10, 8192)
    assert task.task_id.startswith("t-") and task.session_id.startswith("s-")


def test_explicit_values_are_kept() -> None:
    task = TaskRequest.from_proto(
        pb.StreamStepsRequest(
            prompt="hi",
            session_id="abc:1",
            task_id="my-task.1",
            max_steps=25,
            token_budget=512,
            metadata={"team": "ops"},
        )
    )
    assert (task.task_id, task.session_id, task.max_steps, task.token_budget) == (
        "my-task.1",
        "abc:1",
        25,
        512,
    )
    assert task.metadata == {"team": "ops"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt: is required"),
        ({"prompt": "   "}, "prompt: must not be blank"),
        ({"prompt": "x" * (64 * 1024 + 1)}, "prompt: is 65537 bytes; the limit is 65536"),
        ({"max_steps": 0}, "max_steps: must be between 1 and 25 (got 0)"),
        ({"max_steps": 26}, "max_steps: must be between 1 and 25 (got 26)"),
        ({"token_budget": 100}, "token_budget: must be between 512 and 32768 (got 100)"),
        ({"token_budget": 40000}, "token_budget: must be between 512 and 32768 (got 40000)"),
        ({"task_id": "has space"}, "task_id: must match"),
        ({"session_id": "a/b"}, "session_id: must match"),
    ],
)
def test_bad_input_is_rejected_with_the_field_named(
    fields: dict[str, object], message: str
) -> None:
    request = pb.RunTaskRequest(prompt="hi")
    for key, value in fields.items():
        setattr(request, key, value)
    with pytest.raises(InvalidArgument) as caught:
        TaskRequest.from_proto(request)
    assert message in caught.value.message


def test_multibyte_prompt_is_measured_in_bytes() -> None:
    with pytest.raises(InvalidArgument):
        TaskRequest.from_proto(pb.RunTaskRequest(prompt="é" * (32 * 1024 + 1)))
    assert TaskRequest.from_proto(pb.RunTaskRequest(prompt="é" * (32 * 1024))).prompt


def test_too_much_metadata_is_rejected() -> None:
    request = pb.RunTaskRequest(prompt="hi", metadata={f"k{i}": "v" for i in range(33)})
    with pytest.raises(InvalidArgument, match="metadata"):
        TaskRequest.from_proto(request)
