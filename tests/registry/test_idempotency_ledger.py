"""The idempotency ledger against a real Redis: a side effect runs at most once per key."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from agentplex.registry.ledger import (
    MAX_KEY_LENGTH,
    Claim,
    IdempotencyLedger,
    fingerprint,
    ledger_key,
)
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb


def session(session_id: str) -> pb.Caller:
    return pb.Caller(session_id=session_id)


FP = fingerprint("notes.write", {"text": "hello"})
OTHER_FP = fingerprint("notes.write", {"text": "goodbye"})


@pytest.fixture
def ledger(redis_client: aioredis.Redis, key_prefix: str) -> IdempotencyLedger:
    return IdempotencyLedger(redis_client, key_prefix=key_prefix, ttl_seconds=3600)


def deadline() -> Deadline:
    return Deadline.after(5.0)


async def server_ms(redis: aioredis.Redis) -> int:
    seconds, microseconds = await redis.time()
    return seconds * 1000 + microseconds // 1000


def ok_response(note_count: int = 1) -> pb.InvokeToolResponse:
    return pb.InvokeToolResponse(
        tool_name="notes.write",
        tool_version="1.0.0",
        result_json=json.dumps({"saved": True, "note_count": note_count}),
    )


def test_fingerprint_is_canonical_and_distinguishes() -> None:
    assert fingerprint("t", {"a": 1, "b": 2}) == fingerprint("t", {"b": 2, "a": 1})
    assert fingerprint("t", {"a": 1}) != fingerprint("t", {"a": 2})
    assert fingerprint("t", {"a": 1}) != fingerprint("u", {"a": 1})
    assert fingerprint("t", {"a": 1}) != fingerprint("t", {"a": "1"})


async def test_first_claim_runs(
    ledger: IdempotencyLedger, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    claim = await ledger.claim(session("session-1"), "key-1", FP, deadline())
    assert claim.replay is None
    assert claim.key == ledger_key(key_prefix, "", "session-1", "key-1")
    assert claim.key.startswith(f"{key_prefix}:idempotency:")
    raw = await redis_client.get(claim.key)
    assert raw is not None
    entry = json.loads(raw)
    until = entry.pop("until")
    assert entry == {"fp": FP, "state": "pending", "token": claim.token, "rerun": False}
    assert until == pytest.approx(await server_ms(redis_client) + 60_000, abs=5_000)


async def test_a_pending_claim_outlives_its_hold(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A holder that dies leaves its claim under the ledger's TTL, not the hold's:
    a side effect may have happened, so the key must not simply come free."""
    ledger = IdempotencyLedger(
        redis_client, key_prefix=key_prefix, ttl_seconds=3600, pending_ttl_seconds=7
    )
    claim = await ledger.claim(session("s"), "k", FP, deadline(), rerun=True)
    assert 3000 < await redis_client.ttl(claim.key) <= 3600
    raw = await redis_client.get(claim.key)
    assert raw is not None
    entry = json.loads(raw)
    assert entry["rerun"] is True
    assert entry["until"] == pytest.approx(await server_ms(redis_client) + 7_000, abs=2_000)


async def test_completed_then_same_key_and_arguments_replays(
    ledger: IdempotencyLedger, redis_client: aioredis.Redis
) -> None:
    claim = await ledger.claim(session("s"), "k", FP, deadline())
    await ledger.complete(claim, FP, ok_response())
    assert 3000 < await redis_client.ttl(claim.key) <= 3600

    again = await ledger.claim(session("s"), "k", FP, deadline())
    assert again.replay is not None
    assert again.replay.replayed is True
    assert again.replay.tool_name == "notes.write"
    assert again.replay.tool_version == "1.0.0"
    assert json.loads(again.replay.result_json) == {"saved": True, "note_count": 1}
    # A third time still replays the same stored response.
    third = await ledger.claim(session("s"), "k", FP, deadline())
    assert third.replay == again.replay


async def test_same_key_different_arguments_is_a_conflict(ledger: IdempotencyLedger) -> None:
    claim = await ledger.claim(session("s"), "k", FP, deadline())
    await ledger.complete(claim, FP, ok_response())
    with pytest.raises(FailedPrecondition) as info:
        await ledger.claim(session("s"), "k", OTHER_FP, deadline())
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert "'k'" in info.value.message


async def test_conflict_is_detected_while_the_first_call_is_pending(
    ledger: IdempotencyLedger,
) -> None:
    await ledger.claim(session("s"), "k", FP, deadline())
    with pytest.raises(FailedPrecondition) as info:
        await ledger.claim(session("s"), "k", OTHER_FP, deadline())
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_concurrent_claims_run_exactly_once(
    ledger: IdempotencyLedger,
    eventually,
) -> None:
    release_first = asyncio.Event()
    runs: list[int] = []

    async def invoke() -> pb.InvokeToolResponse:
        claim = await ledger.claim(session("s"), "concurrent", FP, deadline())
        if claim.replay is not None:
            return claim.replay
        runs.append(1)
        await release_first.wait()  # hold the executor until everyone else is waiting
        response = ok_response(note_count=42)
        await ledger.complete(claim, FP, response)
        return response

    tasks = [asyncio.ensure_future(invoke()) for _ in range(6)]
    await eventually(lambda: len(runs) == 1, message="one executor claimed the key")
    assert not any(task.done() for task in tasks)  # the others wait for its result
    release_first.set()
    responses = await asyncio.gather(*tasks)

    assert len(runs) == 1
    assert sorted(r.replayed for r in responses) == [False] + [True] * 5
    assert {json.loads(r.result_json)["note_count"] for r in responses} == {42}


