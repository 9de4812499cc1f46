"""Fixtures for delegation tests: a scripted model whose calls can be held at a gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from agentplex.agents.llm.base import CompletionRequest, LLMEvent
from agentplex.agents.llm.scripted import ScriptedLLM


class Gate:
    """Holds model calls until opened; `open_at` opens it by itself once that many
    calls are waiting at once (a barrier: proof that they run in parallel)."""

    def __init__(self, *, open_at: int | None = None) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0
        self.arrived = 0
        self._open_at = open_at

    def open(self) -> None:
        self.opened.set()

    async def wait(self) -> None:
        self.waiting += 1
        self.arrived += 1
        if self._open_at is not None and self.waiting >= self._open_at:
            self.opened.set()
        try:
            await self.opened.wait()
        finally:
            self.waiting -= 1


class GatedModel(ScriptedLLM):
    """The scripted model, but each call first waits at `gate`."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        await self.gate.wait()
        async for event in super().stream(request):
            yield event


@pytest.fixture
def gated() -> Callable[[Gate], GatedModel]:
    """`gated(gate)`: a scripted model whose calls wait at `gate`."""
    return GatedModel


@pytest.fixture
def make_gate() -> Callable[..., Gate]:
    """`make_gate(open_at=2)`: a gate (see `Gate`)."""
    return Gate
