"""The compatibility checker, table-driven: each schema change is breaking or not."""

from __future__ import annotations

from typing import Any

import pytest

from agentplex.registry.compat import input_breaks, output_breaks

BASE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 100},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"type": "string", "enum": ["metric", "imperial"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
    },
    "required": ["city"],
}


def changed(path: list[str], key: str, value: object) -> dict[str, Any]:
    import copy

    schema = copy.deepcopy(BASE)
    node: Any = schema
    for part in path:
        node = node[part]
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return schema


DELETE = object()

INPUT_CASES = [
    # (description, new schema, breaking?, words expected in the report)
    ("identical", BASE, False, ""),
    ("optional property added", changed(["properties"], "lang", {"type": "string"}), False, ""),
    (
        "property removed",
        changed(["properties"], "units", DELETE),
        True,
        "$.units: property removed",
    ),
    (
        "new required property",
        changed([], "required", ["city", "days"]),
        True,
        "$.days: property became required",
    ),
    ("required property made optional", changed([], "required", []), False, ""),
    (
        "type narrowed number→integer",
        changed(["properties", "where", "properties"], "lat", {"type": "integer"}),
        True,
        "$.where.lat: type narrowed",
    ),
    (
        "type widened integer→number",
        changed(["properties"], "days", {"type": "number", "minimum": 1, "maximum": 14}),
        False,
        "",
    ),
    (
        "type widened to a union",
        changed(["properties", "city"], "type", ["string", "null"]),
        False,
        "",
    ),
    (
        "type changed string→integer",
        changed(["properties", "city"], "type", "integer"),
        True,
        "type narrowed",
    ),
    (
        "enum value removed",
        changed(["properties", "units"], "enum", ["metric"]),
        True,
        "enum value(s) removed",
    ),
    (
        "enum value added",
        changed(["properties", "units"], "enum", ["metric", "imperial", "kelvin"]),
        False,
        "",
    ),
    (
        "enum added to a free string",
        changed(["properties", "city"], "enum", ["Paris"]),
        True,
        "enum added",
    ),
    (
        "additionalProperties closed",
        changed([], "additionalProperties", False),
        True,
        "additionalProperties closed",
    ),
    ("additionalProperties opened", changed([], "additionalProperties", True), False, ""),
    (
        "minimum raised",
        changed(["properties", "days"], "minimum", 2),
        True,
        "$.days: minimum tightened",
    ),
    ("minimum lowered", changed(["properties", "days"], "minimum", 0), False, ""),
    ("maximum lowered", changed(["properties", "days"], "maximum", 7), True, "maximum tightened"),
    ("maximum raised", changed(["properties", "days"], "maximum", 30), False, ""),
    (
        "minLength raised",
        changed(["properties", "city"], "minLength", 3),
        True,
        "minLength tightened",
    ),
    (
        "maxLength lowered",
        changed(["properties", "city"], "maxLength", 10),
        True,
        "maxLength tightened",
    ),
    ("maxLength dropped", changed(["properties", "city"], "maxLength", DELETE), False, ""),
    ("pattern added", changed(["properties", "city"], "pattern", "^[A-Z]"), True, "pattern added"),
    (
        "maxItems lowered",
        changed(["properties", "tags"], "maxItems", 2),
        True,
        "$.tags: maxItems tightened",
    ),
    (
        "array item type narrowed",
        changed(["properties", "tags"], "items", {"type": "string", "maxLength": 3}),
        True,
        "$.tags[]: maxLength tightened",
    ),
    (
        "nested property removed",
        changed(["properties", "where"], "properties", {}),
        True,
        "$.where.lat: property removed",
    ),
    ("description changed", changed(["properties", "city"], "description", "Where."), False, ""),
]


@pytest.mark.parametrize(
    ("case", "new", "breaking", "words"), INPUT_CASES, ids=[case[0] for case in INPUT_CASES]
)
def test_input_compatibility(case: str, new: dict[str, Any], breaking: bool, words: str) -> None:
    breaks = input_breaks(BASE, new)
    assert bool(breaks) is breaking, breaks
    if words:
        assert any(words in b for b in breaks), breaks


OUT: dict[str, Any] = {
    "type": "object",
    "properties": {"temp": {"type": "number"}, "sky": {"type": "string", "enum": ["sun", "rain"]}},
    "required": ["temp", "sky"],
}

OUTPUT_CASES = [
    ("identical", OUT, False, ""),
    (
        "output property added",
        {**OUT, "properties": {**OUT["properties"], "wind": {"type": "number"}}},
        False,
        "",
    ),
    (
        "output property removed",
        {**OUT, "properties": {"temp": {"type": "number"}}, "required": ["temp"]},
        True,
        "$.sky: output property removed",
    ),
    (
        "output property made optional",
        {**OUT, "required": ["temp"]},
        True,
        "no longer always present",
    ),
    (
        "output type widened",
        {**OUT, "properties": {**OUT["properties"], "temp": {"type": ["number", "string"]}}},
        True,
        "$.temp: type changed",
    ),
    (
        "output type narrowed",
        {**OUT, "properties": {**OUT["properties"], "temp": {"type": "integer"}}},
        False,
        "",
    ),
    (
        "output enum value added",
        {
            **OUT,
            "properties": {
                **OUT["properties"],
                "sky": {"type": "string", "enum": ["sun", "rain", "snow"]},
            },
        },
        True,
        "enum value(s) added",
    ),
    (
        "output enum value removed",
        {**OUT, "properties": {**OUT["properties"], "sky": {"type": "string", "enum": ["sun"]}}},
        False,
        "",
    ),
]


@pytest.mark.parametrize(
    ("case", "new", "breaking", "words"), OUTPUT_CASES, ids=[case[0] for case in OUTPUT_CASES]
)
def test_output_compatibility(case: str, new: dict[str, Any], breaking: bool, words: str) -> None:
    breaks = output_breaks(OUT, new)
    assert bool(breaks) is breaking, breaks
    if words:
        assert any(words in b for b in breaks), breaks
