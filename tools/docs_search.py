"""`docs.search`: BM25 search over a documentation corpus, section by section.

The corpus is README.md and docs/**/*.md under one directory: the one the
`docs_dir` setting names, or else the documentation shipped inside this
package (`corpus/`, the project's own README and docs/), so the researcher
answers wherever the mesh runs. Documents are split into sections at Markdown
headings; each result names its file and section.

Ranking is Okapi BM25 (`bm25s`, Lucene's variant) over words lowercased,
stripped of stop words and stemmed (Snowball English, so "trimmed" finds
"trim"); a section's heading counts twice, as a field boost. The index is
built once, off the event loop, when the backend starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import bm25s  # type: ignore[import-untyped]
import Stemmer  # type: ignore[import-not-found]

from agentplex.contract.tool_definition import define
from agentplex.tools.base import ToolContext
from agentplex.v1 import tool_pb2

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*[a-z0-9]|[a-z0-9]")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it me of on or the this to "
    "what when where which who why with you your about tell explain please".split()
)
SNIPPET_CHARS = 320
TITLE_WEIGHT = 2
_STEMMER = Stemmer.Stemmer("english")


def shipped_corpus() -> Path:
    """The documentation this package ships (package data): its README.md and docs/."""
    return Path(str(resources.files(__package__ or "agentplex.tools") / "corpus"))


def terms(text: str) -> list[str]:
    """Index terms in order: lowercased words less stop words, stemmed."""
    words = [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]
    stems: list[str] = _STEMMER.stemWords(words)
    return stems


@dataclass(frozen=True)
class Section:
    source: str  # the file, relative to the corpus root (README.md, docs/TOOLS.md)
    title: str  # its heading (the file's name for text before the first heading)
    body: str

    def index_terms(self) -> list[str]:
        return terms(self.title) * TITLE_WEIGHT + terms(self.body)


def split_sections(source: str, text: str) -> list[Section]:
    sections: list[Section] = []
    title = source
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(source, title, body))

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
            source = path.relative_to(root).as_posix()
            sections.extend(split_sections(source, path.read_text("utf-8")))
    return sections


class DocsSearch:
    definition = define(
        name="docs.search",
        # 1.1: BM25 ranking over a configured corpus; `note` when the corpus is empty.
        version="1.1.0",
        description="Searches the agentplex documentation (README and docs) and returns the "
        "best-matching sections, ranked by BM25.",
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
                },
                "note": {
                    "type": "string",
                    "description": "Why there can be no results: the corpus is missing or empty.",
                },
            },
            "required": ["results"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )

    def __init__(self, sections: list[Section], *, empty_note: str = "") -> None:
        self._sections = sections
        self._index: Any = None
        self._empty_note = empty_note or "The documentation corpus is empty."
        if sections:
            self._index = bm25s.BM25()
            self._index.index([s.index_terms() for s in sections], show_progress=False)

    @classmethod
    def build(cls, root: Path, *, default: bool = False) -> DocsSearch:
        """The tool over the corpus under `root` (blocking: run in a thread)."""
        what = "the shipped documentation" if default else "the docs_dir setting"
        if not root.is_dir():
            note = f"The documentation corpus {root} ({what}) does not exist."
            log.warning("docs.search: %s", note)
            return cls([], empty_note=note)
        sections = load_corpus(root)
        if not sections:
            note = (
                f"The documentation corpus {root} ({what}) has no README.md or docs/**/*.md "
                "with any text."
            )
            log.warning("docs.search: %s", note)
            return cls([], empty_note=note)
        files = len({s.source for s in sections})
        log.info("docs.search: %d sections of %d files under %s", len(sections), files, root)
        return cls(sections)

    @classmethod
    async def from_directory(cls, root: Path | None = None) -> DocsSearch:
        """Over README.md and docs/ under `root`; None: the documentation shipped with agentplex."""
        if root is None:
            return await asyncio.to_thread(cls.build, shipped_corpus(), default=True)
        return await asyncio.to_thread(cls.build, root)

    def search(self, query: str, limit: int = 3) -> list[tuple[float, Section]]:
        """The best `limit` sections with a positive score, best first (ties: by place)."""
        wanted = terms(query)
        if self._index is None or not wanted:
            return []
        scores = self._index.get_scores(wanted)
        ranked = sorted(
            (i for i in range(len(self._sections)) if scores[i] > 0),
            key=lambda i: (-float(scores[i]), i),
        )
        return [(float(scores[i]), self._sections[i]) for i in ranked[:limit]]

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        hits = self.search(arguments["query"], int(arguments.get("limit", 3)))
        result: dict[str, Any] = {
            "results": [
                {
                    "source": section.source,
                    "title": section.title,
                    "snippet": _snippet(section.body),
                    "score": round(score, 4),
                }
                for score, section in hits
            ]
        }
        if not self._sections:
            result["note"] = self._empty_note
        return result


def _snippet(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1].rstrip() + "…"
