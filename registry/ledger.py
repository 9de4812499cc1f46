"""The idempotency ledger: a side effect runs at most once per key.

Reference: Stripe's idempotency keys and the IETF Idempotency-Key draft. An
entry is claimed (state "pending"); the claimant runs the tool and stores the
response (a stored failure included). A repeat with the same arguments gets
the stored response; a repeat with other arguments is a conflict; a
concurrent repeat waits for the first one's response. Entries are scoped by
caller agent and session, hashed together with the key, so no choice of key
or session id reaches another caller's entry. Only the claim's holder (its
token) can complete or release it.

A claim is held for a limited time (twice the tool timeout, in Redis's
clock); a holder that has settled nothing by then is presumed gone (killed
mid-call, or its Redis failed while it stored the answer). Its pending entry
does not expire with it, since a side effect may already have happened: it
stays under the ledger's TTL and records whether the call may run again. The
next call for the key settles it atomically: a call that may run again (a
read-only or idempotent tool, a delegation that re-attaches to its sub-task)
is taken over and runs; any other is stored as OUTCOME_UNKNOWN and never runs
again under the key.
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

from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import FailedPrecondition, InvalidArgument
from agentplex.runtime.principal import tenant_prefix
from agentplex.v1 import tool_pb2
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


# Claim a key, or say what holds it. A pending entry records its holder's
# deadline (`until`, Redis's clock in ms) and whether the call may run again
# (`rerun`). Past the deadline its holder is presumed gone: a call that may run
# again is taken over, any other is settled with ARGV[5] (OUTCOME_UNKNOWN).
# KEYS: the entry. ARGV: fingerprint, token, rerun ('1'/'0'), TTL (s), the
# settled entry for an abandoned call, hold (ms).
# Returns {'run'}, {'wait'}, {'conflict'} or {'done', entry}.
_CLAIM = """
local server_time = redis.call('TIME')
local now = tonumber(server_time[1]) * 1000 + math.floor(tonumber(server_time[2]) / 1000)
local raw = redis.call('GET', KEYS[1])
if raw then
  local entry = cjson.decode(raw)
  if entry['fp'] ~= ARGV[1] then return {'conflict'} end
  if entry['state'] == 'done' then return {'done', raw} end
  local deadline = tonumber(entry['until'])
  -- An entry without a deadline (an older release's) expires by itself.
  if deadline == nil or now < deadline then return {'wait'} end
  if not entry['rerun'] then
    redis.call('SET', KEYS[1], ARGV[5], 'EX', ARGV[4])
    return {'done', ARGV[5]}
  end
end
local pending = cjson.encode({fp = ARGV[1], state = 'pending', token = ARGV[2],
  rerun = ARGV[3] == '1', ['until'] = now + tonumber(ARGV[6])})
redis.call('SET', KEYS[1], pending, 'EX', ARGV[4])
return {'run'}
"""

# Write only while the entry is still this claim's pending marker: a claim that
# was settled or taken over after its hold ran out must not overwrite (or
# delete) what another stored.
_SETTLE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry['state'] ~= 'pending' or entry['token'] ~= ARGV[1] then return 0 end
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


def abandoned_outcome() -> pb.InvokeToolResponse:
    """What an abandoned claim of a call that may not run again is settled with,
    when the caller names no tool-specific response."""
    return pb.InvokeToolResponse(
        error=tool_pb2.ToolError(
            code=ToolErrorCode.OUTCOME_UNKNOWN,
            message="the call was interrupted and may or may not have taken effect; it will "
            "not run again under this idempotency key",
        )
    )


class IdempotencyLedger:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        pending_ttl_seconds: float = 60.0,
    ) -> None:
        """`pending_ttl_seconds` is how long a claim is held: a holder that has not
        completed or released it by then is presumed gone (see the module)."""
        self._redis = redis
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._hold_ms = max(1, int(pending_ttl_seconds * 1000))
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)

    async def claim(
        self,
        caller: pb.Caller,
        idempotency_key: str,
        fp: str,
        deadline: Deadline,
        *,
        rerun: bool = False,
        abandoned: pb.InvokeToolResponse | None = None,
    ) -> Claim:
        """Claim the key, or get its stored response (waiting for a pending one).

        `rerun`: whether this call may run again should its claim be abandoned
        (the tool is safe to repeat). `abandoned`: what to store, and return,
        when the key's pending claim was abandoned by a call that may not run
        again (OUTCOME_UNKNOWN)."""
        if len(idempotency_key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"idempotency_key exceeds {MAX_KEY_LENGTH} characters")
        # Keys are per tenant: another tenant's call with the same key runs on its own,
        # never replaying (or even learning of) this tenant's outcome.
        key = ledger_key(
            tenant_prefix(self._prefix), caller.agent, caller.session_id, idempotency_key
        )
        token = uuid.uuid4().hex
        settled = json.dumps(
            {
                "fp": fp,
                "state": "done",
                "token": token,
                "response": _encode(abandoned or abandoned_outcome()),
            }
        )
        args = [fp, token, "1" if rerun else "0", self._ttl, settled, self._hold_ms]
        while True:
            verdict: list[bytes] = await self._claim(keys=[key], args=args)
            state = verdict[0].decode()
            if state == "run":
                return Claim(key, None, token)
            if state == "conflict":
                raise FailedPrecondition(
                    f"idempotency key {idempotency_key!r} was already used with different "
                    "arguments; use a new key for a new request",
                    reason=Reason.IDEMPOTENCY_KEY_REUSED,
                )
            if state == "done":
                entry = json.loads(verdict[1])
                response = pb.InvokeToolResponse.FromString(base64.b64decode(entry["response"]))
                response.replayed = True
                return Claim(key, response)
            deadline.timeout()  # raises DEADLINE_EXCEEDED once the caller gave up
            await asyncio.sleep(POLL_SECONDS)

    async def complete(self, claim: Claim, fp: str, response: pb.InvokeToolResponse) -> None:
        entry = {"fp": fp, "state": "done", "token": claim.token, "response": _encode(response)}
        await self._settle(keys=[claim.key], args=[claim.token, json.dumps(entry), self._ttl])

    async def release(self, claim: Claim) -> None:
        """Give a claim back when the tool certainly did not run, so a retry may."""
        await self._settle(keys=[claim.key], args=[claim.token, "", 0])


def _encode(response: pb.InvokeToolResponse) -> str:
    return base64.b64encode(response.SerializeToString()).decode()
