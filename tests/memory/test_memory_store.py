"""MemoryStore against a real Redis: ordering, token-bounded loads, TTL, trimming,
validation and concurrent writers."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from agentplex.memory.store import (
    MAX_CONTEXT_TOKENS,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES_PER_APPEND,
    MemoryStore,
    validate_scope,
)
from agentplex.runtime.errors import InvalidArgument
from agentplex.runtime.tokens import estimate_message_tokens
from agentplex.v1 import memory_pb2

TTL_SECONDS = 3600
DEFAULT_CONTEXT_TOKENS = 50


def scope(agent: str = "assistant", session_id: str = "s-1") -> memory_pb2.SessionScope:
    return memory_pb2.SessionScope(agent=agent, session_id=session_id)


def msg(
    content: str,
    *,
    role: memory_pb2.Role = memory_pb2.ROLE_USER,
    tokens: int = 0,
    task_id: str = "",
    tool_call_id: str = "",
) -> memory_pb2.MemoryMessage:
    return memory_pb2.MemoryMessage(
        role=role, content=content, token_count=tokens, task_id=task_id, tool_call_id=tool_call_id
    )


def key_of(key_prefix: str, s: memory_pb2.SessionScope) -> str:
    return f"{key_prefix}:memory:{s.agent}:{s.session_id}"


@pytest.fixture
def make_store(redis_client: aioredis.Redis, key_prefix: str):
    def make(**overrides: int) -> MemoryStore:
        options = {
            "ttl_seconds": TTL_SECONDS,
            "max_messages": 1000,
            "default_context_tokens": DEFAULT_CONTEXT_TOKENS,
            **overrides,
        }
        return MemoryStore(redis_client, key_prefix=key_prefix, **options)

    return make


@pytest.fixture
def store(make_store) -> MemoryStore:
    return make_store()


# --- append / load round trip -------------------------------------------------------------


async def test_append_then_load_returns_messages_oldest_first(store: MemoryStore) -> None:
    before = time.time()
    count = await store.append(
        scope(),
        [
            msg("be brief", role=memory_pb2.ROLE_SYSTEM),
            msg("hello"),
            msg("hi there", role=memory_pb2.ROLE_ASSISTANT, task_id="t-1"),
            msg('{"ok": true}', role=memory_pb2.ROLE_TOOL, tool_call_id="call-7"),
        ],
    )
    assert count == 4

    packet = await store.load(scope(), 1000)

    assert [m.content for m in packet.messages] == ["be brief", "hello", "hi there", '{"ok": true}']
    assert [m.role for m in packet.messages] == [
        memory_pb2.ROLE_SYSTEM,
        memory_pb2.ROLE_USER,
        memory_pb2.ROLE_ASSISTANT,
        memory_pb2.ROLE_TOOL,
    ]
    assert packet.messages[2].task_id == "t-1"
    assert packet.messages[3].tool_call_id == "call-7"
    assert packet.omitted_count == 0
    for m in packet.messages:
        assert m.HasField("created_at")
        assert before - 1 <= m.created_at.ToDatetime().timestamp() <= time.time() + 1
        assert m.token_count == estimate_message_tokens(m.content)
    assert packet.token_count == sum(m.token_count for m in packet.messages)


async def test_append_keeps_a_provider_token_count(store: MemoryStore) -> None:
    await store.append(scope(), [msg("short", tokens=123), msg("estimated")])
    packet = await store.load(scope(), 1000)
    assert [m.token_count for m in packet.messages] == [123, estimate_message_tokens("estimated")]


async def test_append_does_not_mutate_caller_messages(store: MemoryStore) -> None:
    original = msg("hello")
    await store.append(scope(), [original])
    assert not original.HasField("created_at")
    assert original.token_count == 0


async def test_append_returns_session_length_across_calls(store: MemoryStore) -> None:
    assert await store.append(scope(), [msg("a")]) == 1
    assert await store.append(scope(), [msg("b"), msg("c")]) == 3
    assert await store.append(scope(), [msg("d")]) == 4


async def test_load_of_unknown_session_is_empty(store: MemoryStore) -> None:
    packet = await store.load(scope(session_id="never-written"), 100)
    assert packet.messages == []
    assert packet.token_count == 0
    assert packet.omitted_count == 0


async def test_sessions_and_agents_are_isolated(store: MemoryStore) -> None:
    await store.append(scope("assistant", "one"), [msg("assistant-one")])
    await store.append(scope("assistant", "two"), [msg("assistant-two")])
    await store.append(scope("researcher", "one"), [msg("researcher-one")])

    for s, expected in [
        (scope("assistant", "one"), "assistant-one"),
        (scope("assistant", "two"), "assistant-two"),
        (scope("researcher", "one"), "researcher-one"),
    ]:
        packet = await store.load(s, 100)
        assert [m.content for m in packet.messages] == [expected]


async def test_key_prefix_isolates_stores(
    redis_client: aioredis.Redis, key_prefix: str, make_store
) -> None:
    mine = make_store()
    other = MemoryStore(
        redis_client,
        key_prefix=f"{key_prefix}-other",
        ttl_seconds=TTL_SECONDS,
        max_messages=1000,
        default_context_tokens=DEFAULT_CONTEXT_TOKENS,
    )
    try:
        await mine.append(scope(), [msg("mine")])
        assert (await other.load(scope(), 100)).messages == []
        assert await redis_client.exists(key_of(key_prefix, scope())) == 1
    finally:
        await redis_client.delete(key_of(f"{key_prefix}-other", scope()))


# --- bounded loads --------------------------------------------------------------------------


async def test_bounded_load_keeps_most_recent_messages_that_fit(store: MemoryStore) -> None:
    await store.append(scope(), [msg(f"m{i}", tokens=10) for i in range(10)])

    packet = await store.load(scope(), 35)

    assert [m.content for m in packet.messages] == ["m7", "m8", "m9"]
    assert packet.token_count == 30
    assert packet.omitted_count == 7


async def test_bounded_load_exact_fit_includes_boundary_message(store: MemoryStore) -> None:
    await store.append(scope(), [msg(f"m{i}", tokens=10) for i in range(5)])

    packet = await store.load(scope(), 30)

    assert [m.content for m in packet.messages] == ["m2", "m3", "m4"]
    assert packet.token_count == 30
    assert packet.omitted_count == 2


async def test_bounded_load_stops_at_first_message_that_does_not_fit(store: MemoryStore) -> None:
    # Newest first: 5 fits, 100 does not; the older 1 must not be picked around the gap,
    # the packet is always a contiguous, most recent suffix.
    await store.append(
        scope(), [msg("old", tokens=1), msg("huge", tokens=100), msg("new", tokens=5)]
    )

    packet = await store.load(scope(), 10)

    assert [m.content for m in packet.messages] == ["new"]
    assert packet.token_count == 5
    assert packet.omitted_count == 2


async def test_bounded_load_when_newest_message_does_not_fit(store: MemoryStore) -> None:
    await store.append(scope(), [msg("a", tokens=5), msg("b", tokens=50)])

    packet = await store.load(scope(), 10)

    assert packet.messages == []
    assert packet.token_count == 0
    assert packet.omitted_count == 2


async def test_load_with_small_limit_and_one_token_messages(store: MemoryStore) -> None:
    await store.append(scope(), [msg(f"m{i}", tokens=1) for i in range(20)])

    packet = await store.load(scope(), 3)

    assert [m.content for m in packet.messages] == ["m17", "m18", "m19"]
    assert packet.omitted_count == 17


async def test_load_uses_default_limit_when_none(store: MemoryStore) -> None:
    # DEFAULT_CONTEXT_TOKENS is 50: five messages of 10 tokens fit, the sixth does not.
    await store.append(scope(), [msg(f"m{i}", tokens=10) for i in range(8)])

    packet = await store.load(scope(), None)
    implicit = await store.load(scope())

    assert [m.content for m in packet.messages] == ["m3", "m4", "m5", "m6", "m7"]
    assert packet.token_count == 50
    assert packet.omitted_count == 3
    assert implicit == packet


@pytest.mark.parametrize("max_tokens", [1, MAX_CONTEXT_TOKENS])
async def test_load_accepts_limit_bounds(store: MemoryStore, max_tokens: int) -> None:
    await store.append(scope(), [msg("x", tokens=1)])
    packet = await store.load(scope(), max_tokens)
    assert [m.content for m in packet.messages] == ["x"]


@pytest.mark.parametrize("max_tokens", [0, -1, MAX_CONTEXT_TOKENS + 1])
async def test_load_rejects_limit_out_of_range(store: MemoryStore, max_tokens: int) -> None:
    with pytest.raises(InvalidArgument, match="max_tokens must be between 1 and 1000000"):
        await store.load(scope(), max_tokens)


# --- TTL and trimming -----------------------------------------------------------------------


async def test_append_sets_ttl_on_the_key(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await store.append(scope(), [msg("hello")])
    ttl = await redis_client.ttl(key_of(key_prefix, scope()))
    assert 0 < ttl <= TTL_SECONDS


async def test_append_renews_ttl(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    key = key_of(key_prefix, scope())
    await store.append(scope(), [msg("hello")])
    await redis_client.expire(key, 100)
    assert await redis_client.ttl(key) <= 100

    await store.append(scope(), [msg("again")])

    assert 100 < await redis_client.ttl(key) <= TTL_SECONDS


async def test_append_trims_to_max_messages(
    make_store, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    store = make_store(max_messages=5)
    assert await store.append(scope(), [msg(f"m{i}", tokens=1) for i in range(3)]) == 3
    assert await store.append(scope(), [msg(f"m{i}", tokens=1) for i in range(3, 8)]) == 5

    assert await redis_client.llen(key_of(key_prefix, scope())) == 5
    packet = await store.load(scope(), 1000)
    assert [m.content for m in packet.messages] == ["m3", "m4", "m5", "m6", "m7"]
    assert packet.omitted_count == 0


async def test_load_window_never_exceeds_max_messages(make_store) -> None:
    store = make_store(max_messages=4)
    await store.append(scope(), [msg(f"m{i}", tokens=1) for i in range(10)])

    packet = await store.load(scope(), 1000)

    assert [m.content for m in packet.messages] == ["m6", "m7", "m8", "m9"]
    assert packet.omitted_count == 0


# --- clear ----------------------------------------------------------------------------------


async def test_clear_reports_whether_the_session_existed(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await store.append(scope(), [msg("hello")])
    await store.append(scope(session_id="other"), [msg("keep me")])

    assert await store.clear(scope()) is True
    assert await store.clear(scope()) is False

    assert await redis_client.exists(key_of(key_prefix, scope())) == 0
    assert (await store.load(scope(), 100)).messages == []
    assert [m.content for m in (await store.load(scope(session_id="other"), 100)).messages] == [
        "keep me"
    ]


async def test_clear_validates_scope(store: MemoryStore) -> None:
    with pytest.raises(InvalidArgument):
        await store.clear(scope(agent="Bad Agent"))


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent",
    ["", "Assistant", "1agent", "-agent", "agent name", "agent:x", "a" * 64, "ägent"],
)
async def test_bad_agent_name_is_rejected(store: MemoryStore, agent: str) -> None:
    with pytest.raises(InvalidArgument, match=r"scope\.agent"):
        await store.append(scope(agent=agent), [msg("x")])
    with pytest.raises(InvalidArgument, match=r"scope\.agent"):
        await store.load(scope(agent=agent), 10)


@pytest.mark.parametrize("agent", ["a", "assistant", "research_bot-2", "a" * 63])
async def test_good_agent_names_are_accepted(store: MemoryStore, agent: str) -> None:
    assert await store.append(scope(agent=agent), [msg("x")]) == 1


@pytest.mark.parametrize(
    "session_id", ["", "has space", "slash/inside", "x" * 129, "semi;colon", "ünicode"]
)
async def test_bad_session_id_is_rejected(store: MemoryStore, session_id: str) -> None:
    with pytest.raises(InvalidArgument, match=r"scope\.session_id"):
        await store.append(scope(session_id=session_id), [msg("x")])
    with pytest.raises(InvalidArgument, match=r"scope\.session_id"):
        await store.load(scope(session_id=session_id), 10)


@pytest.mark.parametrize("session_id", ["s", "A.b_c:d-9", "x" * 128])
async def test_good_session_ids_are_accepted(store: MemoryStore, session_id: str) -> None:
    assert await store.append(scope(session_id=session_id), [msg("x")]) == 1


@pytest.mark.parametrize(
    "bad_scope",
    [
        memory_pb2.SessionScope(agent="assistant\n", session_id="s-1"),
        memory_pb2.SessionScope(agent="assistant", session_id="s-1\n"),
    ],
    ids=["agent", "session_id"],
)
def test_trailing_newline_is_rejected(bad_scope: memory_pb2.SessionScope) -> None:
    with pytest.raises(InvalidArgument):
        validate_scope(bad_scope)


async def assert_nothing_written(
    redis_client: aioredis.Redis, key_prefix: str, s: memory_pb2.SessionScope
) -> None:
    assert await redis_client.llen(key_of(key_prefix, s)) == 0
    assert await redis_client.keys(f"{key_prefix}:*") == []


async def test_empty_append_is_rejected(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    with pytest.raises(InvalidArgument, match="at least one message"):
        await store.append(scope(), [])
    await assert_nothing_written(redis_client, key_prefix, scope())


async def test_more_than_100_messages_is_rejected(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    with pytest.raises(InvalidArgument, match="at most 100 messages per append, got 101"):
        await store.append(scope(), [msg("x")] * (MAX_MESSAGES_PER_APPEND + 1))
    await assert_nothing_written(redis_client, key_prefix, scope())


async def test_exactly_100_messages_is_accepted(store: MemoryStore) -> None:
    assert await store.append(scope(), [msg("x")] * MAX_MESSAGES_PER_APPEND) == 100


async def test_unspecified_role_is_rejected_and_nothing_written(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    batch = [msg("ok"), msg("ok"), msg("no role", role=memory_pb2.ROLE_UNSPECIFIED)]
    with pytest.raises(InvalidArgument, match=r"messages\[2\]\.role must be set"):
        await store.append(scope(), batch)
    await assert_nothing_written(redis_client, key_prefix, scope())


async def test_oversize_content_is_rejected_and_nothing_written(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    batch = [msg("fine"), msg("x" * (MAX_MESSAGE_BYTES + 1))]
    with pytest.raises(InvalidArgument, match=r"messages\[1\]\.content exceeds 262144 bytes"):
        await store.append(scope(), batch)
    await assert_nothing_written(redis_client, key_prefix, scope())


async def test_oversize_is_measured_in_utf8_bytes(store: MemoryStore) -> None:
    # 2-byte characters: half as many characters already exceed the byte limit.
    with pytest.raises(InvalidArgument, match="content exceeds"):
        await store.append(scope(), [msg("é" * (MAX_MESSAGE_BYTES // 2 + 1))])


async def test_content_at_the_byte_limit_is_accepted(store: MemoryStore) -> None:
    assert await store.append(scope(), [msg("x" * MAX_MESSAGE_BYTES)]) == 1
    packet = await store.load(scope(), MAX_CONTEXT_TOKENS)
    assert len(packet.messages[0].content) == MAX_MESSAGE_BYTES


async def test_bad_scope_on_append_writes_nothing(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    with pytest.raises(InvalidArgument):
        await store.append(scope(agent="NOPE"), [msg("x")])
    assert await redis_client.keys(f"{key_prefix}:*") == []


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_appends_lose_nothing_and_keep_batches_contiguous(
    store: MemoryStore,
) -> None:
    writers, per_batch = 20, 5

    async def write(writer: int) -> int:
        batch = [msg(f"w{writer}-{i}", tokens=1) for i in range(per_batch)]
        return await store.append(scope(), batch)

    counts = await asyncio.gather(*(write(w) for w in range(writers)))

    # Every append saw the list grow by exactly one batch.
    assert sorted(counts) == [per_batch * (n + 1) for n in range(writers)]
    packet = await store.load(scope(), 1000)
    contents = [m.content for m in packet.messages]
    assert len(contents) == writers * per_batch
    assert packet.omitted_count == 0
    seen_writers = []
    for start in range(0, len(contents), per_batch):
        chunk = contents[start : start + per_batch]
        writer = chunk[0].split("-")[0]
        assert chunk == [f"{writer}-{i}" for i in range(per_batch)], chunk
        seen_writers.append(writer)
    assert sorted(seen_writers) == sorted(f"w{w}" for w in range(writers))


async def test_concurrent_appends_through_separate_connections(
    redis_url: str, key_prefix: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(4)]
    try:
        stores = [
            MemoryStore(
                c,
                key_prefix=key_prefix,
                ttl_seconds=TTL_SECONDS,
                max_messages=1000,
                default_context_tokens=DEFAULT_CONTEXT_TOKENS,
            )
            for c in clients
        ]
        await asyncio.gather(
            *(
                stores[w % len(stores)].append(
                    scope(), [msg(f"w{w}-{i}", tokens=1) for i in range(5)]
                )
                for w in range(12)
            )
        )
        packet = await stores[0].load(scope(), 1000)
        contents = [m.content for m in packet.messages]
        assert len(contents) == 60
        for start in range(0, 60, 5):
            writer = contents[start].split("-")[0]
            assert contents[start : start + 5] == [f"{writer}-{i}" for i in range(5)]
    finally:
        for c in clients:
            await c.aclose()


async def test_a_tasks_turn_is_stored_once_however_often_it_is_saved(
    redis_client, key_prefix
) -> None:
    from agentplex.memory.store import MemoryStore
    from agentplex.v1 import memory_pb2

    store = MemoryStore(
        redis_client,
        key_prefix=key_prefix,
        ttl_seconds=60,
        max_messages=100,
        default_context_tokens=1000,
    )
    scope = memory_pb2.SessionScope(agent="assistant", session_id="s-dup")
    turn = [
        memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content="q", task_id="t-1"),
        memory_pb2.MemoryMessage(role=memory_pb2.ROLE_ASSISTANT, content="a", task_id="t-1"),
    ]
    assert await store.append(scope, turn) == 2
    assert await store.append(scope, turn) == 2  # the retried save changes nothing
    other = [memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content="q2", task_id="t-2")]
    assert await store.append(scope, other) == 3
    assert [m.content for m in (await store.load(scope)).messages] == ["q", "a", "q2"]


async def test_task_ids_kept_for_de_duplication_are_bounded_like_the_messages(
    make_store, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    store = make_store(max_messages=6)
    s = scope(session_id="s-many-tasks")

    def turn(n: int) -> list[memory_pb2.MemoryMessage]:
        return [
            msg(f"q{n}", task_id=f"t-{n}"),
            msg(f"a{n}", role=memory_pb2.ROLE_ASSISTANT, task_id=f"t-{n}"),
        ]

    for n in range(50):
        await store.append(s, turn(n))
    # Every other key of the session (its list, its meta hash) is bounded by the
    # cap; the ids seen are too, instead of growing by one per task until the TTL.
    ids = [k for k in await redis_client.keys(f"{key_of(key_prefix, s)}:*") if b"meta" not in k]
    assert len(ids) == 1
    kind = await redis_client.type(ids[0])
    kept = await (redis_client.zcard if kind == b"zset" else redis_client.scard)(ids[0])
    assert kept <= 6
    # Every batch still (partly) stored is still de-duplicated: a retried save of
    # any of them changes nothing.
    for n in (47, 48, 49):
        assert await store.append(s, turn(n)) == 6
    assert [m.content for m in (await store.load(s, MAX_CONTEXT_TOKENS)).messages] == [
        "q47",
        "a47",
        "q48",
        "a48",
        "q49",
        "a49",
    ]
