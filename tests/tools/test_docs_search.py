"""`docs.search`: BM25 over README.md and docs/**/*.md, by section, of a configured
directory or of the documentation shipped with the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentplex.registry import compat, schemas
from agentplex.tools.app import builtin_tools
from agentplex.tools.base import ToolContext
from agentplex.tools.docs_search import (
    SNIPPET_CHARS,
    DocsSearch,
    load_corpus,
    shipped_corpus,
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


def test_terms_lowercase_drop_stop_words_and_stem() -> None:
    assert terms("How do I use the Redis ledger?") == ["use", "redi", "ledger"]
    assert terms("notes.write and grpc-status.") == ["notes.writ", "grpc-status"]
    assert terms("What is it?") == []
    # One stem for a word's forms: a question finds the section whatever the inflection.
    assert terms("trimmed") == terms("trims") == terms("trimming") == ["trim"]
    assert terms("Tests") == terms("testing") == ["test"]


def test_split_sections_at_headings() -> None:
    sections = split_sections("docs/x.md", DOC_X)
    assert [(s.source, s.title) for s in sections] == [
        ("docs/x.md", "docs/x.md"),  # text before the first heading is titled by the file
        ("docs/x.md", "Idempotency keys"),
        ("docs/x.md", "Redis"),
    ]
    assert sections[1].body.startswith("A side-effecting tool call")
    # The heading counts twice (a field boost), then the body.
    assert sections[2].index_terms() == ["redi", "redi", "use", "redi", "ledger"]


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


# --- ranking ------------------------------------------------------------------------


async def test_the_section_a_question_is_about_ranks_first(
    docs_root: Path, context: ToolContext
) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="how are conversation turns trimmed per session?")
    assert (results[0]["source"], results[0]["title"]) == ("README.md", "Memory service")
    assert results[0]["snippet"].startswith("The memory service stores conversation turns")
    assert all(r["score"] < results[0]["score"] for r in results[1:])


async def test_a_heading_outranks_a_passing_mention(docs_root: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="redis", limit=10)
    assert (results[0]["source"], results[0]["title"]) == ("docs/x.md", "Redis")
    assert len(results) == 4  # every section that mentions it, and only those
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


async def test_rare_terms_weigh_more_than_common_ones(
    docs_root: Path, context: ToolContext
) -> None:
    # "redis" is in four sections, even a heading; "deadlines" in one, once, in passing:
    # BM25's idf makes the rare word decide.
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="redis deadlines")
    assert (results[0]["source"], results[0]["title"]) == ("docs/x.md", "docs/x.md")
    assert results[1]["title"] == "Redis"


async def test_nested_docs_are_searched(docs_root: Path, context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    results = await search(tool, context, query="zeppelin")
    assert [(r["source"], r["title"]) for r in results] == [("docs/nested/deep.md", "Deep page")]


@pytest.mark.parametrize("query", ["xylophone quasar", "what is the", "?!"])
async def test_no_hits_gives_empty_results(
    docs_root: Path, context: ToolContext, query: str
) -> None:
    tool = await DocsSearch.from_directory(docs_root)
    assert await tool.run({"query": query}, context) == {"results": []}


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


# --- the corpus: configured, shipped, empty, absent -----------------------------------


async def test_a_configured_directory_is_the_corpus(docs_root: Path, context: ToolContext) -> None:
    [*_, tool] = await builtin_tools(docs_root)
    assert isinstance(tool, DocsSearch)
    results = await search(tool, context, query="zeppelin")
    assert [(r["source"], r["title"]) for r in results] == [("docs/nested/deep.md", "Deep page")]


async def test_an_empty_corpus_says_so(tmp_path: Path, context: ToolContext) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("# Not markdown\n\ntext\n", "utf-8")
    tool = await DocsSearch.from_directory(tmp_path)
    result = await tool.run({"query": "anything"}, context)
    assert result["results"] == []
    assert result["note"].startswith(f"The documentation corpus {tmp_path} (the docs_dir setting)")
    assert "has no README.md or docs/**/*.md" in result["note"]
    assert schemas.schema_violation(DocsSearch.definition.output_schema_json, result) is None


async def test_an_absent_corpus_says_so(tmp_path: Path, context: ToolContext) -> None:
    missing = tmp_path / "nowhere"
    tool = await DocsSearch.from_directory(missing)
    result = await tool.run({"query": "anything"}, context)
    assert result == {
        "results": [],
        "note": f"The documentation corpus {missing} (the docs_dir setting) does not exist.",
    }


def test_the_package_ships_the_readme_and_docs() -> None:
    corpus = shipped_corpus()
    assert (corpus / "README.md").read_text("utf-8") == (REPO_ROOT / "README.md").read_text("utf-8")
    shipped = {path.name for path in (corpus / "docs").glob("*.md")}
    assert shipped == {path.name for path in (REPO_ROOT / "docs").glob("*.md")}
    assert {"TOOLS.md", "ARCHITECTURE.md"} <= shipped


async def test_the_shipped_docs_are_the_default(context: ToolContext) -> None:
    [*_, tool] = await builtin_tools(None)
    assert isinstance(tool, DocsSearch)
    results = await search(tool, context, query="how do I write a tool backend?")
    assert (results[0]["source"], results[0]["title"]) == (
        "docs/TOOLS.md",
        "Writing a tool backend",
    )
    results = await search(tool, context, query="deprecate a tool version", limit=5)
    assert any(r["source"] == "docs/TOOLS.md" for r in results)


def test_the_default_corpus_works_from_an_unrelated_directory(tmp_path: Path) -> None:
    # A fresh process in a directory with no README or docs/, and no docs_dir setting.
    script = (
        "import asyncio, json\n"
        "from agentplex.runtime.settings import Settings\n"
        "from agentplex.tools.app import builtin_tools\n"
        "async def main():\n"
        "    settings = Settings()\n"
        "    assert settings.docs_dir is None, settings.docs_dir\n"
        "    tool = (await builtin_tools(settings.docs_dir))[-1]\n"
        "    print(json.dumps(await tool.run({'query': 'how do I write a tool backend?'}, None)))\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLEX_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "note" not in result
    assert len(result["results"]) == 3
    for hit in result["results"]:
        assert hit["source"] == "README.md" or hit["source"].startswith("docs/")


async def test_real_repository_docs_are_searchable(context: ToolContext) -> None:
    tool = await DocsSearch.from_directory(REPO_ROOT)
    results = await search(tool, context, query="agentplex", limit=10)
    assert any(r["source"] == "README.md" for r in results)


# --- the contract ----------------------------------------------------------------------


def test_contract() -> None:
    schemas.check_definition(DocsSearch.definition)
    schema = DocsSearch.definition.input_schema_json
    assert schemas.schema_violation(schema, {"query": "x"}) is None
    assert schemas.schema_violation(schema, {"query": "x", "limit": 11}) is not None
    assert schemas.schema_violation(schema, {"query": ""}) is not None


def test_the_new_minor_version_is_compatible_with_1_0() -> None:
    definition = DocsSearch.definition
    assert definition.version == "1.1.0"
    assert (
        compat.input_breaks(json.loads(V1_0_INPUT), json.loads(definition.input_schema_json)) == []
    )
    assert (
        compat.output_breaks(json.loads(V1_0_OUTPUT), json.loads(definition.output_schema_json))
        == []
    )


# docs.search 1.0.0's published schemas, as they were.
V1_0_INPUT = """{"type": "object", "properties": {"query": {"type": "string", "minLength": 1,
"maxLength": 500, "description": "Keywords or a question."}, "limit": {"type": "integer",
"minimum": 1, "maximum": 10, "description": "Most sections to return (default 3)."}},
"required": ["query"], "additionalProperties": false}"""
V1_0_OUTPUT = """{"type": "object", "properties": {"results": {"type": "array", "items":
{"type": "object", "properties": {"source": {"type": "string"}, "title": {"type": "string"},
"snippet": {"type": "string"}, "score": {"type": "number"}}, "required": ["source", "title",
"snippet", "score"]}}}, "required": ["results"]}"""
