"""Human-readable (or JSON-lines) output of step events, results and tools.

JSON is what the gateway's JSON is: proto field names (`task_id`), every field printed.
Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org):
the caller decides with `use_colour` and passes the answer in.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from agentplex.v1 import mesh_control_service_pb2, step_event_pb2, task_pb2, tool_pb2

_RED, _YELLOW, _DIM, _BOLD, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
_CLEAR_LINE = "\r\x1b[K"


def message_dict(message: Message) -> dict[str, Any]:
    """A message as the gateway renders it in JSON: proto field names, defaults included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _json(message: Message) -> str:
    return json.dumps(message_dict(message), separators=(",", ":"))


def print_json(message: Message, out: TextIO | None = None) -> None:
    """One message as one line of JSON."""
    out = out or sys.stdout
    out.write(_json(message) + "\n")
    out.flush()


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed, or not a real stream
        return False


def use_colour(stream: TextIO, *, no_color: bool) -> bool:
    """Colour for `stream`: only a terminal, and never with NO_COLOR (`Settings.no_color`)."""
    return not no_color and is_terminal(stream)


def paint(text: str, style: str, colour: bool) -> str:
    return f"{style}{text}{_RESET}" if colour and text else text


def red(text: str, colour: bool) -> str:
    return paint(text, _RED, colour)


class EventPrinter:
    """Prints events as they arrive; LLM deltas stream inline on one line."""

    def __init__(
        self, *, json_lines: bool = False, out: TextIO | None = None, colour: bool = False
    ) -> None:
        self._json = json_lines
        self._out = out or sys.stdout
        self._colour = colour and not json_lines
        self._in_delta = False
        self.final_result: task_pb2.TaskResult | None = None

    def _line(self, text: str, style: str = "") -> None:
        if self._in_delta:
            self._out.write("\n")
            self._in_delta = False
        self._out.write(paint(text, style, self._colour and bool(style)) + "\n")
        self._out.flush()

    def event(self, event: step_event_pb2.StepEvent) -> None:
        kind = event.WhichOneof("kind")
        nested = bool(event.source_task_id)  # relayed from a sub-agent
        if kind == "final_result" and not nested:
            self.final_result = event.final_result.result
        elif kind == "error" and not nested:
            self.final_result = event.error.result
        if self._json:
            self._line(_json(event))
            return
        # Sub-agents' events are indented by depth and name their agent, so the
        # tree reads top-down while parallel branches interleave as they happen.
        prefix = f"[{event.sequence:>3}]"
        if nested:
            prefix += "  " * event.depth + f"{event.agent} |"
            if kind == "llm_output_delta":
                return  # parallel branches' words would interleave; the answer comes at the end
        if kind == "task_accepted":
            accepted = event.task_accepted
            self._line(
                f"{prefix} task {event.source_task_id or event.task_id} accepted by {event.agent} "
                f"(session {accepted.session_id}, max {accepted.max_steps} steps, "
                f"budget {accepted.token_budget} tokens)"
            )
        elif kind == "step_started":
            self._line(f"{prefix} step {event.step}")
        elif kind == "llm_output_delta":
            if not self._in_delta:
                self._out.write(f"{prefix} model: ")
                self._in_delta = True
            self._out.write(event.llm_output_delta.text)
            self._out.flush()
        elif kind == "llm_call_finished":
            done = event.llm_call_finished
            estimated = " (estimated)" if done.usage_estimated else ""
            self._line(
                f"{prefix} llm {done.model}: {done.finish_reason}, "
                f"{done.prompt_tokens}+{done.completion_tokens} tokens{estimated}"
            )
        elif kind == "tool_call":
            call = event.tool_call
            version = f"@{call.tool_version}" if call.tool_version else ""
            self._line(f"{prefix} tool call  {call.tool_name}{version} {call.arguments_json}", _DIM)
        elif kind == "tool_result":
            res = event.tool_result
            body = (
                res.result_json
                if res.WhichOneof("outcome") == "result_json"
                else f"ERROR {res.error.code}: {res.error.message}"
            )
            failed = res.WhichOneof("outcome") != "result_json"
            self._line(
                f"{prefix} tool result {res.tool_name} ({res.duration_ms} ms): {body}",
                _RED if failed else _DIM,
            )
        elif kind == "delegation_started":
            started = event.delegation_started
            self._line(
                f"{prefix} delegated to {started.agent}: task {started.task_id} "
                f"(depth {started.lineage.depth}, up to {started.token_budget} tokens)"
            )
        elif kind == "delegation_finished":
            result = event.delegation_finished.result
            status = task_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
            note = f" — {result.error}" if result.error else ""
            self._line(
                f"{prefix} {event.delegation_finished.agent} {status}{note} "
                f"({result.tokens_used} tokens, {result.duration_ms} ms): {result.output}"
            )
        elif kind == "budget_warning":
            warning = event.budget_warning
            self._line(
                f"{prefix} budget warning: {warning.tokens_used} of "
                f"{warning.token_budget} tokens used",
                _YELLOW,
            )
        elif kind == "final_result":
            self._summary(prefix, event.final_result.result)
        elif kind == "error":
            self._line(f"{prefix} task failed: {event.error.code}: {event.error.message}", _RED)

    def _summary(self, prefix: str, result: task_pb2.TaskResult) -> None:
        status = task_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
        note = f" — {result.error}" if result.error else ""
        self._line(
            f"{prefix} {status}{note}: {result.steps_used} steps, {result.tokens_used} "
            f"tokens, {result.tool_calls} tool calls, {result.duration_ms} ms",
            _RED if result.error else "",
        )
        self._line(f"answer: {result.output}", _BOLD)

    def result(self, result: task_pb2.TaskResult) -> None:
        if self._json:
            self._line(_json(result))
            return
        self._out.write(result.output + "\n")
        if result.error:
            self._out.write(red(f"({result.error})", self._colour) + "\n")
        self._out.flush()

    def interrupted(self) -> None:
        if self._in_delta:
            self._out.write("\n")
            self._in_delta = False


