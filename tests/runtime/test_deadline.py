"""Deadline: an absolute point in time that travels with a task."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agentplex.runtime.clients import Deadline, open_channel
from agentplex.runtime.errors import DeadlineExceeded


def test_after_sets_an_absolute_time() -> None:
    before = time.monotonic()
    deadline = Deadline.after(10)
    assert before + 10 <= deadline.at <= time.monotonic() + 10
    assert 9 < deadline.remaining() <= 10


def test_timeout_without_cap_is_the_remaining_time() -> None:
    deadline = Deadline.after(5)
    assert 4 < deadline.timeout() <= 5


def test_timeout_is_capped() -> None:
    deadline = Deadline.after(60)
    assert deadline.timeout(cap=2.5) == 2.5
    assert deadline.timeout(2.5) == 2.5


def test_cap_larger_than_remaining_time_is_ignored() -> None:
    deadline = Deadline.after(1)
    assert 0 < deadline.timeout(cap=30) <= 1


def test_remaining_time_shrinks() -> None:
    deadline = Deadline(time.monotonic() + 0.5)
    first = deadline.remaining()
    second = deadline.remaining()
    assert second <= first


@pytest.mark.parametrize("offset", [-10.0, -0.001, 0.0])
def test_timeout_raises_when_passed(offset: float) -> None:
    deadline = Deadline(time.monotonic() + offset)
    assert deadline.remaining() <= 0
    with pytest.raises(DeadlineExceeded, match="the task's deadline passed") as caught:
        deadline.timeout()
    assert caught.value.reason == "DEADLINE_EXCEEDED"
    with pytest.raises(DeadlineExceeded):
        deadline.timeout(cap=5)


def test_deadline_is_immutable() -> None:
    deadline = Deadline.after(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        deadline.at = 0  # type: ignore[misc]  # the point: a frozen dataclass refuses it


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


def test_from_context_without_caller_deadline_uses_default() -> None:
    deadline = Deadline.from_context(FakeContext(None), default_seconds=300)
    assert 299 < deadline.remaining() <= 300


def test_from_context_uses_the_callers_deadline() -> None:
    deadline = Deadline.from_context(FakeContext(2.0), default_seconds=300)
    assert 1.5 < deadline.remaining() <= 2.0


SERVICE = "agentplex.test.Clock"


@pytest.fixture
async def clock() -> AsyncIterator[str]:
    """A server that reports the deadline it derived from each incoming call."""

    async def remaining(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        deadline = Deadline.from_context(context, default_seconds=300)
        return json.dumps({"remaining": deadline.remaining()}).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE, {"Remaining": grpc.unary_unary_rpc_method_handler(remaining)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_from_context_over_grpc(clock: str) -> None:
    channel = open_channel(clock)
    try:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
        call = channel.unary_unary(f"/{SERVICE}/Remaining")
        with_deadline = json.loads(await call(b"", timeout=2))["remaining"]
        without_deadline = json.loads(await call(b""))["remaining"]
    finally:
        await channel.close()
    # grpc-timeout travels as a rounded header value: allow a little slack above 2 s.
    assert 0 < with_deadline <= 2.1
    assert 290 < without_deadline <= 300