async def test_waiting_claim_gives_up_at_the_deadline(ledger: IdempotencyLedger) -> None:
    await ledger.claim(session("s"), "stuck", FP, deadline())
    with pytest.raises(DeadlineExceeded):
        await ledger.claim(session("s"), "stuck", FP, Deadline.after(0.1))


async def test_release_lets_a_retry_run(
    ledger: IdempotencyLedger, redis_client: aioredis.Redis
) -> None:
    claim = await ledger.claim(session("s"), "k", FP, deadline())
    await ledger.release(claim)
    assert await redis_client.exists(claim.key) == 0
    retry = await ledger.claim(session("s"), "k", FP, deadline())
    assert retry.replay is None
    # After a release the key is free, even for other arguments.
    await ledger.release(retry)
    other = await ledger.claim(session("s"), "k", OTHER_FP, deadline())
    assert other.replay is None


async def test_release_wakes_a_waiting_claim_to_run(ledger: IdempotencyLedger) -> None:
    first = await ledger.claim(session("s"), "k", FP, deadline())
    waiter = asyncio.ensure_future(ledger.claim(session("s"), "k", FP, deadline()))
    await ledger.release(first)
    second = await asyncio.wait_for(waiter, timeout=5)
    assert second.replay is None


async def test_stored_failure_is_replayed(ledger: IdempotencyLedger) -> None:
    failed = pb.InvokeToolResponse(
        tool_name="notes.write",
        tool_version="1.0.0",
        error=tool_pb2.ToolError(code="NO_SESSION", message="notes need a session"),
    )
    claim = await ledger.claim(session("s"), "k", FP, deadline())
    await ledger.complete(claim, FP, failed)
    again = await ledger.claim(session("s"), "k", FP, deadline())
    assert again.replay is not None
    assert again.replay.replayed is True
    assert again.replay.WhichOneof("outcome") == "error"
    assert again.replay.error.code == "NO_SESSION"
    assert again.replay.error.message == "notes need a session"


async def test_keys_are_scoped(ledger: IdempotencyLedger) -> None:
    a = await ledger.claim(session("session-a"), "same-key", FP, deadline())
    b = await ledger.claim(session("session-b"), "same-key", OTHER_FP, deadline())
    assert a.replay is None and b.replay is None
    assert a.key != b.key
    await ledger.complete(a, FP, ok_response(1))
    await ledger.complete(b, OTHER_FP, ok_response(2))
    replay_a = (await ledger.claim(session("session-a"), "same-key", FP, deadline())).replay
    replay_b = (await ledger.claim(session("session-b"), "same-key", OTHER_FP, deadline())).replay
    assert replay_a is not None and replay_b is not None
    assert json.loads(replay_a.result_json)["note_count"] == 1
    assert json.loads(replay_b.result_json)["note_count"] == 2


async def test_key_prefixes_are_independent(redis_client: aioredis.Redis, key_prefix: str) -> None:
    mine = IdempotencyLedger(redis_client, key_prefix=key_prefix)
    theirs = IdempotencyLedger(redis_client, key_prefix=f"{key_prefix}-other")
    claim = await mine.claim(session("s"), "k", FP, deadline())
    await mine.complete(claim, FP, ok_response())
    assert (await theirs.claim(session("s"), "k", FP, deadline())).replay is None


