"""`notes.write` / `notes.read`: per-session notes in Redis, a real side effect.

Notes belong to the caller's session, so one session never sees another's.
`notes.write` is side-effecting: the registry's idempotency ledger is what
keeps a retried step from writing the same note twice. The ledger gives a
key back when this backend reports its Redis unavailable, and Redis may have
applied a write whose reply was lost; so the write also remembers its key
(in the same script), and a repeat of it adds nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from agentplex.contract.reasons import ToolErrorCode
from agentplex.contract.tool_definition import define
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.v1 import tool_pb2

MAX_NOTE_LENGTH = 4000
MAX_NOTES_PER_SESSION = 500
NOTES_TTL_SECONDS = 30 * 24 * 3600
# How long a write remembers its idempotency key: as long as the registry
# remembers keys by default, the window in which a retry can come.
WRITE_KEY_TTL_SECONDS = 24 * 3600

# KEYS[1]: the session's notes; KEYS[2] (if given): the write's key marker.
# ARGV: text, max notes, notes TTL, marker TTL, fingerprint of the text.
# A marker with this text's fingerprint means this write already happened.
_WRITE = """
if #KEYS == 2 then
  if redis.call('GET', KEYS[2]) == ARGV[5] then return redis.call('LLEN', KEYS[1]) end
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4])
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('LLEN', KEYS[1])
"""


def _key(context: ToolContext) -> str:
    if not context.session_id:
        raise ToolFailure(
            "notes need a session: call with caller.session_id set", code=ToolErrorCode.NO_SESSION
        )
    return f"{context.key_prefix}:notes:{context.session_id}"


class NotesWrite:
    definition = define(
        name="notes.write",
        version="1.0.0",
        description="Saves a note in the current session so it can be read back later.",
        input_schema={
            "type": "object",
            "properties": {
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_NOTE_LENGTH,
                    "description": "What to remember.",
                }
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"saved": {"type": "boolean"}, "note_count": {"type": "integer"}},
            "required": ["saved", "note_count"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_SIDE_EFFECTING,
    )

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        key, text = _key(context), arguments["text"]
        keys = [key]
        if context.idempotency_key:
            scope = json.dumps([context.agent, context.idempotency_key])
            keys.append(f"{key}:written:{hashlib.sha256(scope.encode()).hexdigest()[:32]}")
        count = await context.redis.eval(
            _WRITE,
            len(keys),
            *keys,
            text,
            MAX_NOTES_PER_SESSION,
            NOTES_TTL_SECONDS,
            WRITE_KEY_TTL_SECONDS,
            hashlib.sha256(text.encode()).hexdigest(),
        )
        return {"saved": True, "note_count": int(count)}


class NotesRead:
    definition = define(
        name="notes.read",
        version="1.0.0",
        description="Returns the notes saved in the current session, oldest first.",
        input_schema={
            "type": "object",
            "properties": {
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_NOTES_PER_SESSION,
                    "description": "Most recent notes to return (default 20).",
                }
            },
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
            "required": ["notes"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        limit = int(arguments.get("limit", 20))
        raw = await context.redis.lrange(_key(context), -limit, -1)
        return {"notes": [n.decode() if isinstance(n, bytes) else n for n in raw]}
