"""Agent spec files: loading, every validation error with file, line and field, the
built-in specs, and the agent entry points taking `--agents FILE`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentplex.agents import app as agents_app
from agentplex.agents import catalog
from agentplex.agents.catalog import AgentSpec, MemoryPolicy, ModelChoice, SpecLimits
from agentplex.agents.spec_file import AgentSpecError, parse
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime.settings import Settings

GREETER = """\
agents:
  - name: greeter
    version: 1.2.0
    description: Greets people by name.
    instructions: You greet people. Use greet.say.
    model:
      provider: openai
      name: small-model
      base_url: http://127.0.0.1:8000/v1
    tools: [greet.say@1, calculator@1]
    delegate_to: [assistant]
    limits:
      max_steps: 5
      token_budget: 4096
      delegation_depth: 2
    memory:
      context_tokens: 1024
      max_messages: 20
      summary_tokens: 128
  - name: echo
    description: Says it back.
    instructions: Repeat.
"""


def test_a_spec_file_declares_several_agents() -> None:
    greeter, echo = parse(GREETER, "team.yaml")
    assert greeter == AgentSpec(
        name="greeter",
        version="1.2.0",
        description="Greets people by name.",
        instructions="You greet people. Use greet.say.",
        tools=("greet.say@1", "calculator@1", "agent.assistant@1"),
        model=ModelChoice("openai", "small-model", "http://127.0.0.1:8000/v1"),
        limits=SpecLimits(max_steps=5, token_budget=4096, delegation_depth=2),
        memory=MemoryPolicy(context_tokens=1024, max_messages=20, summary_tokens=128),
    )
    assert greeter.source == "team.yaml:2"
    assert greeter.delegates_to == ("assistant",)
    assert [(g.name, g.major) for g in greeter.grants] == [
        ("greet.say", 1),
        ("calculator", 1),
        ("agent.assistant", 1),
    ]
    assert (echo.version, echo.tools, echo.limits) == ("1.0.0", (), SpecLimits())
    assert echo.source == "team.yaml:20"


def test_the_spec_replaces_the_mesh_settings_it_declares() -> None:
    greeter, echo = parse(GREETER, "team.yaml")
    settings = Settings(llm_provider="scripted", context_tokens=2048)
    mine = greeter.settings(settings)
    assert (mine.llm_provider, mine.openai_model, mine.openai_base_url) == (
        "openai",
        "small-model",
        "http://127.0.0.1:8000/v1",
    )
    assert (mine.context_tokens, mine.context_max_messages, mine.context_summary_tokens) == (
        1024,
        20,
        128,
    )
    assert echo.settings(settings) is settings


def test_a_task_runs_within_its_agents_caps() -> None:
    greeter = parse(GREETER, "team.yaml")[0]
    task = TaskRequest(task_id="t", prompt="hi", session_id="s", max_steps=10, token_budget=8192)
    assert agents_app.capped(greeter, task).max_steps == 5
    assert agents_app.capped(greeter, task).token_budget == 4096
    small = task.model_copy(update={"max_steps": 2})
    assert agents_app.capped(greeter, small).max_steps == 2
    card = agents_app.agent_card(greeter, "m")
    assert (card.limits.max_steps_limit, card.limits.default_max_steps) == (5, 5)
    assert (card.limits.max_token_budget, card.limits.default_token_budget) == (4096, 4096)


def errors_of(text: str, file: str = "team.yaml") -> list[str]:
    with pytest.raises(AgentSpecError) as caught:
        parse(text, file)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return str(caught.value).splitlines()


AGENT = "agents:\n  - name: greeter\n    description: d\n    instructions: i\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "    colour: blue\n",
            "team.yaml:5: agents[0].colour: unknown field 'colour' (allowed: name, version, "
            "description, instructions, model, tools, delegate_to, limits, memory)",
        ),
        (
            "    limits: {steps: 3}\n",
            "team.yaml:5: agents[0].limits.steps: unknown field 'steps' (allowed: max_steps, "
            "token_budget, delegation_depth)",
        ),
        (
            "    tools:\n      - calculator@1\n      - Greet.Say@1\n",
            "team.yaml:7: agents[0].tools[1]: 'Greet.Say' is not a tool name: dotted lowercase "
            "words, e.g. calculator or notes.read",
        ),
        (
            "    tools: [greet.say]\n",
            "team.yaml:5: agents[0].tools[0]: bad pin 'greet.say': pin a major version, as in "
            "greet.say@1 (a breaking version 2 then never reaches this agent unasked)",
        ),
        (
            "    tools: [calculator@1, greet.say@v2]\n",
            "team.yaml:5: agents[0].tools[1]: bad pin 'greet.say@v2': pin a major version, as "
            "in greet.say@1 (a breaking version 2 then never reaches this agent unasked)",
        ),
        (
            "    tools: [agent.assistant@1]\n",
            "team.yaml:5: agents[0].tools[0]: 'agent.assistant@1': delegation is declared "
            "under delegate_to ('assistant'), not as a tool",
        ),
        (
            "    limits:\n      max_steps: 99\n",
            "team.yaml:6: agents[0].limits.max_steps: Input should be less than or equal to "
            "25 (got 99)",
        ),
        (
            "    limits:\n      token_budget: 100\n",
            "team.yaml:6: agents[0].limits.token_budget: Input should be greater than or equal "
            "to 512 (got 100)",
        ),
        (
            "    memory:\n      context_tokens: 10\n",
            "team.yaml:6: agents[0].memory.context_tokens: Input should be greater than or "
            "equal to 64 (got 10)",
        ),
        (
            "    model:\n      api_key: sk-not-here\n",
            "team.yaml:5: agents[0].model: 'api_key': secrets never go in a spec file; set "
            "AGENTPLEX_OPENAI_API_KEY in the environment instead",
        ),
        (
            "    model: {provider: magic}\n",
            "team.yaml:5: agents[0].model.provider: Input should be 'scripted' or 'openai' "
            "(got 'magic')",
        ),
        (
            "    version: 1.0\n",
            "team.yaml:5: agents[0].version: Input should be a valid string (got 1.0)",
        ),
        (
            "    tools: [calculator@1, calculator@2]\n",
            "team.yaml:5: agents[0].tools[1]: 'calculator' is listed twice",
        ),
        (
            "    delegate_to: [greeter]\n",
            "team.yaml:5: agents[0].delegate_to[0]: an agent cannot delegate to itself",
        ),
        (
            "    description: again\n",
            "team.yaml:5: agents[0].description: duplicate field",
        ),
    ],
)
def test_each_problem_names_file_line_and_field(extra: str, expected: str) -> None:
    assert errors_of(AGENT + extra) == [expected]


def test_missing_fields_bad_names_and_duplicate_agents() -> None:
    assert errors_of("agents:\n  - name: Big Name\n") == [
        "team.yaml:2: agents[0].name: agent name 'Big Name' must be lowercase letters and "
        "digits, words joined by single '_', at most 48 characters",
        "team.yaml:2: agents[0].description: required field missing",
        "team.yaml:2: agents[0].instructions: required field missing",
    ]
    assert errors_of(AGENT + AGENT.removeprefix("agents:\n")) == [
        "team.yaml:5: agents[1].name: duplicate agent name 'greeter' (first at agents[0])"
    ]
    assert errors_of("agents: []\n") == [
        "team.yaml:1: agents: List should have at least 1 item after validation, not 0"
    ]
    assert errors_of("- name: x\n") == [
        "team.yaml:1: (file): expected a mapping with an 'agents' list"
    ]
    assert errors_of("agents: [\n") == [
        "team.yaml:2: (file): not YAML: expected the node content, but found '<stream end>'"
    ]


def test_the_built_in_agents_are_the_specs_shipped_with_the_package() -> None:
    assert catalog.BUILTIN_SPECS.is_file()
    assert list(catalog.CATALOG) == ["assistant", "researcher", "supervisor"]
    assert catalog.CATALOG["assistant"] == AgentSpec(
        name="assistant",
        version="1.0.0",
        description="General helper: exact arithmetic and per-session notes.",
        instructions=(
            "You are a precise assistant. Use the calculator for any arithmetic instead of "
            "computing in your head. When asked to remember something, save it with "
            "notes.write; when asked what you were told, read notes.read. Answer briefly."
        ),
        tools=("calculator@1", "notes.read@1", "notes.write@1"),
    )
    assert catalog.CATALOG["researcher"] == AgentSpec(
        name="researcher",
        version="1.0.0",
        description="Answers questions about agentplex from its own documentation.",
        instructions=(
            "You answer questions about agentplex. Search the documentation with docs.search "
            "and answer only from what it returns, naming the source file."
        ),
        tools=("docs.search@1",),
    )
    assert catalog.CATALOG["supervisor"] == AgentSpec(
        name="supervisor",
        version="1.0.0",
        description=(
            "Plans, hands independent sub-tasks to the other agents in parallel and "
            "answers from their results."
        ),
        instructions=(
            "You coordinate other agents; you have no tools of your own. Split the request "
            "into independent parts and delegate each in the same turn: arithmetic and notes "
            "to agent.assistant, questions about agentplex to agent.researcher. Give each a "
            "self-contained prompt. When their results are in, answer from them, saying which "
            "agent found what. If a delegation fails, answer with what you have and say what "
            "is missing."
        ),
        tools=("agent.assistant@1", "agent.researcher@1"),
    )


def test_a_file_adds_agents_and_replaces_built_ins_by_name(tmp_path: Path) -> None:
    team = tmp_path / "team.yaml"
    team.write_text(
        AGENT + "    delegate_to: [researcher]\n"
        "  - name: assistant\n    description: ours\n    instructions: mine\n"
    )
    loaded = catalog.agents([team])
    assert list(loaded.agents) == ["assistant", "researcher", "supervisor", "greeter"]
    assert loaded.agents["assistant"].description == "ours"
    assert loaded.notes == [f"{team}:6: agent 'assistant' replaces the built-in one"]
    assert catalog.resolve("greeter", [team]).delegates_to == ("researcher",)
    with pytest.raises(catalog.UnknownAgent, match="the specs define: assistant, greeter, "):
        catalog.resolve("nobody", [team])


def test_agents_across_files_are_checked_together(tmp_path: Path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(AGENT + "    delegate_to: [assistant, helper]\n")
    two.write_text(AGENT)
    with pytest.raises(AgentSpecError) as caught:
        catalog.agents([one, two, tmp_path / "missing.yaml"])
    assert str(caught.value).splitlines() == [
        f"{tmp_path / 'missing.yaml'}:1: (file): No such file or directory",
        f"{one}:5: agents[0].delegate_to[1]: no agent 'helper' to delegate to (known: "
        "assistant, greeter, researcher, supervisor)",
        f"{two}:2: agents[0].name: agent 'greeter' is already declared at {one}:2",
    ]


@pytest.mark.parametrize("module", ["agentplex.agents", "agentplex.agents.worker"])
def test_the_entry_points_refuse_an_unknown_agent_naming_the_known_ones(
    module: str, tmp_path: Path
) -> None:
    team = tmp_path / "team.yaml"
    team.write_text(AGENT)
    done = subprocess.run(
        [sys.executable, "-m", module, "--agents", str(team), "--agent", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        "cannot start: no agent 'nobody'; the specs define: assistant, greeter, researcher, "
        "supervisor"
    ) in done.stderr + done.stdout
    team.write_text(AGENT + "    tools: [greet]\n")
    bad = subprocess.run(
        [sys.executable, "-m", module, "--agents", str(team), "--agent", "greeter"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert f"{team}:5: agents[0].tools[0]: bad pin 'greet'" in bad.stderr + bad.stdout


class FakeRegistry:
    def __init__(self) -> None:
        self.invoked: list[str] = []

    async def invoke(self, request: object, *, timeout: float) -> str:
        self.invoked.append(getattr(request, "tool_name", ""))
        return "ran"

    async def invoke_stream(self, request: object, *, timeout: float) -> AsyncIterator[str]:
        self.invoked.append(getattr(request, "tool_name", ""))
        yield "streamed"


async def test_delegations_deeper_than_the_spec_allows_are_refused_in_process() -> None:
    from typing import Any, cast

    from agentplex.runtime import errors
    from agentplex.v1 import task_pb2
    from agentplex.v1 import tool_registry_service_pb2 as reg

    spec = parse(AGENT + "    delegate_to: [assistant]\n    limits: {delegation_depth: 1}\n", "t")[
        0
    ]
    registry = FakeRegistry()
    tools = agents_app.DepthCappedTools(cast(Any, registry), spec, 1)
    root = reg.InvokeToolRequest(tool_name="agent.assistant", caller=reg.Caller(agent="greeter"))
    assert await tools.invoke(root, timeout=1) == "ran"
    assert [item async for item in tools.invoke_stream(root, timeout=1)] == ["streamed"]
    nested = reg.InvokeToolRequest(
        tool_name="agent.assistant",
        caller=reg.Caller(
            agent="greeter",
            lineage=task_pb2.TaskLineage(
                parent_task_id="p", root_task_id="r", depth=1, agents=["supervisor"]
            ),
        ),
    )
    with pytest.raises(errors.FailedPrecondition) as refused:
        await tools.invoke(nested, timeout=1)
    assert refused.value.reason == "DELEGATION_DEPTH_EXCEEDED"
    assert "supervisor → greeter → assistant would be depth 2, the limit is 1" in str(refused.value)
    with pytest.raises(errors.FailedPrecondition):
        [item async for item in tools.invoke_stream(nested, timeout=1)]
    deep_tool = reg.InvokeToolRequest(tool_name="calculator", caller=nested.caller)
    assert await tools.invoke(deep_tool, timeout=1) == "ran"
    assert registry.invoked == ["agent.assistant", "agent.assistant", "calculator"]


@pytest.mark.parametrize(
    ("extra", "part"),
    [
        # Major 0 is no pin: the registry reads it as "the newest major".
        ("    tools: [calculator@0]\n", "bad pin 'calculator@0'"),
        # Others delegate to agent.<name>@1.
        ("    version: 2.0.0\n", "an agent's version is 1.x.y"),
        ("    model:\n      base_url: https://me:sk-1@llm.example/v1\n", "secrets never go"),
        ("    model:\n      base_url: https://llm.example/v1?api_key=sk-1\n", "secrets never go"),
    ],
)
def test_pins_versions_and_urls_that_would_mislead_are_refused(extra: str, part: str) -> None:
    [problem] = errors_of(AGENT + extra)
    assert problem.startswith("team.yaml:") and part in problem


def test_the_names_of_the_mesh_s_parts_are_reserved() -> None:
    for name in ("memory", "registry", "gateway", "control"):
        [problem] = errors_of(AGENT.replace("greeter", name))
        assert f"{name!r} is the name of a part of the mesh" in problem


def test_an_agent_says_when_the_registry_does_not_follow_its_spec() -> None:
    from agentplex.agents.app import grant_problems, missing_tools
    from agentplex.v1.tool_registry_service_pb2 import ToolGrant

    [spec] = parse(AGENT + "    tools: [calculator@1, greet.say@1]\n", "team.yaml")
    # Stored as asked, or an earlier list equal to it: nothing to say.
    assert grant_problems(spec, list(spec.grants), applied=True) == []
    assert grant_problems(spec, list(spec.grants), applied=False) == []
    # An operator's list kept over the spec's: say which, and where the spec is.
    [kept] = grant_problems(spec, [ToolGrant(name="calculator", major=1)], applied=False)
    assert "keeps the access list an operator set (calculator@1)" in kept
    assert "team.yaml:" in kept
    # A granted tool nobody publishes (yet): a misspelling, or a backend still to come.
    [missing] = missing_tools(spec, {"calculator"})
    assert "no tool 'greet.say' is published" in missing and "team.yaml:" in missing
