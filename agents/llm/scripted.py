"""`scripted`: a deterministic offline stand-in for an LLM. It is not a model.

It exists so the whole mesh (planning, tool calls through the registry,
memory, streaming, budgets) can run and be tested without a network or GPU,
with answers that are the same on every run. Its "planning" is a handful of
rules over the last user message:

- arithmetic expressions → one `calculator` call per expression (in parallel);
- "remember …" → `notes.write` with the rest of the sentence;
- "what did I ask you to remember" / "my notes" / "recall" → `notes.read`;
- a prompt that names one of the agent's other tools (any tool but those above and
  `agent.<name>`, e.g. a team's own `greet.say`, named as a whole word) → one call of
  each named tool whose input schema has exactly one required property, a string:
  the whole prompt is that argument (tools named in a prompt that do not have that
  shape are left alone);
- any other question → `docs.search` with the question;
- for an agent that may only delegate (`agent.<name>` tools): arithmetic and
  notes clauses → `agent.assistant`, questions → `agent.researcher`, both in
  the same turn so they run in parallel;
- "summarize …" with no tools offered (what agents/context.py sends) → an
  extractive summary: the first sentence of each line, within `max_tokens`;

and once the tool results are in, it answers from them. Rules only fire for
tools the agent was given; with no matching tool it says so. Output is
streamed word by word and usage is the documented token estimate.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agentplex.agents.context import unwrap_untrusted
from agentplex.agents.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMEvent,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from agentplex.runtime.tokens import estimate_message_tokens, estimate_tokens

# An expression: numbers joined by at least one arithmetic operator.
_NUMBER = r"\(*\s*-?\d+(?:\.\d+)?\s*\)*"
_EXPRESSION = re.compile(rf"{_NUMBER}(?:\s*(?:\*\*|//|[-+*/%^x×÷])\s*{_NUMBER})+")
_REMEMBER = re.compile(r"\bremember(?:\s+that)?\s*[:,]?\s*(?P<text>.+)", re.IGNORECASE | re.DOTALL)
_RECALL = re.compile(
    r"what did i (?:ask|tell) you to remember|\bmy notes\b|\brecall\b|\bwhat do you remember\b",
    re.IGNORECASE,
)
_SUMMARIZE = re.compile(r"\bsummar(?:ize|ise|y)\b", re.IGNORECASE)
_QUESTION = re.compile(
    r"\?\s*$|^\s*(what|how|why|where|which|who|when|does|do|is|are|can|should|explain|describe)\b",
    re.IGNORECASE,
)


class ScriptedLLM:
    """Deterministic rule-based model for tests and the offline default."""

    def __init__(self, name: str = "scripted-1", *, delay_seconds: float = 0.0) -> None:
        self._name = name
        # Simulated thinking time, so demos and chaos runs have tasks worth interrupting.
        self._delay = delay_seconds

    @property
    def model(self) -> str:
        return f"scripted/{self._name}"

    async def aclose(self) -> None:
        return None

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        prompt_tokens = sum(estimate_message_tokens(m.content) for m in request.messages) + sum(
            estimate_tokens(t.parameters_json) for t in request.tools
        )
        if self._delay:
            await asyncio.sleep(self._delay)
        pending_results = _results_since_last_user(request.messages)
        last_user = _last_user_text(request.messages)
        if not request.tools and pending_results is None and _SUMMARIZE.search(last_user):
            answer = extractive_summary(last_user, request.max_tokens)
        elif pending_results is None:
            calls = plan_tool_calls(_last_user_text(request.messages), request.tools)
            if calls:
                completion_tokens = sum(estimate_tokens(c.arguments_json) for c in calls)
                yield Completion(
                    "",
                    tuple(calls),
                    "tool_calls",
                    Usage(prompt_tokens, completion_tokens, estimated=True),
                    self.model,
                )
                return
            answer = _no_tool_answer(request.tools)
        else:
            answer = compose_answer(pending_results)
        for index, word in enumerate(answer.split(" ")):
            yield TextDelta(word if index == 0 else " " + word)
        yield Completion(
            answer,
            (),
            "stop",
            Usage(prompt_tokens, estimate_tokens(answer), estimated=True),
            self.model,
        )


def plan_tool_calls(prompt: str, tools: Sequence[ToolSpec]) -> list[ToolCall]:
    available = {tool.name for tool in tools}
    calls: list[tuple[str, dict[str, Any]]] = []
    remember = _REMEMBER.search(prompt)
    if _RECALL.search(prompt) and "notes.read" in available:
        calls.append(("notes.read", {}))
    elif remember and "notes.write" in available:
        calls.append(("notes.write", {"text": remember.group("text").strip().rstrip(".")}))
    elif "calculator" in available:
        seen: list[str] = []
        for match in _EXPRESSION.finditer(prompt):
            expression = _normalize(match.group(0))
            if expression not in seen:
                seen.append(expression)
        calls.extend(("calculator", {"expression": e}) for e in seen)
    if not calls:
        calls.extend(plan_named_tools(prompt, tools))
    if not calls and _QUESTION.search(prompt) and "docs.search" in available:
        calls.append(("docs.search", {"query": prompt.strip()}))
    if not calls:
        calls.extend(plan_delegations(prompt, available))
    return [
        ToolCall(id=f"call_{index}", name=name, arguments_json=json.dumps(arguments))
        for index, (name, arguments) in enumerate(calls, start=1)
    ]


# The tools the rules above know; any other tool the agent has is called by name.
_KNOWN_TOOLS = frozenset({"calculator", "notes.read", "notes.write", "docs.search"})


def plan_named_tools(prompt: str, tools: Sequence[ToolSpec]) -> list[tuple[str, dict[str, Any]]]:
    """One call per tool the prompt names (as a whole word) that the other rules do not
    handle, when its arguments are one required string: the prompt, verbatim."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for tool in tools:
        if tool.name in _KNOWN_TOOLS or tool.name.startswith("agent."):
            continue
        if not re.search(rf"(?<![\w.]){re.escape(tool.name)}(?![\w]|\.\w)", prompt):
            continue
        argument = _single_string_argument(tool.parameters_json)
        if argument is not None:
            calls.append((tool.name, {argument: prompt.strip()}))
    return calls