async def test_overlong_key_is_rejected(
    ledger: IdempotencyLedger, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await ledger.claim(session("s"), "k" * MAX_KEY_LENGTH, FP, deadline())  # at the limit: fine
    with pytest.raises(InvalidArgument):
        await ledger.claim(session("s"), "k" * (MAX_KEY_LENGTH + 1), FP, deadline())
    assert len(await redis_client.keys(f"{key_prefix}:idempotency:*")) == 1


async def test_claim_is_a_plain_value() -> None:
    assert Claim("k", None) == Claim("k", None)


async def test_keys_of_different_callers_never_collide(ledger: IdempotencyLedger) -> None:
    # Separator games ("s" + "a:b" vs "s:a" + "b") and agents sharing a session.
    first = await ledger.claim(session("s"), "a:b", FP, deadline())
    await ledger.complete(first, FP, pb.InvokeToolResponse(result_json="{}"))
    assert (await ledger.claim(session("s:a"), "b", FP, deadline())).replay is None
    bot1 = await ledger.claim(pb.Caller(agent="bot1", session_id="shared"), "k", FP, deadline())
    await ledger.complete(bot1, FP, pb.InvokeToolResponse(result_json="{}"))
    bot2 = pb.Caller(agent="bot2", session_id="shared")
    assert (await ledger.claim(bot2, "k", FP, deadline())).replay is None


async def test_a_stale_claim_cannot_overwrite_a_newer_outcome(
    ledger: IdempotencyLedger, redis_client: aioredis.Redis
) -> None:
    stale = await ledger.claim(session("s"), "k", FP, deadline())
    await redis_client.delete(stale.key)  # its pending marker expired
    fresh = await ledger.claim(session("s"), "k", FP, deadline())
    await ledger.complete(fresh, FP, pb.InvokeToolResponse(result_json='{"n": 1}'))
    await ledger.release(stale)  # too late: must not delete the stored outcome
    await ledger.complete(stale, FP, pb.InvokeToolResponse(result_json='{"n": 2}'))
    replay = (await ledger.claim(session("s"), "k", FP, deadline())).replay
    assert replay is not None and replay.result_json == '{"n": 1}'


# -- claims whose holder vanished (killed mid-call, or its Redis failed as it stored) --

HOLD = 0.3


@pytest.fixture
def short_hold(redis_client: aioredis.Redis, key_prefix: str) -> IdempotencyLedger:
    return IdempotencyLedger(
        redis_client, key_prefix=key_prefix, ttl_seconds=3600, pending_ttl_seconds=HOLD
    )


async def past_hold(redis: aioredis.Redis, key: str, eventually) -> None:
    """Wait until the claim under `key` is past its hold, in Redis's clock."""
    raw = await redis.get(key)
    assert raw is not None
    until = json.loads(raw)["until"]

    async def passed() -> bool:
        return await server_ms(redis) >= until

    await eventually(passed, timeout=5, message="the hold never ran out")


def unknown() -> pb.InvokeToolResponse:
    return pb.InvokeToolResponse(
        tool_name="notes.write",
        tool_version="1.0.0",
        error=tool_pb2.ToolError(code="OUTCOME_UNKNOWN", message="may or may not have"),
    )


async def test_an_abandoned_claim_of_a_side_effect_is_settled_outcome_unknown(
    short_hold: IdempotencyLedger, redis_client: aioredis.Redis
) -> None:
    """The holder never settles: past its hold, the next call gets OUTCOME_UNKNOWN
    (stored, so every later repeat too), never the right to run again."""
    dead = await short_hold.claim(session("s"), "k", FP, deadline())
    started = asyncio.get_running_loop().time()
    retry = await short_hold.claim(
        session("s"), "k", FP, deadline(), rerun=True, abandoned=unknown()
    )
    waited = asyncio.get_running_loop().time() - started
    assert retry.replay is not None, "a side-effecting call ran again under its key"
    assert retry.replay.replayed and retry.replay.error.code == "OUTCOME_UNKNOWN"
    assert retry.replay.tool_name == "notes.write"
    assert waited >= HOLD * 0.8  # the holder had its hold: it may have been alive
    assert 3000 < await redis_client.ttl(dead.key) <= 3600
    # The dead holder, should it come back, cannot overwrite what was settled.
    await short_hold.complete(dead, FP, ok_response())
    await short_hold.release(dead)
    again = (await short_hold.claim(session("s"), "k", FP, deadline())).replay
    assert again is not None and again.error.code == "OUTCOME_UNKNOWN"


async def test_an_abandoned_claim_of_a_call_safe_to_repeat_is_taken_over(
    short_hold: IdempotencyLedger,
) -> None:
    dead = await short_hold.claim(session("s"), "k", FP, deadline(), rerun=True)
    retry = await short_hold.claim(session("s"), "k", FP, deadline(), abandoned=unknown())
    assert retry.replay is None  # it runs again
    assert retry.token != dead.token
    await short_hold.complete(retry, FP, ok_response(7))
    await short_hold.complete(dead, FP, ok_response(1))  # too late: not its claim now
    replay = (await short_hold.claim(session("s"), "k", FP, deadline())).replay
    assert replay is not None and json.loads(replay.result_json)["note_count"] == 7


async def test_other_arguments_are_a_conflict_even_for_an_abandoned_claim(
    short_hold: IdempotencyLedger, redis_client: aioredis.Redis, eventually
) -> None:
    dead = await short_hold.claim(session("s"), "k", FP, deadline())
    await past_hold(redis_client, dead.key, eventually)
    with pytest.raises(FailedPrecondition):
        await short_hold.claim(session("s"), "k", OTHER_FP, deadline(), rerun=True)
    settled = (await short_hold.claim(session("s"), "k", FP, deadline())).replay
    assert settled is not None and settled.error.code == "OUTCOME_UNKNOWN"


async def test_an_abandoned_claim_is_settled_once_among_racing_retries(
    short_hold: IdempotencyLedger,
) -> None:
    await short_hold.claim(session("s"), "k", FP, deadline(), rerun=True)
    retries = await asyncio.gather(
        *(short_hold.claim(session("s"), "k", FP, deadline()) for _ in range(5))
    )
    assert sum(claim.replay is None for claim in retries) == 1  # one takes it over
