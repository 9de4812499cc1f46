"""Agent spec files: agents declared in YAML, validated with file, line and field named.

One file holds one or more agents::

    agents:
      - name: greeter                 # lowercase words joined by "_" (it becomes agent.greeter)
        version: 1.0.0                # semantic version (default 1.0.0)
        description: Greets people by name.
        instructions: You greet people. Use greet.say.
        model:                        # optional; unset: the mesh's settings
          provider: openai            # scripted | openai
          name: gpt-4o-mini
          base_url: http://127.0.0.1:8000/v1   # never a key: AGENTPLEX_OPENAI_API_KEY
        tools: [greet.say@1]          # each tool pinned to a major version
        delegate_to: [assistant]      # delegation is tool use: grants agent.assistant@1
        limits:                       # caps within agentplex.contract.limits
          max_steps: 5
          token_budget: 4096
          delegation_depth: 2
        memory:                       # the session context each task sees
          context_tokens: 1024
          max_messages: 20
          summary_tokens: 128

Every problem is an `AgentSpecError`, rendered one per line as
`FILE:LINE: agents[1].tools[0]: what is wrong`.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentplex.agents.spec import AgentSpec, MemoryPolicy, ModelChoice, SpecLimits
from agentplex.contract import agent_tool as delegation_tool
from agentplex.contract import limits as task_limits

# As the registry's tool names (registry/schemas.py): dotted lowercase words joined
# by single underscores. An agent's name is one such word: it becomes `agent.<name>`.
_WORD = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
AGENT_NAME = re.compile(rf"{_WORD}")
TOOL_NAME = re.compile(rf"{_WORD}(?:\.{_WORD})*")
# A pin names a major from 1 up: the registry reads major 0 as "the newest", no pin at all.
MAJOR = re.compile(r"[1-9][0-9]{0,5}")
SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
MAX_AGENT_NAME = 48
# The registry's mesh-wide limit (AGENTPLEX_MAX_DELEGATION_DEPTH) defaults to 3.
MAX_DELEGATION_DEPTH = 10
MIN_BUDGET, MAX_BUDGET = task_limits.MIN_TOKEN_BUDGET, task_limits.MAX_TOKEN_BUDGET
# Delegation to another agent is version 1 of its `agent.<name>` contract, so every
# agent's own version is a 1.x.y (each publishes `agent.<name>` at it).
DELEGATION_MAJOR = 1
# Names the mesh already gives to its parts, state-file keys and gateway routes: an
# agent called so would take their ports, addresses or routes.
RESERVED_NAMES = frozenset(
    {
        "memory", "registry", "tools", "gateway", "llm", "redis", "agents", "workers",
        "metrics", "control", "logs", "pid", "console", "envoy_admin",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class AgentSpecError(ValueError):
    """One or more problems in agent spec files, each naming file, line and field."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(str(problem) for problem in self.problems))


def _agent_name(name: str) -> str:
    if len(name) > MAX_AGENT_NAME or not AGENT_NAME.fullmatch(name):
        raise ValueError(
            f"agent name {name!r} must be lowercase letters and digits, words joined by "
            f"single '_', at most {MAX_AGENT_NAME} characters"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is the name of a part of the mesh; pick another")
    return name


def _tool_grant(grant: str) -> str:
    name, at, major = grant.partition("@")
    if not TOOL_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a tool name: dotted lowercase words, e.g. calculator or notes.read"
        )
    if delegation_tool.is_agent_tool(name):
        raise ValueError(
            f"{grant!r}: delegation is declared under delegate_to "
            f"({delegation_tool.agent_of_tool(name)!r}), not as a tool"
        )
    if not at or not MAJOR.fullmatch(major):
        raise ValueError(
            f"bad pin {grant!r}: pin a major version, as in {name}@1 "
            "(a breaking version 2 then never reaches this agent unasked)"
        )
    return grant


def _semver(version: str) -> str:
    match = SEMVER.fullmatch(version)
    if not match:
        raise ValueError(f"{version!r} is not a semantic version such as 1.0.0")
    if int(match.group(1)) != DELEGATION_MAJOR:
        raise ValueError(
            f"{version!r}: an agent's version is {DELEGATION_MAJOR}.x.y (others delegate to "
            f"agent.<name>@{DELEGATION_MAJOR}); raise the minor or patch for a new version"
        )
    return version


