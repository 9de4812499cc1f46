"""`docs.search`: keyword search over the project's own README and docs/.

Documents are split into sections at Markdown headings and scored by how many
distinct query terms a section contains (title hits count double). The index
is built once, off the event loop, when the registry starts.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentplex.contract.tool_definition import define
from agentplex.tools.base import ToolContext
from agentplex.v1 import tool_pb2

_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*[a-z0-9]|[a-z0-9]")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it me of on or the this to "
    "what when where which who why with you your about tell explain please".split()
)
SNIPPET_CHARS = 320


def terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


@dataclass(frozen=True)
class Section:
    source: str
    title: str
    body: str
    title_terms: frozenset[str]
    body_terms: frozenset[str]


def split_sections(source: str, text: str) -> list[Section]:
    sections: list[Section] = []
    title = source
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(
                Section(source, title, body, frozenset(terms(title)), frozenset(terms(body)))
            )

    fence = ""
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~") and (not fence or marker == fence):
            # A '#' inside a fenced code block is a shell comment, not a heading.
            fence = "" if fence else marker
        match = None if fence else _HEADING.match(line)
        if match:
            flush()
            title, lines = match.group(1).strip(), []
        else:
            lines.append(line)
    flush()
    return sections


def load_corpus(root: Path) -> list[Section]:
    """Sections of README.md and docs/**/*.md under `root` (blocking: run in a thread)."""
    files = [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]
    sections: list[Section] = []
    for path in files:
        if path.is_file():
            sections.extend(split_sections(str(path.relative_to(root)), path.read_text("utf-8")))
    return sections


class DocsSearch:
    definition = define(
        name="docs.search",
        version="1.0.0",
        description="Searches the agentplex README and docs by keywords; returns sections.",
        input_schema={
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 500,
                    "description": "Keywords or a question.",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 10,
                    "description": "Most sections to return (default 3).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "source": {"type": "string"},
                            "title": {"type": "string"},
                            "snippet": {"type": "string"},
                            "score": {"type": "number"},
                        },
                        "required": ["source", "title", "snippet", "score"],
                    },
                }
            },
            "required": ["results"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )

    def __init__(self, sections: list[Section]) -> None:
        self._sections = sections

    @classmethod
    async def from_directory(cls, root: Path) -> DocsSearch:
        return cls(await asyncio.to_thread(load_corpus, root))

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        wanted = terms(arguments["query"])
        limit = int(arguments.get("limit", 3))
        scored = []
        for section in self._sections:
            score = 2 * len(wanted & section.title_terms) + len(wanted & section.body_terms)
            if score:
                scored.append((score, section))
        scored.sort(key=lambda item: (-item[0], item[1].source, item[1].title))
        return {
            "results": [
                {
                    "source": s.source,
                    "title": s.title,
                    "snippet": _snippet(s.body),
                    "score": float(score),
                }
                for score, s in scored[:limit]
            ]
        }


def _snippet(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1].rstrip() + "…"
