"""The web console's files, served by Envoy straight from the route table.

The page is static: it calls the agents through the same gateway with
gRPC-Web, decoding messages with protobuf.js against a schema derived from
the generated contracts (so the console cannot drift from the protos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from agentplex.gateway import descriptors

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "protobuf.min.js": "text/javascript; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    name: str
    body: str
    content_type: str


@cache
def assets() -> tuple[Asset, ...]:
    folder = resources.files("agentplex.gateway") / "console"
    found = [
        Asset(name, (folder / name).read_text(encoding="utf-8"), content_type)
        for name, content_type in _STATIC.items()
    ]
    schema = json.dumps(descriptors.protobufjs_json(), separators=(",", ":"))
    found.append(Asset("agentplex.json", schema, "application/json"))
    return tuple(found)
