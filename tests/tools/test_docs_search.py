"""`docs.search`: keyword search over README.md and docs/**/*.md."""

from __future__ import annotations

from pathlib import Path

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
from tests_conftest_root import REPO_ROOT  # replaced below