def _base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} must be an http:// or https:// URL")
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password or parts.query:
        raise ValueError(
            "secrets never go in a spec file: no user, password or query in base_url; "
            "set AGENTPLEX_OPENAI_API_KEY in the environment instead"
        )
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelDecl(_Strict):
    provider: Literal["scripted", "openai"] | None = None
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    base_url: Annotated[str, AfterValidator(_base_url)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if "key" in str(key).lower() or "secret" in str(key).lower():
                    raise ValueError(
                        f"{key!r}: secrets never go in a spec file; set "
                        "AGENTPLEX_OPENAI_API_KEY in the environment instead"
                    )
        return data


class LimitsDecl(_Strict):
    max_steps: Annotated[int, Field(ge=1, le=task_limits.MAX_STEPS_LIMIT)] | None = None
    token_budget: Annotated[int, Field(ge=MIN_BUDGET, le=MAX_BUDGET)] | None = None
    delegation_depth: Annotated[int, Field(ge=0, le=MAX_DELEGATION_DEPTH)] | None = None


class MemoryDecl(_Strict):
    # As the settings they replace (AGENTPLEX_CONTEXT_*); a packet never outgrows a budget.
    context_tokens: Annotated[int, Field(ge=64, le=task_limits.MAX_TOKEN_BUDGET)] | None = None
    max_messages: Annotated[int, Field(ge=2, le=1000)] | None = None
    summary_tokens: Annotated[int, Field(ge=16, le=task_limits.MAX_TOKEN_BUDGET)] | None = None


class AgentDecl(_Strict):
    name: Annotated[str, AfterValidator(_agent_name)]
    version: Annotated[str, AfterValidator(_semver)] = "1.0.0"
    description: Annotated[str, Field(min_length=1, max_length=1000)]
    instructions: Annotated[str, Field(min_length=1, max_length=task_limits.MAX_PROMPT_BYTES)]
    model: ModelDecl = ModelDecl()
    tools: list[Annotated[str, AfterValidator(_tool_grant)]] = []
    delegate_to: list[Annotated[str, AfterValidator(_agent_name)]] = []
    limits: LimitsDecl = LimitsDecl()
    memory: MemoryDecl = MemoryDecl()


class SpecFileDecl(_Strict):
    agents: Annotated[list[AgentDecl], Field(min_length=1)]


# The fields each part of a spec file may have, for "unknown field" messages.
_NESTED: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    SpecFileDecl: {"agents": AgentDecl},
    AgentDecl: {"model": ModelDecl, "limits": LimitsDecl, "memory": MemoryDecl},
}

Path_ = tuple[str | int, ...]