class Progress:
    """One line on a terminal (stderr) while a task runs without --stream: a spinner,
    the step and what the agent is doing; `clear` leaves the line empty for the answer."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(
        self,
        agent: str,
        *,
        out: TextIO | None = None,
        colour: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agent = agent
        self._out = out or sys.stderr
        self._colour = colour
        self._clock = clock
        self._started = clock()
        self._frame = 0
        self._step = 0
        self._doing = "starting"
        self.final_result: task_pb2.TaskResult | None = None

    def event(self, event: step_event_pb2.StepEvent) -> None:
        kind = event.WhichOneof("kind")
        if event.source_task_id:  # a sub-agent's work, under its delegation
            if kind == "tool_call":
                self._doing = f"{event.agent} calls {event.tool_call.tool_name}"
            return
        if kind == "final_result":
            self.final_result = event.final_result.result
        elif kind == "error":
            self.final_result = event.error.result
        elif kind == "step_started":
            self._step, self._doing = event.step, "thinking"
        elif kind == "tool_call":
            self._doing = f"calling {event.tool_call.tool_name}"
        elif kind == "delegation_started":
            self._doing = f"delegated to {event.delegation_started.agent}"
        else:
            return
        self.draw()

    def line(self) -> str:
        """The progress line, without the spinner."""
        step = f"step {self._step}, " if self._step else ""
        elapsed = self._clock() - self._started
        return f"{self._agent}: {step}{self._doing}… {elapsed:.0f}s"

    def draw(self) -> None:
        """Redraw the line (the spinner turns one frame)."""
        frame = self.FRAMES[self._frame % len(self.FRAMES)]
        self._frame += 1
        width = shutil.get_terminal_size().columns - 1
        text = f"{frame} {self.line()}"[:width]
        self._out.write(_CLEAR_LINE + paint(text, _DIM, self._colour))
        self._out.flush()

    def clear(self) -> None:
        self._out.write(_CLEAR_LINE)
        self._out.flush()


def print_tools(
    tools: Iterable[tool_pb2.ToolDefinition], *, json_lines: bool = False, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    tools = list(tools)
    if json_lines:
        for tool in tools:
            out.write(_json(tool) + "\n")
        return
    width = max((len(t.name) for t in tools), default=4)
    out.write(f"{'NAME':<{width}}  VERSION  SIDE EFFECT     DESCRIPTION\n")
    for tool in tools:
        effect = tool_pb2.SideEffect.Name(tool.side_effect).removeprefix("SIDE_EFFECT_").lower()
        out.write(f"{tool.name:<{width}}  {tool.version:<7}  {effect:<14}  {tool.description}\n")


def print_task(task: task_pb2.Task, *, json_lines: bool = False, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if json_lines:
        out.write(_json(task) + "\n")
        return
    status = task_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()
    if task.cancel_requested:
        status += " (cancel requested)"
    out.write(
        f"task {task.task_id} on {task.agent}: {status}, attempts {task.attempts}, "
        f"last event {task.last_sequence}\n"
    )
    if task.lineage.depth:
        chain = " → ".join([*task.lineage.agents, task.agent])
        out.write(
            f"sub-task of {task.lineage.parent_task_id} (root {task.lineage.root_task_id}, "
            f"depth {task.lineage.depth}: {chain})\n"
        )
    if task.HasField("result"):
        result = task.result
        if result.error:
            out.write(f"error: {result.error}\n")
        if result.output:
            out.write(f"answer: {result.output}\n")
    out.flush()


_PART_STATES = {
    mesh_control_service_pb2.PART_STATE_STARTING: "starting",
    mesh_control_service_pb2.PART_STATE_RUNNING: "running",
    mesh_control_service_pb2.PART_STATE_BACKOFF: "backoff",
    mesh_control_service_pb2.PART_STATE_STOPPING: "stopping",
    mesh_control_service_pb2.PART_STATE_STOPPED: "stopped",
}


def print_parts(
    parts: Iterable[mesh_control_service_pb2.SupervisedPart],
    *,
    json_lines: bool = False,
    out: TextIO | None = None,
) -> None:
    """`agentplex ps`: one line per part (or one JSON object per line)."""
    out = out or sys.stdout
    if json_lines:
        for part in parts:
            out.write(_json(part) + "\n")
        return
    rows = [("PART", "STATE", "PID", "ADDRESS", "RESTARTS", "LAST EXIT")]
    for part in parts:
        state = _PART_STATES.get(part.state, "?")
        if part.crash_looping:
            state += " (crash loop)"
        last_exit = str(part.last_exit_code) if part.HasField("last_exit_code") else "-"
        rows.append(
            (
                part.name,
                state,
                str(part.pid or "-"),
                part.address or "-",
                str(part.restarts),
                last_exit,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            + "\n"
        )
    out.flush()
