"""The scripted model drives a team's own tool: named in the prompt, one string argument."""

from __future__ import annotations

import json

from agentplex.agents.llm.base import ToolSpec
from agentplex.agents.llm.scripted import plan_tool_calls


def schema(properties: dict[str, object], required: list[str]) -> str:
    return json.dumps({"type": "object", "properties": properties, "required": required})


GREET = ToolSpec("greet.say", "Greets.", schema({"text": {"type": "string"}}, ["text"]))


def calls(prompt: str, tools: list[ToolSpec]) -> list[tuple[str, dict[str, object]]]:
    return [(c.name, json.loads(c.arguments_json)) for c in plan_tool_calls(prompt, tools)]


def test_a_named_tool_gets_the_prompt_as_its_one_string_argument() -> None:
    assert calls("Please greet.say to Ada ", [GREET]) == [
        ("greet.say", {"text": "Please greet.say to Ada"})
    ]


def test_only_whole_names_of_tools_with_one_required_string() -> None:
    two = ToolSpec(
        "greet.twice",
        "",
        schema({"a": {"type": "string"}, "b": {"type": "string"}}, ["a", "b"]),
    )
    number = ToolSpec("greet.count", "", schema({"n": {"type": "integer"}}, ["n"]))
    tools = [GREET, two, number]
    assert calls("greet.sayer to Ada", tools) == []
    assert calls("say hello to Ada", tools) == []
    assert calls("greet.twice and greet.count Ada", tools) == []


def test_the_other_rules_come_first() -> None:
    calculator = ToolSpec(
        "calculator", "", schema({"expression": {"type": "string"}}, ["expression"])
    )
    assert calls("greet.say 2+3", [GREET, calculator]) == [("calculator", {"expression": "2+3"})]
