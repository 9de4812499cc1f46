"""ContextManager against the real Memory service over gRPC: summaries trigger at the
limit, are stored in Memory and used in place of old turns, and keep every packet
(and themselves) bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentplex.agents.catalog import AgentSpec
from agentplex.agents.context import SUMMARY_HEADING, ContextManager, ContextPolicy
from agentplex.agents.llm.base import (
    Completion,
    CompletionRequest,
    LLMError,
    LLMEvent,
    TextDelta,
    Usage,
)
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.agents.runner import AgentRunner
from agentplex.clients.memory import MemoryClient
from agentplex.contract.task_request import TaskRequest
from agentplex.memory import app as memory_app
from agentplex.runtime.clients import Deadline
from agentplex.runtime.settings import Settings
from agentplex.v1 import memory_pb2, step_event_pb2, task_pb2, tool_registry_service_pb2

AGENT = "assistant"
TURN_TOKENS = 20  # every stored message in these tests costs exactly this much


@pytest.fixture
async def memory(settings: Settings) -> AsyncIterator[MemoryClient]:
    host = memory_app.build_host(settings, metrics_port=None)
    address = (await host.start()).address
    client = MemoryClient(address)
    try:
        yield client
    finally:
        await client.close()
        await host.stop()


async def seed(memory: MemoryClient, session: str, turns: int, tokens: int = TURN_TOKENS) -> None:
    for turn in range(turns):
        await memory.append(
            AGENT,
            session,
            [
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_USER,
                    content=f"question {turn}: remember fact {turn}.",
                    token_count=tokens,
                ),
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_ASSISTANT,
                    content=f"answer {turn}.",
                    token_count=tokens,
                ),
            ],
            timeout=5,
        )


class Summarizer:
    """A summarizing model whose output, usage and failures the test chooses."""

    model = "fake/summarizer"

    def __init__(
        self, text: str = "", *, reported_tokens: int | None = None, fail: bool = False
    ) -> None:
        self.text = text
        self.reported_tokens = reported_tokens
        self.fail = fail
        self.requests: list[CompletionRequest] = []

    def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.requests.append(request)
        return self._play(request)

    async def _play(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        if self.fail:
            raise LLMError("fake/summarizer: model unavailable")
        text = self.text or f"summary {len(self.requests)}"
        yield TextDelta(text)
        tokens = self.reported_tokens if self.reported_tokens is not None else 5
        yield Completion(text, (), "stop", Usage(100, tokens), self.model)

    async def aclose(self) -> None:
        return None


def manager(memory: MemoryClient, llm, **policy: int) -> ContextManager:
    options = {"max_tokens": 400, "max_messages": 40, "summary_tokens": 40, **policy}
    return ContextManager(memory=memory, llm=llm, policy=ContextPolicy(**options))


def deadline() -> Deadline:
    return Deadline.after(30)


async def test_a_session_within_its_limits_is_not_summarized(memory: MemoryClient) -> None:
    await seed(memory, "s-small", 4)  # 8 messages, 160 tokens
    llm = Summarizer()
    context = await manager(memory, llm).load(AGENT, "s-small", deadline())
    assert llm.requests == [] and context.summary_calls == []
    assert context.summary is None and len(context.messages) == 8


async def test_summary_triggers_at_the_limit_and_replaces_the_old_turns(
    memory: MemoryClient,
) -> None:
    await seed(memory, "s-long", 15)  # 30 messages × 20 = 600 tokens > 400
    llm = ScriptedLLM()  # the offline default summarizes extractively
    context = await manager(memory, llm).load(AGENT, "s-long", deadline())

    # One call folded the oldest turns it could see (at most the packet's limit),
    # whole turns only, and the rest now fits beside the summary.
    assert len(context.summary_calls) == 1
    assert context.summary is not None
    assert context.summary.through_position == 14
    assert 0 < context.summary.token_count <= 40
    assert context.token_count <= 400
    assert [m.position for m in context.messages] == list(range(14, 30))

    # Stored in Memory: the next load gets the summary, not the turns.
    stored = await memory.load(AGENT, "s-long", 400, timeout=5)
    assert stored.summary.content == context.summary.content
    assert stored.summary.model == "scripted/scripted-1"
    assert [m.position for m in stored.messages] == list(range(14, 30))
    assert stored.omitted_count == 0 and stored.next_position == 30

    # Used in place of the old turns: in the system message, ahead of the kept turns.
    chat = context.chat_messages("Be precise.")
    assert chat[0].role == "system"
    assert chat[0].content.startswith(f"Be precise.\n\n{SUMMARY_HEADING}\n")
    assert context.summary.content in chat[0].content
    assert [m.content for m in chat[1:3]] == ["question 7: remember fact 7.", "answer 7."]
    assert not any("question 3:" in m.content for m in chat[1:])
    # The newest folded turn made it into the summary (the oldest part goes first).
    assert "fact 6" in context.summary.content


async def test_a_long_backlog_is_folded_in_bounded_rounds(memory: MemoryClient) -> None:
    await seed(memory, "s-backlog", 25)  # 50 messages, 1000 tokens
    llm = Summarizer()
    context = await manager(memory, llm).load(AGENT, "s-backlog", deadline())
    assert len(llm.requests) == 3 == len(context.summary_calls)
    assert all(r.tools == () and r.max_tokens == 40 for r in llm.requests)
    assert context.omitted_count == 0 and context.token_count <= 400
    assert context.summary is not None and context.summary.content == "summary 3"
    first = context.messages[0]
    assert first.role == memory_pb2.ROLE_USER
    assert first.position == context.summary.through_position


async def test_a_new_summary_folds_the_previous_one(memory: MemoryClient) -> None:
    await seed(memory, "s-twice", 15)
    llm = Summarizer()
    await manager(memory, llm).load(AGENT, "s-twice", deadline())
    await seed(memory, "s-twice", 5)  # the session grows past the limit again
    await manager(memory, llm).load(AGENT, "s-twice", deadline())
    assert len(llm.requests) == 2
    first, second = (r.messages[-1].content for r in llm.requests)
    assert "Summary so far" not in first and "question 0:" in first
    assert "Summary so far:\nsummary 1" in second and "question 0:" not in second
    stored = await memory.load(AGENT, "s-twice", 400, timeout=5)
    assert stored.summary.content == "summary 2"


async def test_too_many_turns_trigger_a_summary_even_when_they_fit(memory: MemoryClient) -> None:
    await seed(memory, "s-many", 5, tokens=1)  # 10 messages of 1 token each
    context = await manager(memory, Summarizer(), max_messages=6).load(AGENT, "s-many", deadline())
    assert len(context.summary_calls) == 1
    assert context.summary is not None and context.summary.through_position == 8
    assert [m.content for m in context.messages] == ["question 4: remember fact 4.", "answer 4."]


async def test_summaries_are_bounded_even_when_the_model_ignores_max_tokens(
    memory: MemoryClient,
) -> None:
    await seed(memory, "s-verbose", 15)
    llm = Summarizer(" ".join(["blah"] * 5000), reported_tokens=5000)
    context = await manager(memory, llm).load(AGENT, "s-verbose", deadline())
    assert all(r.max_tokens == 40 for r in llm.requests)
    assert context.summary is not None
    assert context.summary.token_count <= 40
    assert len(context.summary.content.encode()) <= 40 * 4
    assert context.token_count <= 400


async def test_the_summary_never_takes_more_than_half_the_packet(memory: MemoryClient) -> None:
    policy = ContextPolicy(max_tokens=100, summary_tokens=4000)
    assert policy.summary_budget == 50 and policy.keep_tokens == 25


async def test_a_failing_model_still_gets_a_bounded_packet(memory: MemoryClient) -> None:
    await seed(memory, "s-fail", 15)
    context = await manager(memory, Summarizer(fail=True)).load(AGENT, "s-fail", deadline())
    assert context.summary is None and context.summary_calls == []
    assert context.token_count <= 400 and context.omitted_count == 10
    stored = await memory.load(AGENT, "s-fail", 10_000, timeout=5)
    assert len(stored.messages) == 30  # nothing lost, nothing summarized


async def test_an_empty_summary_is_refused_but_still_paid_for(memory: MemoryClient) -> None:
    await seed(memory, "s-empty", 15)
    context = await manager(memory, Summarizer("   ")).load(AGENT, "s-empty", deadline())
    assert context.summary is None and len(context.summary_calls) == 1
    stored = await memory.load(AGENT, "s-empty", 10_000, timeout=5)
    assert len(stored.messages) == 30 and not stored.HasField("summary")


async def test_summarizing_respects_the_spend_limit(memory: MemoryClient) -> None:
    await seed(memory, "s-poor", 15)
    llm = Summarizer()
    context = await manager(memory, llm).load(AGENT, "s-poor", deadline(), spend_limit=100)
    assert llm.requests == [] and context.token_count <= 400


async def test_concurrent_loads_of_one_session_agree_and_lose_nothing(
    memory: MemoryClient,
) -> None:
    await seed(memory, "s-race", 15)
    contexts = await asyncio.gather(
        *(manager(memory, Summarizer()).load(AGENT, "s-race", deadline()) for _ in range(4))
    )
    stored = await memory.load(AGENT, "s-race", 400, timeout=5)
    assert stored.summary.through_position == 14 and stored.next_position == 30
    assert [m.position for m in stored.messages] == list(range(14, 30))
    for context in contexts:
        assert context.token_count <= 400 and context.summary is not None


# --- the runner -----------------------------------------------------------------------------


class ModelThatSummarizes:
    """Summarizes when asked (no tools offered), otherwise answers "done"."""

    model = "fake/1"

    def __init__(self) -> None:
        self.requests: list[CompletionRequest] = []

    def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.requests.append(request)
        return self._play(request)

    async def _play(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        summarizing = "Write the summary" in request.messages[-1].content
        text = "the user stated facts 0 to 10" if summarizing else "done"
        yield TextDelta(text)
        yield Completion(text, (), "stop", Usage(300 if summarizing else 50, 7), self.model)

    async def aclose(self) -> None:
        return None


class NoTools:
    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse:
        return tool_registry_service_pb2.ListToolsResponse(revision=1)

    async def invoke(self, request, *, timeout: float):
        raise AssertionError("no tools here")

    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]:
        raise AssertionError("no tools here")


async def test_runner_uses_and_pays_for_the_summary(memory: MemoryClient) -> None:
    await seed(memory, "s-run", 15)
    llm = ModelThatSummarizes()
    spec = AgentSpec(AGENT, "1.0.0", "test", "Be precise.", ())
    runner = AgentRunner(
        spec=spec,
        llm=llm,
        tools=NoTools(),
        memory=memory,
        context_tokens=400,
        context=manager(memory, llm),
    )
    events: list[step_event_pb2.StepEvent] = []

    async def sink(event: step_event_pb2.StepEvent) -> None:
        events.append(event)

    task = TaskRequest(
        task_id="t-run", prompt="what next?", session_id="s-run", max_steps=3, token_budget=8192
    )
    outcome = await runner.run(task, Deadline.after(30), sink)

    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.output == "done"
    summaries = [e for e in events if e.HasField("llm_call_finished") and e.step == 0]
    assert len(summaries) == 1  # reported before the first step, and paid for
    assert summaries[0].llm_call_finished.prompt_tokens == 300
    assert outcome.result.tokens_used == (300 + 7) + (50 + 7)
    answer_request = llm.requests[-1]
    assert "the user stated facts 0 to 10" in answer_request.messages[0].content
    assert [m.content for m in answer_request.messages[-3:]] == [
        "question 14: remember fact 14.",
        "answer 14.",
        "what next?",
    ]
    stored = await memory.load(AGENT, "s-run", 400, timeout=5)
    assert [m.content for m in stored.messages[-2:]] == ["what next?", "done"]
    # The provider's count of the answer (7) plus framing, not an estimate.
    assert stored.messages[-1].token_count == 7 + 4