def _render(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(file)"


class _Lines:
    """Line numbers of every key and item of a YAML document, from the parser's marks."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[Path_, int] = {}
        self.duplicates: list[tuple[Path_, int]] = []
        if root is not None:
            self.lines[()] = root.start_mark.line + 1
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                here = (*path, name)
                if name in seen:
                    self.duplicates.append((here, key.start_mark.line + 1))
                seen.add(name)
                self.lines[here] = key.start_mark.line + 1
                self._walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self._walk(item, (*path, index))

    def line(self, path: Path_) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1


def _allowed(path: Path_) -> list[str]:
    model: type[BaseModel] = SpecFileDecl
    for part in path:
        if isinstance(part, int):
            continue
        nested = _NESTED.get(model, {}).get(part)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def _problems(exc: ValidationError, file: str, lines: _Lines) -> Iterator[Problem]:
    for error in exc.errors():
        path: Path_ = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = f"unknown field {path[-1]!r} (allowed: {', '.join(_allowed(path[:-1]))})"
        elif kind == "missing":
            message = "required field missing"
        elif kind in ("value_error", "assertion_error"):
            message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        else:
            message = error["msg"]
            if not isinstance(error["input"], dict | list):
                message += f" (got {error['input']!r})"
        yield Problem(file, lines.line(path), _render(path), message)


def parse(text: str, file: str) -> list[AgentSpec]:
    """The agents one spec file declares; AgentSpecError for anything wrong in it."""
    return _parse(text, file)[0]


def _parse(text: str, file: str) -> tuple[list[AgentSpec], _Lines]:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise AgentSpecError([Problem(file, line, "(file)", f"not YAML: {exc.problem}")]) from None
    finally:
        loader.dispose()
    lines = _Lines(root)
    problems = [
        Problem(file, line, _render(path), "duplicate field") for path, line in lines.duplicates
    ]
    if not isinstance(data, dict):
        problems.append(Problem(file, 1, "(file)", "expected a mapping with an 'agents' list"))
        raise AgentSpecError(problems)
    try:
        declared = SpecFileDecl.model_validate(data)
    except ValidationError as exc:
        raise AgentSpecError([*problems, *_problems(exc, file, lines)]) from None
    seen: dict[str, int] = {}
    for index, agent in enumerate(declared.agents):
        here: Path_ = ("agents", index)
        if agent.name in seen:
            problems.append(
                Problem(
                    file,
                    lines.line((*here, "name")),
                    _render((*here, "name")),
                    f"duplicate agent name {agent.name!r} (first at agents[{seen[agent.name]}])",
                )
            )
        seen.setdefault(agent.name, index)
        for field, items in (("tools", agent.tools), ("delegate_to", agent.delegate_to)):
            for position, item in enumerate(items):
                key = item.partition("@")[0]
                if [i.partition("@")[0] for i in items].index(key) != position:
                    problems.append(
                        Problem(
                            file,
                            lines.line((*here, field, position)),
                            _render((*here, field, position)),
                            f"{key!r} is listed twice",
                        )
                    )
        if agent.name in agent.delegate_to:
            position = agent.delegate_to.index(agent.name)
            problems.append(
                Problem(
                    file,
                    lines.line((*here, "delegate_to", position)),
                    _render((*here, "delegate_to", position)),
                    "an agent cannot delegate to itself",
                )
            )
    if problems:
        raise AgentSpecError(problems)
    specs = [
        _to_spec(agent, f"{file}:{lines.line(('agents', index))}")
        for index, agent in enumerate(declared.agents)
    ]
    return specs, lines


def _to_spec(agent: AgentDecl, source: str) -> AgentSpec:
    delegations = tuple(
        f"{delegation_tool.tool_name(target)}@{DELEGATION_MAJOR}" for target in agent.delegate_to
    )
    return AgentSpec(
        name=agent.name,
        version=agent.version,
        description=agent.description,
        instructions=agent.instructions,
        tools=(*agent.tools, *delegations),
        model=ModelChoice(**agent.model.model_dump()),
        limits=SpecLimits(**agent.limits.model_dump()),
        memory=MemoryPolicy(**agent.memory.model_dump()),
        source=source,
    )


def _read(path: Path) -> tuple[list[AgentSpec], _Lines]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentSpecError([Problem(str(path), 1, "(file)", exc.strerror or str(exc))]) from None
    return _parse(text, str(path))


def load(path: Path) -> list[AgentSpec]:
    """The agents a spec file declares."""
    return _read(path)[0]


@dataclass(frozen=True)
class Loaded:
    """The agents of the built-in specs and the given files, merged."""

    agents: dict[str, AgentSpec]
    # What the merge did that its reader should hear: built-ins replaced.
    notes: list[str]


def load_catalog(builtin: Path, files: Iterable[Path]) -> Loaded:
    """The built-in agents, then each file's: a name declared again replaces the built-in
    (and a note says so); the same name in two of the given files is an error. Every
    agent delegated to must be one of the result's."""
    agents = {spec.name: spec for spec in load(builtin)}
    builtin_names = set(agents)
    notes: list[str] = []
    problems: list[Problem] = []
    read: list[tuple[str, list[AgentSpec], _Lines]] = []
    from_files: dict[str, AgentSpec] = {}
    for path in files:
        try:
            specs, lines = _read(path)
        except AgentSpecError as exc:
            problems.extend(exc.problems)
            continue
        read.append((str(path), specs, lines))
        for index, spec in enumerate(specs):
            first = from_files.get(spec.name)
            if first is not None:
                problems.append(
                    Problem(
                        str(path),
                        lines.line(("agents", index, "name")),
                        f"agents[{index}].name",
                        f"agent {spec.name!r} is already declared at {first.source}",
                    )
                )
                continue
            from_files[spec.name] = spec
            if spec.name in builtin_names:
                notes.append(f"{spec.source}: agent {spec.name!r} replaces the built-in one")
            agents[spec.name] = spec
    for file, specs, lines in read:
        for index, spec in enumerate(specs):
            for position, target in enumerate(spec.delegates_to):
                if target not in agents:
                    here: Path_ = ("agents", index, "delegate_to", position)
                    problems.append(
                        Problem(
                            file,
                            lines.line(here),
                            _render(here),
                            f"no agent {target!r} to delegate to (known: "
                            f"{', '.join(sorted(agents))})",
                        )
                    )
    if problems:
        raise AgentSpecError(problems)
    return Loaded(agents, notes)
