"""`MemoryStore`: ordered per-session history in a Redis list.

One list per (agent, session) holds serialized `MemoryMessage`s, oldest
first. Appends are one Lua script (push, trim, renew TTL), so concurrent
writers never interleave half-batches and a session never outlives its TTL; a
batch whose messages all carry the same task id is stored at most once.
Loads read the newest messages in one transaction and keep the most recent
that fit the token limit, after the session's summary.

Positions make summaries safe under concurrency. A hash beside the list holds
`base`, the position of the list's first element (how many messages were ever
removed from its head), and the current summary with the position it covers
up to. Every message keeps its position for good: appends only add at the
tail, and a summary only removes from the head up to the position its writer
read, so a message appended while a summary was being written is never lost.
Two summarizers racing are settled by compare-and-set on the covered
position: one wins, the other gets ABORTED and nothing of its write lands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from agentplex.contract.reasons import Reason
from agentplex.runtime.errors import Aborted, InvalidArgument
from agentplex.runtime.principal import tenant_prefix
from agentplex.runtime.tokens import estimate_message_tokens
from agentplex.v1 import memory_pb2

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_MESSAGES_PER_APPEND = 100
MAX_MESSAGE_BYTES = 256 * 1024
MAX_CONTEXT_TOKENS = 1_000_000
MAX_READ_MESSAGES = 1000
MAX_SUMMARY_BYTES = 64 * 1024


# Push, trim and renew the TTL in one step, skipping a task's batch seen before.
# Messages past the hard cap leave from the head, and `base` moves with them so
# positions stay stable. The task ids seen are a sorted set scored by the
# position their batch started at, trimmed to the newest `cap`: every batch
# holds at least one message, so a batch still (partly) in the list always has
# its id kept, and the set never outgrows the list's own bound.
# KEYS: list, task ids seen, meta hash.
_APPEND = """
local cap = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return redis.call('LLEN', KEYS[1]) end
  local tail = tonumber(redis.call('HGET', KEYS[3], 'base') or '0') + redis.call('LLEN', KEYS[1])
  redis.call('ZADD', KEYS[2], tail, ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -cap - 1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
local len = redis.call('LLEN', KEYS[1])
if len > cap then
  redis.call('LTRIM', KEYS[1], -cap, -1)
  redis.call('HINCRBY', KEYS[3], 'base', len - cap)
  len = cap
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return len
"""

# Messages from a position on. KEYS: list, meta. ARGV: start position, count.
_READ = """
local base = tonumber(redis.call('HGET', KEYS[2], 'base') or '0')
local offset = math.max(tonumber(ARGV[1]) - base, 0)
local items = redis.call('LRANGE', KEYS[1], offset, offset + tonumber(ARGV[2]) - 1)
return {base + offset, base + redis.call('LLEN', KEYS[1]), items}
"""

# Compare-and-set the summary, then drop the messages it covers, in one step.
# KEYS: list, meta, task ids seen. ARGV: expected covered position, new covered
# position, serialized summary, TTL. Returns {removed, remaining}, or
# {-1, current covered position} on a lost race, {-2, next position} when the
# summary would cover messages that do not exist.
_STORE_SUMMARY = """
local current = tonumber(redis.call('HGET', KEYS[2], 'through') or '0')
if current ~= tonumber(ARGV[1]) then return {-1, current} end
local base = tonumber(redis.call('HGET', KEYS[2], 'base') or '0')
local len = redis.call('LLEN', KEYS[1])
local through = tonumber(ARGV[2])
if through > base + len then return {-2, base + len} end
local removed = 0
if through > base then
  removed = through - base
  redis.call('LTRIM', KEYS[1], removed, -1)
  redis.call('HSET', KEYS[2], 'base', through)
end
redis.call('HSET', KEYS[2], 'through', through, 'summary', ARGV[3])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {removed, len - removed}
"""


@dataclass(frozen=True)
class ContextPacket:
    """The session's summary and most recent messages that fit a token limit."""

    messages: list[memory_pb2.MemoryMessage]
    token_count: int
    omitted_count: int
    summary: memory_pb2.ContextSummary | None = None
    next_position: int = 0


@dataclass(frozen=True)
class StoredMessages:
    """Messages read by position, and where the session ends."""

    messages: list[memory_pb2.MemoryMessage]
    next_position: int


@dataclass(frozen=True)
class SummaryStored:
    removed_count: int
    message_count: int


def validate_scope(scope: memory_pb2.SessionScope) -> None:
    if not AGENT_NAME_PATTERN.fullmatch(scope.agent):
        raise InvalidArgument(
            f"scope.agent {scope.agent!r} must be a lowercase name like 'assistant'"
        )
    if not SESSION_ID_PATTERN.fullmatch(scope.session_id):
        raise InvalidArgument(
            "scope.session_id must be 1-128 characters of letters, digits and ._:-"
        )


class MemoryStore:
    """Session history on Redis; holds no conversation state of its own."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        ttl_seconds: int,
        max_messages: int,
        default_context_tokens: int,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._max_messages = max_messages
        self._default_context_tokens = default_context_tokens
        self._append = redis.register_script(_APPEND)
        self._read = redis.register_script(_READ)
        self._store_summary = redis.register_script(_STORE_SUMMARY)

    def _key(self, scope: memory_pb2.SessionScope) -> str:
        # Under the caller's tenant: another tenant naming the same session reads its
        # own (empty) one, exactly as if the name were unused — nothing to tell apart.
        return f"{tenant_prefix(self._prefix)}:memory:{scope.agent}:{scope.session_id}"

    def _keys(self, scope: memory_pb2.SessionScope) -> tuple[str, str, str]:
        """The session's list, its task ids seen (a sorted set: see `_APPEND`), and
        its meta hash. (The ids were once a plain set under `:tasks`; the new name
        keeps a session written before from hitting a key of the wrong type.)"""
        key = self._key(scope)
        return key, f"{key}:task-ids", f"{key}:meta"

    async def append(
        self, scope: memory_pb2.SessionScope, messages: Sequence[memory_pb2.MemoryMessage]
    ) -> int:
        """Append in order, atomically; returns the session's length afterwards."""
        validate_scope(scope)
        if not messages:
            raise InvalidArgument("messages must hold at least one message")
        if len(messages) > MAX_MESSAGES_PER_APPEND:
            raise InvalidArgument(
                f"at most {MAX_MESSAGES_PER_APPEND} messages per append, got {len(messages)}"
            )
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        encoded = []
        for index, message in enumerate(messages):
            if message.role == memory_pb2.ROLE_UNSPECIFIED:
                raise InvalidArgument(f"messages[{index}].role must be set")
            if len(message.content.encode("utf-8")) > MAX_MESSAGE_BYTES:
                raise InvalidArgument(
                    f"messages[{index}].content exceeds {MAX_MESSAGE_BYTES} bytes"
                )
            stored = memory_pb2.MemoryMessage()
            stored.CopyFrom(message)
            stored.created_at.CopyFrom(now)
            if stored.token_count <= 0:
                stored.token_count = estimate_message_tokens(stored.content)
            encoded.append(stored.SerializeToString())
        key, tasks, meta = self._keys(scope)
        task_ids = {message.task_id for message in messages}
        # A batch from one task is stored once, however often it is retried (a
        # durable task that runs again after its worker died saves its turn again).
        dedupe = task_ids.pop() if len(task_ids) == 1 else ""
        return int(
            await self._append(
                keys=[key, tasks, meta],
                args=[dedupe, self._max_messages, self._ttl, *encoded],
            )
        )

    async def load(
        self, scope: memory_pb2.SessionScope, max_tokens: int | None = None
    ) -> ContextPacket:
        """The summary, then the newest messages, together at most `max_tokens`."""
        validate_scope(scope)
        limit = self._default_context_tokens if max_tokens is None else max_tokens
        if not 1 <= limit <= MAX_CONTEXT_TOKENS:
            raise InvalidArgument(f"max_tokens must be between 1 and {MAX_CONTEXT_TOKENS}")
        key, _, meta = self._keys(scope)
        # Every message costs at least one token, so no more than `limit` can fit.
        window = min(limit, self._max_messages)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(meta, ["base", "summary"])
            pipe.llen(key)
            pipe.lrange(key, -window, -1)
            (base_raw, summary_raw), total, raw = await pipe.execute()
        total = int(total)
        next_position = int(base_raw or 0) + total
        summary = None
        used = 0
        if summary_raw:
            summary = memory_pb2.ContextSummary.FromString(summary_raw)
            if summary.token_count <= limit:
                used = summary.token_count
            else:
                # A summary that alone overflows the limit (the limit shrank) loses its
                # text rather than breaking the bound, but keeps its position: the next
                # summarizer needs it to replace this one.
                summary.ClearField("content")
                summary.token_count = 0
        picked: list[memory_pb2.MemoryMessage] = []
        position = next_position
        for blob in reversed(raw):
            message = memory_pb2.MemoryMessage.FromString(blob)
            position -= 1
            if used + message.token_count > limit:
                break
            message.position = position
            picked.append(message)
            used += message.token_count
        picked.reverse()
        return ContextPacket(
            messages=picked,
            token_count=used,
            omitted_count=total - len(picked),
            summary=summary,
            next_position=next_position,
        )

    async def read(
        self, scope: memory_pb2.SessionScope, start_position: int, max_messages: int
    ) -> StoredMessages:
        """Stored messages from `start_position` on, oldest first, each with its position."""
        validate_scope(scope)
        if start_position < 0:
            raise InvalidArgument("start_position must not be negative")
        if not 1 <= max_messages <= MAX_READ_MESSAGES:
            raise InvalidArgument(f"max_messages must be between 1 and {MAX_READ_MESSAGES}")
        key, _, meta = self._keys(scope)
        first, next_position, raw = await self._read(
            keys=[key, meta], args=[start_position, max_messages]
        )
        messages = []
        for offset, blob in enumerate(raw):
            message = memory_pb2.MemoryMessage.FromString(blob)
            message.position = int(first) + offset
            messages.append(message)
        return StoredMessages(messages=messages, next_position=int(next_position))

    async def store_summary(
        self,
        scope: memory_pb2.SessionScope,
        summary: memory_pb2.ContextSummary,
        expected_through_position: int,
    ) -> SummaryStored:
        """Replace the messages below `summary.through_position` with `summary`, atomically.

        `expected_through_position` is the covered position of the summary the
        caller read (0 for none); if another summary landed since, nothing
        changes and `Aborted` says to read again.
        """
        validate_scope(scope)
        if not summary.content.strip():
            raise InvalidArgument("summary.content must not be empty")
        if len(summary.content.encode("utf-8")) > MAX_SUMMARY_BYTES:
            raise InvalidArgument(f"summary.content exceeds {MAX_SUMMARY_BYTES} bytes")
        if expected_through_position < 0:
            raise InvalidArgument("expected_through_position must not be negative")
        if summary.through_position <= expected_through_position:
            raise InvalidArgument(
                "summary.through_position must be past expected_through_position "
                f"({summary.through_position} <= {expected_through_position})"
            )
        stored = memory_pb2.ContextSummary()
        stored.CopyFrom(summary)
        stored.created_at.GetCurrentTime()
        if stored.token_count <= 0:
            stored.token_count = estimate_message_tokens(stored.content)
        key, tasks, meta = self._keys(scope)
        first, second = await self._store_summary(
            keys=[key, meta, tasks],
            args=[
                expected_through_position,
                summary.through_position,
                stored.SerializeToString(),
                self._ttl,
            ],
        )
        if first == -1:
            raise Aborted(
                f"the session's summary moved on (it covers up to {second}, not "
                f"{expected_through_position}); load the context again",
                reason=Reason.SUMMARY_CONFLICT,
            )
        if first == -2:
            raise InvalidArgument(
                f"summary.through_position {summary.through_position} is past the "
                f"session's next position {second}"
            )
        return SummaryStored(removed_count=int(first), message_count=int(second))

    async def clear(self, scope: memory_pb2.SessionScope) -> bool:
        validate_scope(scope)
        return bool(await self._redis.delete(*self._keys(scope)))
