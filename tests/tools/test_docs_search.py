"""`docs.search`: keyword search over README.md and docs/**/*.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentplex.registry import schemas
from agentplex.tools.base import ToolContext
from agentplex.tools.docs_search import (
    SNIPPET_CHARS,
    DocsSearch,
    load_corpus,
    split_sections,
    terms,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

README = """\
# Example project

Example project is a demo of a search corpus.

## Installation

Install it with pip. You need Python 3.11 and a Redis server binary.

## Memory service

The memory service stores conversation turns per session in Redis.
Turns are trimmed when a session grows too long.

## Troubleshooting

If the registry cannot reach redis, health turns NOT_SERVING.
"""

DOC_X = """\
Intro text before any heading mentions deadlines.

# Idempotency keys

A side-effecting tool call carries an idempotency key so a retry never runs twice.

## Redis

Uses redis for the ledger.
"""


@pytest.fixture
def docs_root(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text(README, "utf-8")
    (tmp_path / "docs" / "nested").mkdir(parents=True)
    (tmp_path / "docs" / "x.md").write_text(DOC_X, "utf-8")
    (tmp_path / "docs" / "nested" / "deep.md").write_text(
        "# Deep page\n\nOnly here: zeppelin.\n", "utf-8"
    )
    (tmp_path / "docs" / "ignored.txt").write_text("# Zeppelin\n\nnot markdown\n", "utf-8")
    (tmp_path / "NOTES.md").write_text("# Zeppelin\n\nnot README, not under docs\n", "utf-8")
    return tmp_path


@pytest.fixture
def context(redis_client: aioredis.Redis, key_prefix: str) -> ToolContext:
    return ToolContext(
        agent="researcher", session_id="s", task_id="t", redis=redis_client, key_prefix=key_prefix
    )


async def search(
    tool: DocsSearch, context: ToolContext, **arguments: object
) -> list[dict[str, Any]]:
    result = await tool.run(arguments, context)
    assert schemas.schema_violation(DocsSearch.definition.output_schema_json, result) is None
    return result["results"]


def test_terms_lowercases_and_drops_stop_words() -> None:
    assert terms("How do I use the Redis ledger?") == {"use", "redis", "ledger"}
    assert terms("notes.write and grpc-status.") == {"notes.write", "grpc-status"}
    assert terms("What is it?") == set()


def test_split_sections_at_headings() -> None:
    sections = split_sections("docs/x.md", DOC_X)
    assert [(s.source, s.title) for s in sections] == [
        ("docs/x.md", "docs/x.md"),  # text before the first heading is titled by the file
        ("docs/x.md", "Idempotency keys"),
        ("docs/x.md", "Redis"),
    ]
    assert sections[1].body.startswith("A side-effecting tool call")
    assert "idempotency" in sections[1].title_terms
    assert "retry" in sections[1].body_terms


def test_sections_without_body_are_dropped() -> None:
    sections = split_sections("README.md", "# Title\n## Sub\n\ntext\n### Empty\n\n")
    assert [s.title for s in sections] == ["Sub"]


def test_comments_in_fenced_code_are_not_headings() -> None:
    text = "## Quick start\n\n```bash\n# start everything\nagentplex up\n```\n"
    sections = split_sections("README.md", text)
    assert [s.title for s in sections] == ["Quick start"]
    assert "agentplex up" in sections[0].body


def test_load_corpus_reads_readme_and_docs_markdown_only(docs_root: Path) -> None:
    sources = {section.source for section in load_corpus(docs_root)}
    assert sources == {"README.md", "docs/x.md", "docs/nested/deep.md"}


def test_load_corpus_of_an_empty_dir_is_empty(tmp_path: Path) -> None:
    assert load_corpus(tmp_path) == []


async def test_relevant_section_ranks_first(docs_root: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="how are conversation turns trimmed per session?")
    assert results[0]["source"] == "README.md"
    assert results[0]["title"] == "Memory service"
    assert results[0]["snippet"].startswith("The memory service stores conversation turns")
    assert results[0]["score"] >= 3


async def test_title_hits_count_double(docs_root: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="redis", limit=10)
    # "Redis" as a title scores 2 + 1 (also in its body); body-only mentions score 1.
    assert (results[0]["source"], results[0]["title"], results[0]["score"]) == (
        "docs/x.md",
        "Redis",
        3.0,
    )
    rest = results[1:]
    assert rest and all(r["score"] == 1.0 for r in rest)
    # Ties are ordered by source, then title.
    assert [(r["source"], r["title"]) for r in rest] == sorted(
        (r["source"], r["title"]) for r in rest
    )


async def test_title_only_match_beats_single_body_match(
    docs_root: Path, context: ToolContext
) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="idempotency")
    assert results[0]["title"] == "Idempotency keys"
    assert results[0]["score"] == 3.0  # title (2) + body (1)


async def test_nested_docs_are_searched(docs_root: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="zeppelin")
    assert [(r["source"], r["title"]) for r in results] == [("docs/nested/deep.md", "Deep page")]


@pytest.mark.parametrize("query", ["xylophone quasar", "what is the", "?!"])
async def test_no_hits_gives_empty_results(
    docs_root: Path, context: ToolContext, query: str
) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    assert await search(tool, context, query=query) == []


async def test_limit_is_respected_and_defaults_to_three(
    docs_root: Path, context: ToolContext
) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    everything = await search(tool, context, query="redis", limit=10)
    assert len(everything) == 4
    assert len(await search(tool, context, query="redis")) == 3
    assert await search(tool, context, query="redis", limit=1) == everything[:1]
    assert await search(tool, context, query="redis", limit=2) == everything[:2]


async def test_long_sections_get_a_truncated_snippet(tmp_path: Path, context: ToolContext) -> None:
    body = " ".join(f"word{i}" for i in range(200))
    (tmp_path / "README.md").write_text(f"# Long\n\n{body}\n\nword7\n", "utf-8")
    tool = await DocsSearch.from_directory(tmp_path)
    [hit] = await search(tool, context, query="word7")
    assert len(hit["snippet"]) <= SNIPPET_CHARS
    assert hit["snippet"].endswith("…")
    assert hit["snippet"].startswith("word0 word1 word2")


async def test_an_empty_corpus_finds_nothing(tmp_path: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(tmp_path)
    assert await search(tool, context, query="anything") == []


async def test_real_repository_readme_is_searchable(context: ToolContext) -> None:
    readme = REPO_ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("the repository has no README.md yet")
    sections = split_sections("README.md", readme.read_text("utf-8"))
    if not sections:
        pytest.skip("README.md has no text sections")
    # A word that really is in the README: prefer the project's name.
    readme_terms = set().union(*(s.title_terms | s.body_terms for s in sections))
    query = "agentplex" if "agentplex" in readme_terms else sorted(readme_terms)[0]
    tool = await DocsSearch.from_directory(REPO_ROOT)
    results = await search(tool, context, query=query, limit=10)
    assert results
    assert any(r["source"] == "README.md" for r in results)


def test_contract() -> None:
    schemas.check_definition(DocsSearch.definition)
    schema = DocsSearch.definition.input_schema_json
    assert schemas.schema_violation(schema, {"query": "x"}) is None
    assert schemas.schema_violation(schema, {"query": "x", "limit": 11}) is not None
    assert schemas.schema_violation(schema, {"query": ""}) is not None
