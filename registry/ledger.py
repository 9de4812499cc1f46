"""The idempotency ledger: a side effect runs at most once per key.

Reference: Stripe's idempotency keys and the IETF Idempotency-Key draft. An
entry is claimed with SET NX (state "pending"); the claimant runs the tool and
stores the response (a stored failure included). A repeat with the same
arguments gets the stored response; a repeat with other arguments is a
conflict; a concurrent repeat waits for the first one's response. Entries are
scoped by caller agent and session, hashed together with the key, so no choice
of key or session id reaches another caller's entry. Only the claim's holder
(its token) can complete or release it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentplex.contract.reasons import Reason
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import FailedPrecondition, InvalidArgument
from agentplex.v1 import tool_registry_service_pb2 as pb

DEFAULT_TTL_SECONDS = 24 * 3600
POLL_SECONDS = 0.02
MAX_KEY_LENGTH = 200


def fingerprint(tool_name: str, arguments: dict[str, Any]) -> str:
    canonical = json.dumps([tool_name, arguments], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """Either the right to run (`replay is None`) or a stored response to return."""

    key: str
    replay: pb.InvokeToolResponse | None
    # Identifies this claim, so only its holder can complete or release it.
    token: str = ""


# Write only while the entry is still this claim's pending marker: a claim that
# outlived its pending TTL must not overwrite (or delete) what another stored.
_SETTLE = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['token'] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


def ledger_key(prefix: str, caller_agent: str, session_id: str, idempotency_key: str) -> str:
    """One entry per (agent, session, key): hashed, so no separator can make two collide."""
    digest = hashlib.sha256(
        json.dumps([caller_agent, session_id, idempotency_key]).encode()
    ).hexdigest()
    return f"{prefix}:idempotency:{digest}"


class IdempotencyLedger:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        pending_ttl_seconds: float = 60.0,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._pending_ttl = max(1, int(pending_ttl_seconds))
        self._settle = redis.register_script(_SETTLE)

    async def claim(
        self, caller: pb.Caller, idempotency_key: str, fp: str, deadline: Deadline
    ) -> Claim:
        if len(idempotency_key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"idempotency_key exceeds {MAX_KEY_LENGTH} characters")
        key = ledger_key(self._prefix, caller.agent, caller.session_id, idempotency_key)
        token = uuid.uuid4().hex
        pending = json.dumps({"fp": fp, "state": "pending", "token": token})
        while True:
            # A pending claim expires, so a registry that died mid-call does not
            # wedge the key forever.
            if await self._redis.set(key, pending, nx=True, ex=self._pending_ttl):
                return Claim(key, None, token)
            raw = await self._redis.get(key)
            if raw is None:
                continue
            entry = json.loads(raw)
            if entry["fp"] != fp:
                raise FailedPrecondition(
                    f"idempotency key {idempotency_key!r} was already used with different "
                    "arguments; use a new key for a new request",
                    reason=Reason.IDEMPOTENCY_KEY_REUSED,
                )
            if entry["state"] == "done":
                response = pb.InvokeToolResponse.FromString(base64.b64decode(entry["response"]))
                response.replayed = True
                return Claim(key, response)
            deadline.timeout()  # raises DEADLINE_EXCEEDED once the caller gave up
            await asyncio.sleep(POLL_SECONDS)

    async def complete(self, claim: Claim, fp: str, response: pb.InvokeToolResponse) -> None:
        entry = {
            "fp": fp,
            "state": "done",
            "token": claim.token,
            "response": base64.b64encode(response.SerializeToString()).decode(),
        }
        await self._settle(keys=[claim.key], args=[claim.token, json.dumps(entry), self._ttl])

    async def release(self, claim: Claim) -> None:
        """Give a claim back when the tool certainly did not run, so a retry may."""
        await self._settle(keys=[claim.key], args=[claim.token, "", 0])
