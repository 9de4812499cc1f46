"""`notes.write` / `notes.read` against a real Redis, isolated by key prefix."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from agentplex.registry import schemas
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.tools.notes import (
    MAX_NOTES_PER_SESSION,
    NOTES_TTL_SECONDS,
    NotesRead,
    NotesWrite,
)
from agentplex.v1 import tool_pb2


@pytest.fixture
def context_for(redis_client: aioredis.Redis, key_prefix: str):
    def make(session_id: str, agent: str = "assistant") -> ToolContext:
        return ToolContext(
            agent=agent,
            session_id=session_id,
            task_id="task-1",
            redis=redis_client,
            key_prefix=key_prefix,
        )

    return make


async def test_write_then_read_in_the_same_session(context_for) -> None:
    ctx = context_for("s1")
    first = await NotesWrite().run({"text": "the door code is 4711"}, ctx)
    second = await NotesWrite().run({"text": "buy milk"}, ctx)
    assert first == {"saved": True, "note_count": 1}
    assert second == {"saved": True, "note_count": 2}
    result = await NotesRead().run({}, ctx)
    assert result == {"notes": ["the door code is 4711", "buy milk"]}
    for out, tool in ((first, NotesWrite), (result, NotesRead)):
        assert schemas.schema_violation(tool.definition.output_schema_json, out) is None


async def test_notes_are_stored_under_the_prefixed_session_key(
    context_for,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    await NotesWrite().run({"text": "hello"}, context_for("s-key"))
    key = f"{key_prefix}:notes:s-key"
    assert await redis_client.lrange(key, 0, -1) == [b"hello"]
    ttl = await redis_client.ttl(key)
    assert 0 < ttl <= NOTES_TTL_SECONDS


async def test_sessions_are_isolated(context_for) -> None:
    await NotesWrite().run({"text": "alpha secret"}, context_for("alpha"))
    await NotesWrite().run({"text": "beta secret"}, context_for("beta"))
    assert await NotesRead().run({}, context_for("alpha")) == {"notes": ["alpha secret"]}
    assert await NotesRead().run({}, context_for("beta")) == {"notes": ["beta secret"]}
    assert await NotesRead().run({}, context_for("gamma")) == {"notes": []}


async def test_key_prefixes_are_isolated(redis_client: aioredis.Redis, key_prefix: str) -> None:
    def ctx(prefix: str) -> ToolContext:
        return ToolContext(
            agent="a", session_id="same", task_id="", redis=redis_client, key_prefix=prefix
        )

    await NotesWrite().run({"text": "mine"}, ctx(key_prefix))
    assert await NotesRead().run({}, ctx(f"{key_prefix}-other")) == {"notes": []}


@pytest.mark.parametrize(("tool", "arguments"), [(NotesWrite(), {"text": "x"}), (NotesRead(), {})])
async def test_no_session_is_a_tool_failure(
    context_for,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tool,
    arguments: dict[str, object],
) -> None:
    with pytest.raises(ToolFailure) as info:
        await tool.run(arguments, context_for(""))
    assert info.value.code == "NO_SESSION"
    assert await redis_client.keys(f"{key_prefix}:*") == []


async def test_read_limit_returns_the_most_recent_oldest_first(context_for) -> None:
    ctx = context_for("limits")
    for i in range(1, 6):
        await NotesWrite().run({"text": f"n{i}"}, ctx)
    assert await NotesRead().run({"limit": 2}, ctx) == {"notes": ["n4", "n5"]}
    assert await NotesRead().run({"limit": 1}, ctx) == {"notes": ["n5"]}
    assert await NotesRead().run({"limit": 50}, ctx) == {"notes": ["n1", "n2", "n3", "n4", "n5"]}


async def test_read_defaults_to_twenty_notes(
    context_for,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    await redis_client.rpush(f"{key_prefix}:notes:many", *[f"n{i}" for i in range(25)])
    result = await NotesRead().run({}, context_for("many"))
    assert result["notes"] == [f"n{i}" for i in range(5, 25)]


async def test_write_caps_the_session_at_max_notes(
    context_for,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    key = f"{key_prefix}:notes:full"
    await redis_client.rpush(key, *[f"old{i}" for i in range(MAX_NOTES_PER_SESSION)])
    result = await NotesWrite().run({"text": "newest"}, context_for("full"))
    assert result == {"saved": True, "note_count": MAX_NOTES_PER_SESSION}
    assert await redis_client.llen(key) == MAX_NOTES_PER_SESSION
    assert await redis_client.lindex(key, 0) == b"old1"
    assert await redis_client.lindex(key, -1) == b"newest"


async def test_unicode_round_trips(context_for) -> None:
    ctx = context_for("unicode")
    await NotesWrite().run({"text": "café ✓ 東京"}, ctx)
    assert await NotesRead().run({"limit": 1}, ctx) == {"notes": ["café ✓ 東京"]}


def test_contracts() -> None:
    for tool in (NotesWrite, NotesRead):
        schemas.check_definition(tool.definition)
    assert NotesWrite.definition.side_effect == tool_pb2.SIDE_EFFECT_SIDE_EFFECTING
    assert NotesRead.definition.side_effect == tool_pb2.SIDE_EFFECT_READ_ONLY
    write_schema = NotesWrite.definition.input_schema_json
    read_schema = NotesRead.definition.input_schema_json
    assert schemas.schema_violation(write_schema, {"text": "ok"}) is None
    assert schemas.schema_violation(write_schema, {"text": ""}) is not None
    assert schemas.schema_violation(write_schema, {}) is not None
    assert schemas.schema_violation(read_schema, {}) is None
    assert schemas.schema_violation(read_schema, {"limit": 0}) is not None
    assert schemas.schema_violation(read_schema, {"limit": MAX_NOTES_PER_SESSION + 1}) is not None
