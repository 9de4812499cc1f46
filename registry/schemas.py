"""JSON Schema handling: contract checks at registration, argument checks at invocation."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from agentplex.contract import argument_policy
from agentplex.runtime.errors import InvalidArgument
from agentplex.v1 import tool_pb2

# Dotted lowercase words joined by single underscores: no "__" and no trailing "_",
# so the OpenAI provider's "." -> "__" wire mapping is unambiguous and reversible.
_WORD = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
TOOL_NAME_PATTERN = re.compile(rf"^{_WORD}(?:\.{_WORD})*$")
# Function names on OpenAI-compatible APIs are limited to 64 characters after mapping.
MAX_WIRE_NAME_LENGTH = 64
# ASCII digits only: \d would accept other scripts' digits as versions.
SEMVER_PATTERN = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
VERSION_SPEC_PATTERN = re.compile(r"|(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*))?")
MAX_SCHEMA_BYTES = 64 * 1024
MAX_ARGUMENTS_BYTES = 256 * 1024


def semver(version: str) -> tuple[int, int, int]:
    match = SEMVER_PATTERN.fullmatch(version)
    if not match:
        raise InvalidArgument(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH)")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def check_version_spec(spec: str) -> None:
    """'' (newest), a major ('2') or an exact version ('2.1.0')."""
    if not VERSION_SPEC_PATTERN.fullmatch(spec):
        raise InvalidArgument(
            f"version {spec!r} must be empty, a major like '2', or exact like '2.1.0'"
        )


def check_definition(tool: tool_pb2.ToolDefinition) -> None:
    """Reject a contract that could never be used safely."""
    wire_length = len(tool.name) + tool.name.count(".")
    if not TOOL_NAME_PATTERN.fullmatch(tool.name) or wire_length > MAX_WIRE_NAME_LENGTH:
        raise InvalidArgument(
            f"tool.name {tool.name!r} must be lowercase dotted words, e.g. 'notes.write'"
        )
    semver(tool.version)
    if not tool.description.strip():
        raise InvalidArgument("tool.description must say what the tool does")
    for field in ("input_schema_json", "output_schema_json"):
        _check_schema(field, getattr(tool, field))
    problem = argument_policy.definition_problem(tool, json.loads(tool.input_schema_json))
    if problem:
        raise InvalidArgument(problem)


def _check_schema(field: str, text: str) -> None:
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"tool.{field} exceeds {MAX_SCHEMA_BYTES} bytes")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"tool.{field} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidArgument(
            f'tool.{field} must be a JSON Schema with "type": "object" at the root'
        )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidArgument(
            f"tool.{field} is not a valid JSON Schema at {path}: {exc.message}"
        ) from exc


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    # Keyed by the schema text itself, so a newly registered version is never
    # validated with a stale schema.
    return Draft202012Validator(json.loads(schema_json))


def parse_arguments(arguments_json: str) -> dict[str, Any]:
    if len(arguments_json.encode("utf-8")) > MAX_ARGUMENTS_BYTES:
        raise InvalidArgument(f"arguments_json exceeds {MAX_ARGUMENTS_BYTES} bytes")
    try:
        arguments = json.loads(arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"arguments_json is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidArgument("arguments_json is nested too deeply") from None
    if not isinstance(arguments, dict):
        raise InvalidArgument("arguments_json must be a JSON object")
    return arguments


def schema_violation(schema_json: str, instance: Any) -> str | None:
    """A readable description of the most relevant violation, or None if valid."""
    error = best_match(_validator(schema_json).iter_errors(instance))
    if error is None:
        return None
    return f"{error.json_path}: {error.message}"
