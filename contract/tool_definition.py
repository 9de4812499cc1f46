"""Building a `ToolDefinition` from Python dicts, the one way every publisher does it.

Schemas are declared JSON Schema 2020-12 and serialized with sorted keys, so
the same contract published twice is byte-for-byte the same definition (the
registry compares contracts to decide "already published" from "changed
without a version bump").
"""

from __future__ import annotations

import json
from typing import Any

from agentplex.v1 import tool_pb2

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def define(
    *,
    name: str,
    version: str,
    description: str,
    input_schema: dict[str, Any],
    output_schema: dict[str, Any],
    side_effect: tool_pb2.SideEffect,
) -> tool_pb2.ToolDefinition:
    """A ToolDefinition from Python dicts; schemas are declared 2020-12."""
    dialect = {"$schema": SCHEMA_DIALECT}
    return tool_pb2.ToolDefinition(
        name=name,
        version=version,
        description=description,
        input_schema_json=json.dumps({**dialect, **input_schema}, sort_keys=True),
        output_schema_json=json.dumps({**dialect, **output_schema}, sort_keys=True),
        side_effect=side_effect,
    )
