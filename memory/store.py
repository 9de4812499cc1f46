"""`MemoryStore`: ordered per-session history in a Redis list.

One list per (agent, session) holds serialized `MemoryMessage`s, oldest
first. Appends are one Lua script (push, trim, renew TTL), so concurrent
writers never interleave half-batches and a session never outlives its TTL; a
batch whose messages all carry the same task id is stored at most once.
Loads read the newest messages in one command and keep the most recent that
fit the token limit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from agentplex.runtime.errors import InvalidArgument
from agentplex.runtime.tokens import estimate_message_tokens
from agentplex.v1 import memory_pb2

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_MESSAGES_PER_APPEND = 100
MAX_MESSAGE_BYTES = 256 * 1024
MAX_CONTEXT_TOKENS = 1_000_000


# Push, trim and renew the TTL in one step, skipping a task's batch seen before.
_APPEND = """
if ARGV[1] ~= '' then
  if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return redis.call('LLEN', KEYS[1]) end
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('LLEN', KEYS[1])
"""


@dataclass(frozen=True)
class ContextPacket:
    """The most recent messages of a session that fit a token limit."""

    messages: list[memory_pb2.MemoryMessage]
    token_count: int
    omitted_count: int


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

    def _key(self, scope: memory_pb2.SessionScope) -> str:
        return f"{self._prefix}:memory:{scope.agent}:{scope.session_id}"

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
        key = self._key(scope)
        task_ids = {message.task_id for message in messages}
        # A batch from one task is stored once, however often it is retried (a
        # durable task that runs again after its worker died saves its turn again).
        dedupe = task_ids.pop() if len(task_ids) == 1 else ""
        return int(
            await self._append(
                keys=[key, f"{key}:tasks"],
                args=[dedupe, self._max_messages, self._ttl, *encoded],
            )
        )

    async def load(
        self, scope: memory_pb2.SessionScope, max_tokens: int | None = None
    ) -> ContextPacket:
        """The newest messages whose tokens add up to at most `max_tokens`."""
        validate_scope(scope)
        limit = self._default_context_tokens if max_tokens is None else max_tokens
        if not 1 <= limit <= MAX_CONTEXT_TOKENS:
            raise InvalidArgument(f"max_tokens must be between 1 and {MAX_CONTEXT_TOKENS}")
        key = self._key(scope)
        # Every message costs at least one token, so no more than `limit` can fit.
        window = min(limit, self._max_messages)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.llen(key)
            pipe.lrange(key, -window, -1)
            total, raw = await pipe.execute()
        picked: list[memory_pb2.MemoryMessage] = []
        used = 0
        for blob in reversed(raw):
            message = memory_pb2.MemoryMessage.FromString(blob)
            if used + message.token_count > limit:
                break
            picked.append(message)
            used += message.token_count
        picked.reverse()
        return ContextPacket(
            messages=picked, token_count=used, omitted_count=int(total) - len(picked)
        )

    async def clear(self, scope: memory_pb2.SessionScope) -> bool:
        validate_scope(scope)
        key = self._key(scope)
        return bool(await self._redis.delete(key, f"{key}:tasks"))