def _single_string_argument(parameters_json: str) -> str | None:
    """The name of the one required property of a schema, if that property is a string."""
    try:
        schema = json.loads(parameters_json or "{}")
    except json.JSONDecodeError:
        return None
    required = schema.get("required") if isinstance(schema, dict) else None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(required, list) or len(required) != 1 or not isinstance(properties, dict):
        return None
    name = required[0]
    prop = properties.get(name) if isinstance(name, str) else None
    if isinstance(prop, dict) and prop.get("type") == "string":
        return str(name)
    return None


def extractive_summary(text: str, max_tokens: int | None) -> str:
    """A previous summary kept whole, then the first sentence of every "role: text" line;
    past `max_tokens` (by the estimate) the oldest part goes first."""
    sentences = []
    previous = False
    for line in text.splitlines():
        role, sep, content = line.partition(": ")
        if line.strip() == "Summary so far:":
            previous = True
        elif previous and line.strip():
            sentences.append(line.strip())
        elif sep and role in {"user", "assistant", "tool", "system"} and content.strip():
            previous = False
            sentence = re.split(r"(?<=[.!?])\s", content.strip(), maxsplit=1)[0]
            sentences.append(f"{role.capitalize()}: {sentence}")
        else:
            previous = False
    summary = " ".join(sentences) or "Nothing to summarize."
    if max_tokens is not None:
        data = summary.encode("utf-8")
        summary = data[max(0, len(data) - max(1, max_tokens) * 4) :].decode("utf-8", "ignore")
    return summary.strip()


# Where a prompt splits into independent requests: after a sentence, or at an
# "and"/"then"/"also" that starts a new question.
_CLAUSES = re.compile(
    r"(?<=[?.!;])\s+|,?\s+(?:and|then|also)\s+(?=(?:what|how|why|where|which|who|when|does|do|"
    r"is|are|can|should|explain|describe|tell|remember|compute|calculate)\b)",
    re.IGNORECASE,
)


