"""Contract checks at registration and argument checks at invocation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentplex.contract.tool_definition import define
from agentplex.registry import schemas
from agentplex.runtime.errors import InvalidArgument
from agentplex.tools.calculator import Calculator
from agentplex.tools.docs_search import DocsSearch
from agentplex.tools.notes import NotesRead, NotesWrite
from agentplex.v1 import tool_pb2

INPUT = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
OUTPUT = {"type": "object", "properties": {"celsius": {"type": "number"}}}


def tool(**overrides: Any) -> tool_pb2.ToolDefinition:
    definition = define(
        name="weather.lookup",
        version="1.2.3",
        description="Looks up the current weather for a city.",
        input_schema=INPUT,
        output_schema=OUTPUT,
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )
    for field, value in overrides.items():
        setattr(definition, field, value)
    return definition


def rejection(definition: tool_pb2.ToolDefinition) -> str:
    with pytest.raises(InvalidArgument) as info:
        schemas.check_definition(definition)
    assert info.value.reason == "INVALID_ARGUMENT"
    return info.value.message


def test_valid_definition_passes() -> None:
    schemas.check_definition(tool())


@pytest.mark.parametrize("definition", [Calculator, NotesWrite, NotesRead, DocsSearch])
def test_builtin_definitions_pass(definition: Any) -> None:
    schemas.check_definition(definition.definition)


@pytest.mark.parametrize(
    "name",
    [
        "calc",
        "notes.write",
        "a",
        "a1",
        "web_search",
        "a.b.c",
        "x9_y8.z7",
        "a" * 64,  # exactly the wire limit
        "a" * 31 + "." + "b" * 31,  # 63 characters, 64 on the wire
    ],
)
def test_good_names_pass(name: str) -> None:
    schemas.check_definition(tool(name=name))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Calculator",
        "notes.Write",
        "a__b",
        "trailing_",
        "_leading",
        "a._b",
        "a_.b",
        "1abc",
        "a.1b",
        ".a",
        "a.",
        "a..b",
        "a-b",
        "a b",
        "a/b",
        "ünï",
        "a" * 65,
        "a" * 32 + "." + "b" * 31,  # 64 characters but 65 after "." -> "__"
        ".".join(["ab"] * 22),  # 65 characters, 86 on the wire
    ],
)
def test_bad_names_are_rejected(name: str) -> None:
    assert "tool.name" in rejection(tool(name=name))


@pytest.mark.parametrize(
    "version", ["", "1", "1.0", "v1.0.0", "01.0.0", "1.00.0", "1.0.0-beta", "1.0.0.0", "a.b.c"]
)
def test_non_semver_versions_are_rejected(version: str) -> None:
    assert "version" in rejection(tool(version=version))


@pytest.mark.parametrize("version", ["0.0.0", "0.1.0", "10.20.30"])
def test_semver_versions_pass(version: str) -> None:
    schemas.check_definition(tool(version=version))


def test_semver_orders_numerically() -> None:
    assert schemas.semver("1.10.0") > schemas.semver("1.9.9")
    assert schemas.semver("2.0.0") > schemas.semver("1.99.99")
    assert schemas.semver("1.2.3") == (1, 2, 3)


@pytest.mark.parametrize("description", ["", "   ", "\n\t"])
def test_empty_description_is_rejected(description: str) -> None:
    assert "tool.description" in rejection(tool(description=description))


SCHEMA_FIELDS = ["input_schema_json", "output_schema_json"]


@pytest.mark.parametrize("field", SCHEMA_FIELDS)
@pytest.mark.parametrize("text", ["", "{", "{'type': 'object'}", "not json", '{"type": "object",}'])
def test_schema_that_is_not_json_is_rejected(field: str, text: str) -> None:
    message = rejection(tool(**{field: text}))
    assert f"tool.{field}" in message
    assert "not valid JSON" in message


@pytest.mark.parametrize("field", SCHEMA_FIELDS)
@pytest.mark.parametrize(
    "schema", [[], "object", 1, None, True, {}, {"type": "string"}, {"type": ["object"]}]
)
def test_schema_root_must_be_an_object_schema(field: str, schema: Any) -> None:
    message = rejection(tool(**{field: json.dumps(schema)}))
    assert f"tool.{field}" in message
    assert '"type": "object"' in message


@pytest.mark.parametrize("field", SCHEMA_FIELDS)
def test_invalid_json_schema_is_rejected_with_its_path(field: str) -> None:
    bad = {"type": "object", "properties": {"x": {"type": "nope"}}}
    message = rejection(tool(**{field: json.dumps(bad)}))
    assert f"tool.{field}" in message
    assert "not a valid JSON Schema" in message
    assert "properties/x/type" in message


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "object", "required": "city"},
        {"type": "object", "properties": {"n": {"minimum": "zero"}}},
        {"type": "object", "additionalProperties": 5},
    ],
)
def test_other_invalid_json_schemas_are_rejected(bad: dict[str, Any]) -> None:
    assert "tool.input_schema_json is not a valid JSON Schema" in rejection(
        tool(input_schema_json=json.dumps(bad))
    )


def test_oversized_schema_is_rejected() -> None:
    big = {
        "type": "object",
        "description": "x" * schemas.MAX_SCHEMA_BYTES,
    }
    message = rejection(tool(input_schema_json=json.dumps(big)))
    assert "tool.input_schema_json exceeds" in message


def test_parse_arguments_accepts_objects_and_empty_text() -> None:
    assert schemas.parse_arguments('{"expression": "1+1"}') == {"expression": "1+1"}
    assert schemas.parse_arguments("") == {}
    assert schemas.parse_arguments("{}") == {}
    assert schemas.parse_arguments(' {"nested": {"a": [1, 2]}} ') == {"nested": {"a": [1, 2]}}


@pytest.mark.parametrize("text", ["{", "{expression: 1}", "nope", "{'a': 1}", '{"a": 1} x'])
def test_parse_arguments_rejects_malformed_json(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        schemas.parse_arguments(text)
    assert "arguments_json is not valid JSON" in info.value.message


@pytest.mark.parametrize("text", ["[]", "[1]", '"text"', "1", "null", "true"])
def test_parse_arguments_rejects_non_objects(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        schemas.parse_arguments(text)
    assert "must be a JSON object" in info.value.message


def test_parse_arguments_rejects_oversized_input() -> None:
    text = json.dumps({"text": "x" * schemas.MAX_ARGUMENTS_BYTES})
    with pytest.raises(InvalidArgument) as info:
        schemas.parse_arguments(text)
    assert "exceeds" in info.value.message


CALCULATOR_INPUT = Calculator.definition.input_schema_json


def test_schema_violation_none_when_valid() -> None:
    assert schemas.schema_violation(CALCULATOR_INPUT, {"expression": "17*23"}) is None


@pytest.mark.parametrize(
    ("instance", "path", "words"),
    [
        ({"expression": 5}, "$.expression", "is not of type 'string'"),
        ({"expression": ""}, "$.expression", "non-empty"),
        ({"expression": "1" * 501}, "$.expression", "too long"),
        ({}, "$", "'expression' is a required property"),
        ({"expression": "1", "extra": 2}, "$", "'extra' was unexpected"),
    ],
)
def test_schema_violation_names_the_failing_path(
    instance: dict[str, Any], path: str, words: str
) -> None:
    violation = schemas.schema_violation(CALCULATOR_INPUT, instance)
    assert violation is not None
    assert violation.startswith(f"{path}: ")
    assert words in violation


def test_schema_violation_paths_into_nested_values() -> None:
    schema = json.dumps(
        {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"type": "object", "required": ["id"]}}
            },
        }
    )
    violation = schemas.schema_violation(schema, {"items": [{"id": 1}, {"name": "x"}]})
    assert violation is not None
    assert violation.startswith("$.items[1]: ")


def test_schema_violation_uses_the_schema_text_given() -> None:
    old = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
    new = json.dumps({"type": "object", "properties": {"n": {"type": "string"}}})
    assert schemas.schema_violation(old, {"n": 1}) is None
    assert schemas.schema_violation(new, {"n": 1}) is not None
    assert schemas.schema_violation(old, {"n": 1}) is None