def plan_delegations(prompt: str, available: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Split a prompt into sub-tasks for other agents: what the assistant's tools
    answer (arithmetic, notes) and what the researcher's do (other questions)."""
    for_assistant: list[str] = []
    for_researcher: list[str] = []
    for clause in (c.strip() for c in _CLAUSES.split(prompt)):
        if not clause:
            continue
        if _EXPRESSION.search(clause) or _REMEMBER.search(clause) or _RECALL.search(clause):
            for_assistant.append(clause)
        elif _QUESTION.search(clause):
            for_researcher.append(clause)
    calls: list[tuple[str, dict[str, Any]]] = []
    if for_assistant and "agent.assistant" in available:
        calls.append(("agent.assistant", {"prompt": " ".join(for_assistant)}))
    if for_researcher and "agent.researcher" in available:
        calls.append(("agent.researcher", {"prompt": " ".join(for_researcher)}))
    return calls


def _normalize(expression: str) -> str:
    text = re.sub(r"\s+", "", expression).replace("x", "*").replace("×", "*").replace("÷", "/")
    # Balance parentheses the regex may have cut at the edges.
    while text.startswith("(") and text.count("(") > text.count(")"):
        text = text[1:]
    while text.endswith(")") and text.count(")") > text.count("("):
        text = text[:-1]
    return text


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""


def _results_since_last_user(
    messages: Sequence[ChatMessage],
) -> list[tuple[ToolCall, dict[str, Any]]] | None:
    """Tool calls made for the current prompt, with their parsed results; None if none yet."""
    calls: dict[str, ToolCall] = {}
    results: list[tuple[ToolCall, dict[str, Any]]] = []
    for message in messages:
        if message.role == "user":
            calls, results = {}, []
        elif message.role == "assistant":
            calls.update({call.id: call for call in message.tool_calls})
        elif message.role == "tool" and message.tool_call_id in calls:
            payload = _tool_payload(message.content)
            if not isinstance(payload, dict):
                payload = {"error": {"message": message.content}}
            results.append((calls[message.tool_call_id], payload))
    return results or None


def _tool_payload(content: str) -> object:
    """A tool result: the runner sends it in its untrusted-data envelope; bare JSON
    (a conversation written by hand) is read as it is."""
    try:
        return unwrap_untrusted(content)
    except ValueError:  # JSONDecodeError included
        pass
    try:
        payload: object = json.loads(content)
    except json.JSONDecodeError:
        return None
    return payload


def compose_answer(results: list[tuple[ToolCall, dict[str, Any]]]) -> str:
    parts = [_describe(call, payload) for call, payload in results]
    return " ".join(parts)


def _describe(call: ToolCall, payload: dict[str, Any]) -> str:
    arguments = json.loads(call.arguments_json or "{}")
    error = payload.get("error")
    if isinstance(error, dict):
        return f"{call.name} failed: {error.get('message', 'unknown error')}."
    if call.name == "calculator":
        return f"{arguments.get('expression')} = {_format_number(payload.get('result'))}."
    if call.name == "notes.write":
        return f"Noted: {arguments.get('text')}."
    if call.name == "notes.read":
        notes = payload.get("notes") or []
        return (
            "You asked me to remember: " + "; ".join(notes) + "."
            if notes
            else ("You have not asked me to remember anything yet.")
        )
    if call.name.startswith("agent."):
        output = payload.get("output") or "(no answer)"
        stopped = f" (stopped early: {payload['error']})" if payload.get("error") else ""
        return f"{call.name.removeprefix('agent.')}: {output}{stopped}"
    if call.name == "docs.search":
        hits = payload.get("results") or []
        if not hits:
            return "I found nothing in the documentation about that."
        top = hits[0]
        return f"From {top['source']} ({top['title']}): {top['snippet']}"
    return f"{call.name} returned {json.dumps(payload, sort_keys=True)}."


def _format_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _no_tool_answer(tools: Sequence[ToolSpec]) -> str:
    names = ", ".join(sorted(tool.name for tool in tools)) or "none"
    return (
        "I am the scripted test model and none of my rules matched this request. "
        f"Tools I can use: {names}."
    )
