"""`TaskStore`: task records, event streams and the queue, on Redis.

Per agent `a` and task `t` (all keys under the configured prefix):

- `task:a:t` — hash: the normalized spec, request fingerprint, status,
  attempt, lease, cancel flag, last event sequence, result, timestamps;
- `task:a:t:events` — stream of serialized StepEvents with ids `0-<sequence>`,
  so "everything after sequence N" is a plain XREAD from `0-N`;
- `queue:a` — stream with consumer group `workers`; one entry per unfinished
  task, deleted when the task ends, so its length is the backlog;
- `queue:a:depth` — count of unfinished tasks, for backpressure;
- `queue:a:open` — set of the unfinished tasks' ids: what the reconciler walks
  to find a task that lost its queue entry, and what it recounts the depth from;
- `queue:a:reconciler` — whose turn it is to reconcile (a lock with expiry);
- `queue:a:dead` — dead-letter stream of tasks that kept killing workers.

A task of a tenant other than the default lives under that tenant's prefix
(`prefix@tenant:task:a:t`) and is queued under its record id `tenant/t`
(`record_id`): the queue is the agent's, the records are the tenants'.

Every transition is one Lua script, so it is atomic, and every write a worker
makes carries its attempt number: a stale attempt (a worker that stalled past
its lease while another took over) is refused.

This module is the one door to that storage: no other module names a key,
reads a stream id or parses a Redis reply. The worker claims through
`claim_new`/`reclaim_abandoned`/`give_back`, the watch path reads through
`last_event`/`first_event_sequence`/`read_events`/`subscribe_events`, the
reconciler through `take_reconcile_turn`/`open_task_ids`/`requeue_lost`/
`recount_depth`, the queue's metrics through `queue_gauges`, and all of them
answer in task ids, entry ids, sequences and StepEvents.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from redis.exceptions import ResponseError
from redis.typing import StreamRangeResponse, XReadGroupResponse, XReadResponse

from agentplex.contract.reasons import Reason
from agentplex.runtime import principal as principals
from agentplex.runtime.errors import FailedPrecondition, NotFound, ResourceExhausted
from agentplex.runtime.principal import DEFAULT_TENANT, tenant_prefix
from agentplex.runtime.redis_client import as_bytes, as_text
from agentplex.v1 import principal_pb2, step_event_pb2, task_pb2

if TYPE_CHECKING:  # the feed imports this module's stream ids; only typing looks back
    from agentplex.tasks.event_feed import EventFeed, Subscription

GROUP = "workers"
# Between a tenant and its task id in a record id; in no tenant name or task id.
TENANT_SEPARATOR = "/"

PENDING = task_pb2.TASK_STATUS_PENDING
RUNNING = task_pb2.TASK_STATUS_RUNNING
TERMINAL = (
    task_pb2.TASK_STATUS_COMPLETED,
    task_pb2.TASK_STATUS_FAILED,
    task_pb2.TASK_STATUS_CANCELLED,
)

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'fp') == ARGV[2] then return {'exists'} end
  if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'delegation') == ARGV[7] then
    return {'exists'}
  end
  return {'conflict'}
end
local depth = tonumber(redis.call('GET', KEYS[3]) or '0')
if depth >= tonumber(ARGV[4]) then return {'full', tostring(depth)} end
local entry = redis.call('XADD', KEYS[2], '*', 'task', ARGV[5])
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'fp', ARGV[2], 'status', ARGV[6], 'attempt', 0,
  'seq', 0, 'cancel', 0, 'created_ms', ARGV[3], 'entry', entry, 'delegation', ARGV[7],
  'principal', ARGV[8])
redis.call('INCR', KEYS[3])
redis.call('SADD', KEYS[4], ARGV[5])
return {'created'}
"""

# Leases are kept in Redis's own clock (milliseconds), not the workers': whoever
# compares one with "now" (the reconciler, on another host) must read the same clock.
_SERVER_MS = """
local server_time = redis.call('TIME')
local server_ms = tonumber(server_time[1]) * 1000 + math.floor(tonumber(server_time[2]) / 1000)
"""

# Start (or restart, after a reclaim) an attempt. Returns the new attempt and
# the last event sequence, or why the entry should just be acknowledged.
_START = (
    _SERVER_MS
    + """
local status = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if status == 0 then return {'missing'} end
if status >= 3 then return {'ended'} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
-- Attempts a draining worker handed back do not count towards dead-lettering.
local used = attempt - tonumber(redis.call('HGET', KEYS[1], 'handed_back') or '0')
if used >= tonumber(ARGV[4]) then return {'exhausted', tostring(used)} end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'owner', ARGV[1],
  'lease_until', server_ms + tonumber(ARGV[3]))
if redis.call('HEXISTS', KEYS[1], 'started_ms') == 0 then
  redis.call('HSET', KEYS[1], 'started_ms', ARGV[2])
end
return {'run', tostring(attempt), redis.call('HGET', KEYS[1], 'seq'),
  redis.call('HGET', KEYS[1], 'spec'), redis.call('HGET', KEYS[1], 'cancel'),
  redis.call('HGET', KEYS[1], 'principal') or ''}
"""
)

# Append a batch of consecutive events of the current attempt; 0 if the
# attempt is stale, -1 if the batch does not continue the numbering.
_APPEND = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1]
   or tonumber(redis.call('HGET', KEYS[1], 'status')) ~= tonumber(ARGV[2]) then
  return 0
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if seq + 1 ~= tonumber(ARGV[3]) then return -1 end
for i = 4, #ARGV do
  seq = seq + 1
  redis.call('XADD', KEYS[2], '0-' .. seq, 'e', ARGV[i])
end
redis.call('HSET', KEYS[1], 'seq', seq)
return 1
"""

# Renew the lease (and the queue entry's idle time, which is what XAUTOCLAIM
# looks at). 1 if the attempt still owns the task, 0 if it is stale. The cancel
# flag is not read here: the worker's CancelWatch is its one reader. ARGV[2] is
# the lease's length.
_HEARTBEAT = (
    _SERVER_MS
    + """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1]
   or tonumber(redis.call('HGET', KEYS[1], 'status')) ~= tonumber(ARGV[5]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', server_ms + tonumber(ARGV[2]))
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', KEYS[2], ARGV[4], ARGV[3], 0, entry, 'JUSTID')
return 1
"""
)

# Record the end of a task exactly once: result, final event, ack, TTLs.
# ARGV[1] is the attempt that must still own the task, ARGV[12] the status the
# task must be in ('' = either may be anything not yet ended: used for
# cancelling a pending task and for dead-lettering).
_FINISH = """
local status = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if status == 0 or status >= 3 then return 0 end
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] or status ~= 2) then
  return 0
end
if ARGV[12] ~= '' and status ~= tonumber(ARGV[12]) then return 0 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) + 1
if seq ~= tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'result', ARGV[3], 'finished_ms', ARGV[6],
  'seq', seq, 'cancel', 0)
redis.call('XADD', KEYS[2], '0-' .. seq, 'e', ARGV[4])
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[3], ARGV[9], entry)
redis.call('XDEL', KEYS[3], entry)
redis.call('DECR', KEYS[4])
redis.call('SREM', KEYS[6], ARGV[11])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
if ARGV[10] ~= '' then redis.call('XADD', KEYS[5], '*', 'task', ARGV[11], 'reason', ARGV[10]) end
return 1
"""

# A draining worker gives a task back: pending again, at once reclaimable.
_HAND_BACK = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1]
   or tonumber(redis.call('HGET', KEYS[1], 'status')) ~= tonumber(ARGV[4]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'handed_back', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[5])
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[2], 0, entry, 'IDLE', ARGV[6], 'JUSTID')
return 1
"""

# One step of the scan for abandoned entries: take over the next entry idle
# longer than the lease. An entry deleted while pending (trimmed, or its task
# ended) is dropped from the pending list instead: Redis 7 does so by itself,
# Redis 6.2 claims it again and again (each claim making it look freshly held),
# and a pending list that says a lost entry is held keeps the reconciler from
# re-enqueueing its task. So is an entry that names no task. KEYS: queue;
# ARGV: group, consumer, idle (ms), cursor. Returns {next cursor[, entry id,
# task id]}.
_RECLAIM = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', 1, 'JUSTID')
for _, id in ipairs(reply[2]) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
  local task = nil
  if entry then
    local fields = entry[2]
    for f = 1, #fields, 2 do
      if fields[f] == 'task' then task = fields[f + 1] end
    end
  end
  if task then return {reply[1], id, task} end
  redis.call('XACK', KEYS[1], ARGV[1], id)
  if entry then redis.call('XDEL', KEYS[1], id) end
end
return {reply[1]}
"""

# Re-enqueue the tasks of a batch that are unfinished but lost their queue entry
# (an XTRIM, a Redis restored from an older file), unless a worker still has
# them: the lease of a running one is live (it is heartbeating the task and will
# finish it), or a pending one's entry is still in the consumer group's pending
# list, claimed less than a lease ago (a worker read it and is about to start
# it: re-enqueued, a second worker would start it too, and the two would run at
# once). An entry claimed longer ago than that is presumed abandoned, as by the
# scan for abandoned entries, and dropped from the pending list here.
# A running task with a lapsed lease is pending again, like a reclaimed one: its
# attempt count stands (the lost attempt counts), the next start takes a new
# attempt, and the old attempt's writes are refused from now on. Keeps the open
# index in step on the way: unfinished tasks in, ended or deleted ones out.
# KEYS: queue, open index, then one record per task; ARGV: PENDING, RUNNING,
# the consumer group, the lease (ms), then the task ids. Returns {task id,
# status it had, ...} of those re-enqueued.
_REQUEUE_LOST = (
    _SERVER_MS
    + """
local pending, running = tonumber(ARGV[1]), tonumber(ARGV[2])
local group, lease_ms = ARGV[3], tonumber(ARGV[4])
local requeued = {}
for i = 3, #KEYS do
  local id = ARGV[i + 2]
  local status = tonumber(redis.call('HGET', KEYS[i], 'status') or '0')
  if status ~= pending and status ~= running then
    redis.call('SREM', KEYS[2], id)
  else
    redis.call('SADD', KEYS[2], id)
    local entry = redis.call('HGET', KEYS[i], 'entry')
    local known = entry and entry ~= ''
    local queued = known and #redis.call('XRANGE', KEYS[1], entry, entry) > 0
    local leased = status == running
      and tonumber(redis.call('HGET', KEYS[i], 'lease_until') or '0') > server_ms
    local held = false
    if known and not queued and status == pending then
      -- {{id, consumer, idle ms, deliveries}} while a worker holds the entry (an
      -- error if the group went with the stream: then nobody holds it).
      local claims = redis.pcall('XPENDING', KEYS[1], group, entry, entry, 1)
      local claim = type(claims) == 'table' and not claims.err and claims[1]
      held = claim and tonumber(claim[3]) < lease_ms or false
    end
    if not queued and not leased and not held then
      if known then redis.call('XACK', KEYS[1], group, entry) end
      entry = redis.call('XADD', KEYS[1], '*', 'task', id)
      redis.call('HSET', KEYS[i], 'entry', entry, 'status', pending)
      requeued[#requeued + 1] = id
      requeued[#requeued + 1] = tostring(status)
    end
  end
end
return requeued
"""
)

# The depth is the number of unfinished tasks, which the open index holds (submit
# and finish change both in one script). Returns {depth before, depth now}.
_RECOUNT_DEPTH = """
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
local open = redis.call('SCARD', KEYS[2])
if before ~= open then redis.call('SET', KEYS[1], open) end
return {before, open}
"""

# What the queue gauges show (tasks/metrics.py), in one round trip: the depth
# counter, the dead-letter stream's length, and the age of the oldest entry no
# worker has read yet (the consumer group's last-delivered id onwards; 0 if
# none waits). KEYS: depth, queue, dead letters; ARGV: the consumer group.
_QUEUE_GAUGES = (
    _SERVER_MS
    + """
local depth = tonumber(redis.call('GET', KEYS[1]) or '0')
local dead = redis.call('XLEN', KEYS[3])
local waiting_ms = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local after = '0-0'
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local name, delivered
    for f = 1, #group, 2 do
      if group[f] == 'name' then name = group[f + 1] end
      if group[f] == 'last-delivered-id' then delivered = group[f + 1] end
    end
    if name == ARGV[1] then after = delivered end
  end
  local oldest = redis.call('XRANGE', KEYS[2], '(' .. after, '+', 'COUNT', 1)[1]
  if oldest then
    local enqueued_ms = tonumber(string.match(oldest[1], '^(%d+)'))
    waiting_ms = math.max(0, server_ms - enqueued_ms)
  end
end
return {depth, dead, waiting_ms}
"""
)

# Extend the reconcile turn, if it is still the caller's.
_KEEP_TURN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_REQUEST_CANCEL = """
local status = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if status == 2 then redis.call('HSET', KEYS[1], 'cancel', 1) end
return status
"""


def record_id(task_id: str, tenant: str | None = None) -> str:
    """The id a task is stored and queued under: its own for the default tenant,
    `tenant/task_id` for any other (the caller's, unless given). Two tenants may
    choose the same task id; their tasks never meet — a submit, read, watch or
    cancel in one tenant cannot find, conflict with or replay the other's."""
    if TENANT_SEPARATOR in task_id:  # callers validate ids; never let one name a tenant
        raise ValueError(f"a task id cannot contain {TENANT_SEPARATOR!r}: {task_id[:80]!r}")
    tenant = principals.current().tenant if tenant is None else tenant
    return task_id if tenant == DEFAULT_TENANT else f"{tenant}{TENANT_SEPARATOR}{task_id}"


def public_task_id(task_id: str) -> str:
    """The id the task's owner knows it by, from its record id."""
    return task_id.rpartition(TENANT_SEPARATOR)[2]


class StaleAttempt(Exception):
    """This worker's attempt was superseded (its lease expired and another took over)."""


@dataclass(frozen=True)
class Started:
    attempt: int
    last_sequence: int
    spec: task_pb2.TaskSpec
    cancel_requested: bool
    principal: principal_pb2.Principal


@dataclass(frozen=True)
class Claimed:
    """A queue entry this worker now holds, and the task it stands for."""

    entry_id: bytes  # opaque: handed back to the store (give_back, ack_orphan)
    task_id: str


@dataclass(frozen=True)
class Requeued:
    """A task the reconciler put back on the queue, and the status it had then."""

    task_id: str
    status: int  # PENDING (never claimed again) or RUNNING (its worker gone)


@dataclass(frozen=True)
class DepthRecount:
    before: int
    after: int


@dataclass(frozen=True)
class QueueGauges:
    """What an agent's queue looks like now (for its metrics)."""

    depth: int  # unfinished tasks: pending and running
    dead_letters: int  # entries of the dead-letter stream
    oldest_pending_seconds: float  # how long the oldest unclaimed task has waited; 0: none


@dataclass(frozen=True)
class Sweep:
    """One step of the scan for abandoned entries."""

    claimed: Claimed | None
    # Where the next step of the scan starts (opaque, for `reclaim_abandoned`).
    cursor: str
    # A whole pass over the pending entries ended without taking one: the
    # next pass can wait (abandoned entries wait out a lease anyway).
    complete: bool


# Stream ids, `<milliseconds>-<sequence>`. Event streams use `0-<event sequence>`.
StreamId = tuple[int, int]
StreamEntry = tuple[bytes, dict[bytes, bytes]]


def _stream_entries(reply: StreamRangeResponse | None) -> list[StreamEntry]:
    """A stream's entries as XRANGE or XREAD give them to our clients.

    redis-py types an entry for every client and command alike: its id and
    fields `bytes | str` (str for clients that decode replies, which ours
    never do: see `redis_client.as_bytes`), and both None (for an entry
    XAUTOCLAIM found deleted, which XRANGE and XREAD never report). So the
    type is known here, and cast: no copy of every entry on the watch path.
    """
    return cast(list[StreamEntry], reply or [])


def streams_read(
    reply: XReadResponse | XReadGroupResponse | None,
) -> list[tuple[str, list[StreamEntry]]]:
    """XREAD's (or XREADGROUP's) reply: each stream read, by key, with its entries."""
    # RESP2's list of [key, entries], the protocol our clients speak; redis-py's
    # type has RESP3's mapping too.
    assert not isinstance(reply, dict)
    return [(as_text(key), _stream_entries(entries)) for key, entries in reply or ()]


def parse_id(entry_id: bytes | str) -> StreamId:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _event_id(sequence: int) -> str:
    """The id of a task's event `sequence` in its event stream."""
    return format_id((0, sequence))


def _decode_events(entries: Sequence[StreamEntry]) -> list[step_event_pb2.StepEvent]:
    """Event stream entries as StepEvents. An event's `sequence` is its entry's
    (`0-<sequence>`): the append and finish scripts add events in their
    numbering, on from the task's last sequence."""
    return [step_event_pb2.StepEvent.FromString(fields[b"e"]) for _id, fields in entries]


class EventSubscription:
    """A watcher's live events of one task, from the process's one `EventFeed`.

    Made by `TaskStore.subscribe_events`. Like the feed's own subscription it
    delivers what comes after `start`, the sequence the feed had reached when
    it was made (the events up to it are the watcher's to read with
    `read_events`), but in sequences and StepEvents: the feed's stream key and
    entry ids stay inside the store. `next` raises `Lagged` (from the feed)
    when the watcher fell too far behind; `close` when done, always.
    """

    def __init__(self, feed: EventFeed, key: str, after: int) -> None:
        self._feed = feed
        self._subscription: Subscription = feed.subscribe(key, _event_id(after))
        self.start = self._subscription.start[1]

    async def next(self, timeout: float) -> list[step_event_pb2.StepEvent]:
        """The next delivered events; [] after `timeout`."""
        return _decode_events(await self._subscription.next(timeout))

    def close(self) -> None:
        self._feed.unsubscribe(self._subscription)


def now_ms() -> int:
    return int(time.time() * 1000)


def _timestamp(ms: bytes | str | None) -> timestamp_pb2.Timestamp | None:
    if not ms:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(int(ms))
    return stamp


def fingerprint(spec: task_pb2.TaskSpec) -> str:
    """Identity of a request as the client sent it (before defaults are filled in)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def delegation_fingerprint(spec: task_pb2.TaskSpec) -> str:
    """Identity of a delegation, for a sub-task (lineage with a parent); "" otherwise.

    The request as sent, but without what the registry recomputes each time it
    runs the same delegation: the wall-clock `deadline` (from the caller's time
    left) and the `token_budget` (the caller's share left), and the trace
    context. Same agent (this queue), prompt, session, lineage, metadata and
    step limit under the same task id: the same delegation, replayed.
    """
    if not spec.lineage.parent_task_id:
        return ""
    identity = task_pb2.TaskSpec()
    identity.CopyFrom(spec)
    for name in ("deadline", "token_budget", "trace_context"):
        identity.ClearField(name)
    return hashlib.sha256(identity.SerializeToString(deterministic=True)).hexdigest()


class TaskStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        agent: str,
        queue_limit: int,
        record_ttl_seconds: int,
        event_retention_seconds: int,
    ) -> None:
        self._redis = redis
        self.agent = agent
        self._prefix = f"{key_prefix}"
        self._queue_key = f"{key_prefix}:queue:{agent}"
        self._depth_key = f"{self._queue_key}:depth"
        self._dead_key = f"{self._queue_key}:dead"
        self._open_key = f"{self._queue_key}:open"
        self._reconcile_key = f"{self._queue_key}:reconciler"
        self._queue_limit = queue_limit
        self._record_ttl_ms = record_ttl_seconds * 1000
        self._event_ttl_ms = event_retention_seconds * 1000
        self._submit = redis.register_script(_SUBMIT)
        self._start = redis.register_script(_START)
        self._append = redis.register_script(_APPEND)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_REQUEST_CANCEL)
        self._hand_back = redis.register_script(_HAND_BACK)
        self._reclaim = redis.register_script(_RECLAIM)
        self._requeue_lost = redis.register_script(_REQUEUE_LOST)
        self._recount_depth = redis.register_script(_RECOUNT_DEPTH)
        self._keep_turn = redis.register_script(_KEEP_TURN)
        self._queue_gauges = redis.register_script(_QUEUE_GAUGES)

    def _task_key(self, task_id: str) -> str:
        """`task_id` is a record id (`record_id`): the tenant's key space, the task's id."""
        tenant, _, public_id = task_id.rpartition(TENANT_SEPARATOR)
        prefix = tenant_prefix(self._prefix, tenant or DEFAULT_TENANT)
        return f"{prefix}:task:{self.agent}:{public_id}"

    def _events_key(self, task_id: str) -> str:
        return f"{self._task_key(task_id)}:events"

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._queue_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(
        self,
        spec: task_pb2.TaskSpec,
        fp: str,
        delegation: str = "",
        owner: principal_pb2.Principal | None = None,
    ) -> bool:
        """Record and queue a task atomically; False if it was already there: the
        same request (`fp`), or the same delegation (`delegation`, if not empty).
        The task belongs to `owner`'s tenant (its record id says which) and runs
        for `owner` (none: the mesh's)."""
        owner = owner or principal_pb2.Principal()
        task_id = record_id(spec.task_id, owner.tenant or DEFAULT_TENANT)
        outcome: list[bytes] = await self._submit(
            keys=[self._task_key(task_id), self._queue_key, self._depth_key, self._open_key],
            args=[
                spec.SerializeToString(),
                fp,
                now_ms(),
                self._queue_limit,
                task_id,
                PENDING,
                delegation,
                owner.SerializeToString(),
            ],
        )
        verdict = outcome[0].decode()
        if verdict == "conflict":
            raise FailedPrecondition(
                f"task {spec.task_id!r} was already submitted with a different request; "
                "choose a new task_id",
                reason=Reason.TASK_ID_REUSED,
            )
        if verdict == "full":
            raise ResourceExhausted(
                f"the {self.agent} queue is full ({outcome[1].decode()} unfinished tasks); "
                "retry later",
                reason=Reason.QUEUE_FULL,
            )
        return verdict == "created"

    async def get(self, task_id: str) -> task_pb2.Task:
        fields = await self._redis.hgetall(self._task_key(task_id))
        if not fields:
            raise NotFound(
                f"task {public_task_id(task_id)!r} is not known to agent "
                f"{self.agent!r} "
                "(never submitted, or expired)",
                reason=Reason.TASK_NOT_FOUND,
            )
        spec = task_pb2.TaskSpec.FromString(as_bytes(fields[b"spec"]))
        task = task_pb2.Task(
            task_id=spec.task_id,
            agent=self.agent,
            # The number of a TaskStatus (as the scripts stored it): the stubs' TaskStatus
            # is an int at run time, and no constructor makes one from a number.
            status=cast(task_pb2.TaskStatus, int(fields[b"status"])),
            attempts=int(fields.get(b"attempt", 0)),
            last_sequence=int(fields.get(b"seq", 0)),
            cancel_requested=fields.get(b"cancel") == b"1",
            session_id=spec.session_id,
            lineage=spec.lineage,
        )
        if spec.HasField("deadline"):
            task.deadline.CopyFrom(spec.deadline)
        if b"result" in fields:
            task.result.ParseFromString(as_bytes(fields[b"result"]))
        if fields.get(b"principal"):
            task.principal.ParseFromString(as_bytes(fields[b"principal"]))
        for name, key in (
            ("created_at", b"created_ms"),
            ("started_at", b"started_ms"),
            ("finished_at", b"finished_ms"),
        ):
            stamp = _timestamp(fields.get(key))
            if stamp is not None:
                getattr(task, name).CopyFrom(stamp)
        return task

    async def request_cancel(self, task_id: str) -> int:
        """Flag a running task; returns its status at the time (0 if unknown)."""
        return int(await self._cancel(keys=[self._task_key(task_id)]))

    async def start(
        self, task_id: str, consumer: str, lease_ms: int, max_attempts: int
    ) -> Started | str:
        """Begin a new attempt, or say why not ('missing', 'ended', 'exhausted')."""
        outcome: list[bytes] = await self._start(
            keys=[self._task_key(task_id)],
            args=[consumer, now_ms(), lease_ms, max_attempts, RUNNING],
        )
        verdict = outcome[0].decode()
        if verdict != "run":
            return verdict
        return Started(
            attempt=int(outcome[1]),
            last_sequence=int(outcome[2]),
            spec=task_pb2.TaskSpec.FromString(outcome[3]),
            cancel_requested=outcome[4] == b"1",
            principal=principal_pb2.Principal.FromString(outcome[5]),
        )

    async def append_events(
        self, task_id: str, attempt: int, events: list[step_event_pb2.StepEvent]
    ) -> None:
        """Append consecutive events in one round trip; raises if the attempt is stale."""
        outcome = await self._append(
            keys=[self._task_key(task_id), self._events_key(task_id)],
            args=[
                attempt,
                RUNNING,
                events[0].sequence,
                *(event.SerializeToString() for event in events),
            ],
        )
        if outcome != 1:
            raise StaleAttempt(f"attempt {attempt} of {task_id} no longer owns the task")

    async def heartbeat(self, task_id: str, attempt: int, consumer: str, lease_ms: int) -> None:
        """Renew the lease; raises StaleAttempt if the attempt no longer owns the task."""
        alive = await self._heartbeat(
            keys=[self._task_key(task_id), self._queue_key],
            args=[attempt, lease_ms, consumer, GROUP, RUNNING],
        )
        if not alive:
            raise StaleAttempt(f"attempt {attempt} of {task_id} no longer owns the task")

    async def finish(
        self,
        task_id: str,
        attempt: int | None,
        result: task_pb2.TaskResult,
        final_event: step_event_pb2.StepEvent,
        *,
        dead_letter_reason: str = "",
        only_if_pending: bool = False,
    ) -> bool:
        """Record the end once. False if the task had already ended (or, for an
        attempt, if that attempt is stale)."""
        outcome: int = await self._finish(
            keys=[
                self._task_key(task_id),
                self._events_key(task_id),
                self._queue_key,
                self._depth_key,
                self._dead_key,
                self._open_key,
            ],
            args=[
                "" if attempt is None else attempt,
                result.status,
                result.SerializeToString(),
                final_event.SerializeToString(),
                final_event.sequence,
                now_ms(),
                self._record_ttl_ms,
                self._event_ttl_ms,
                GROUP,
                dead_letter_reason,
                task_id,
                PENDING if only_if_pending else "",
            ],
        )
        if outcome == -1:
            raise StaleAttempt(f"events of {task_id} moved on; retry with the new sequence")
        return outcome == 1

    async def cancel_flag(self, task_id: str) -> bool:
        """Whether a cancel of the running task was requested (the one flag read)."""
        return await self._redis.hget(self._task_key(task_id), "cancel") == b"1"

    async def exists(self, task_id: str) -> bool:
        """Whether the task's record is still there (not expired)."""
        return bool(await self._redis.exists(self._task_key(task_id)))

    async def last_sequence(self, task_id: str) -> int:
        return int(await self._redis.hget(self._task_key(task_id), "seq") or 0)

    async def hand_back(self, task_id: str, attempt: int, consumer: str, lease_ms: int) -> bool:
        return bool(
            await self._hand_back(
                keys=[self._task_key(task_id), self._queue_key],
                args=[attempt, consumer, GROUP, RUNNING, PENDING, lease_ms * 10],
            )
        )

    async def ack_orphan(self, entry_id: bytes | str) -> None:
        """Drop a queue entry whose task already ended or expired."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._queue_key, GROUP, entry_id)
            pipe.xdel(self._queue_key, entry_id)
            await pipe.execute()

    # -- claiming queue entries (the worker) --

    async def claim_new(self, consumer: str, block_ms: int) -> Claimed | None:
        """Take the next entry no worker has seen yet, waiting up to `block_ms`."""
        fresh = await self._redis.xreadgroup(
            GROUP, consumer, {self._queue_key: ">"}, count=1, block=block_ms
        )
        for _stream, entries in streams_read(fresh):
            for entry_id, fields in entries:
                return Claimed(entry_id, fields[b"task"].decode())
        return None

    async def reclaim_abandoned(self, consumer: str, idle_ms: int, cursor: str | None) -> Sweep:
        """Take over one entry idle longer than `idle_ms` (its worker died or
        stalled), scanning on from `cursor` (None: from the beginning). Each
        call looks at a few pending entries only, and always starting from the
        beginning could starve the ones further on. An entry deleted while
        pending, or naming no task, is dropped on the way (see `_RECLAIM`)."""
        reply: list[bytes] = await self._reclaim(
            keys=[self._queue_key], args=[GROUP, consumer, idle_ms, cursor or "0-0"]
        )
        text = reply[0].decode()
        if len(reply) == 3:
            return Sweep(Claimed(reply[1], reply[2].decode()), text, complete=False)
        return Sweep(None, text, complete=text in ("0-0", "0"))

    async def give_back(self, entry_id: bytes, consumer: str, lease_ms: int) -> None:
        """Make a claimed, unstarted entry reclaimable by another worker at once:
        its idle time is pushed past the lease, as `hand_back` does."""
        await self._redis.xclaim(
            self._queue_key, GROUP, consumer, 0, [entry_id], idle=lease_ms * 10, justid=True
        )

    # -- reconciling the queue with the task records (one worker at a time) --

    async def take_reconcile_turn(self, token: str, hold_ms: int) -> bool:
        """Take the agent's reconcile turn for `hold_ms`; False if another holds it.

        A lock with expiry: a holder that dies frees it by itself."""
        return bool(await self._redis.set(self._reconcile_key, token, nx=True, px=hold_ms))

    async def keep_reconcile_turn(self, token: str, hold_ms: int) -> bool:
        """Hold the turn `hold_ms` from now; False if it expired (and may be another's)."""
        return bool(await self._keep_turn(keys=[self._reconcile_key], args=[token, hold_ms]))

    async def open_task_ids(self, batch: int) -> AsyncIterator[list[str]]:
        """Ids of the tasks that may be unfinished, about `batch` at a time (an id
        may come more than once): the open index, then the tasks that have a queue
        entry — which covers tasks submitted before the index existed."""
        cursor = 0
        while True:
            cursor, members = await self._redis.sscan(self._open_key, cursor, count=batch)
            if members:
                yield [as_text(member) for member in members]
            if cursor == 0:
                break
        after = "-"
        while True:
            entries = _stream_entries(
                await self._redis.xrange(self._queue_key, min=after, count=batch)
            )
            ids = [fields[b"task"].decode() for _id, fields in entries if b"task" in fields]
            if ids:
                yield ids
            if len(entries) < batch:
                break
            after = f"({as_text(entries[-1][0])}"

    async def requeue_lost(self, task_ids: Sequence[str], lease_ms: int) -> list[Requeued]:
        """Put back on the queue those of `task_ids` whose record says pending or
        running but that have no queue entry, except those a worker still has: a
        running one with a live lease, a pending one whose lost entry a worker
        claimed less than `lease_ms` ago and has yet to start.

        Atomic per batch (one script): no start, heartbeat or finish runs in the
        middle of it. A start is not atomic with its claim, though (the worker
        reads the entry, then starts the task), hence the check of the claimed
        entries. Idempotent: a task it re-enqueued has an entry again."""
        if not task_ids:
            return []
        reply: list[bytes] = await self._requeue_lost(
            keys=[
                self._queue_key,
                self._open_key,
                *(self._task_key(task_id) for task_id in task_ids),
            ],
            args=[PENDING, RUNNING, GROUP, lease_ms, *task_ids],
        )
        return [
            Requeued(task_id=reply[i].decode(), status=int(reply[i + 1]))
            for i in range(0, len(reply), 2)
        ]

    async def recount_depth(self) -> DepthRecount:
        """Set the depth counter to the number of unfinished tasks (the open index,
        as `requeue_lost` leaves it)."""
        before, after = await self._recount_depth(keys=[self._depth_key, self._open_key])
        return DepthRecount(before=int(before), after=int(after))

    async def queue_gauges(self) -> QueueGauges:
        """Depth, dead letters and the oldest unclaimed task's wait, in one round trip."""
        depth, dead, waiting_ms = await self._queue_gauges(
            keys=[self._depth_key, self._queue_key, self._dead_key], args=[GROUP]
        )
        return QueueGauges(
            depth=int(depth), dead_letters=int(dead), oldest_pending_seconds=int(waiting_ms) / 1000
        )

    # -- reading a task's events (the watch path) --

    async def last_event(self, task_id: str) -> step_event_pb2.StepEvent | None:
        """The task's latest event; None if its events are gone (past retention)."""
        last = _stream_entries(await self._redis.xrevrange(self._events_key(task_id), count=1))
        return _decode_events(last)[0] if last else None

    async def first_event_sequence(self, task_id: str) -> int | None:
        """The sequence of the earliest event still kept; None if none is."""
        first = _stream_entries(await self._redis.xrange(self._events_key(task_id), count=1))
        return parse_id(first[0][0])[1] if first else None

    async def read_events(
        self, task_id: str, after: int, upto: int, count: int
    ) -> list[step_event_pb2.StepEvent]:
        """Up to `count` events with sequences in (after, upto], in order."""
        entries = await self._redis.xrange(
            self._events_key(task_id),
            min=f"({_event_id(after)}",
            max=_event_id(upto),
            count=count,
        )
        return _decode_events(_stream_entries(entries))

    def subscribe_events(self, feed: EventFeed, task_id: str, after: int) -> EventSubscription:
        """Live events of the task after `after`, through the process's event feed.

        The store subscribes, rather than handing the watcher a stream key: the
        feed stays a plain multiplexer of Redis streams (keys, entry ids, raw
        entries), and what a task's stream is — its key, ids `0-<sequence>`,
        the serialized event in field `e` — stays in this module with the rest
        of the layout. The watcher gets sequences and StepEvents, as from
        `read_events`, so the gap it reads itself and the feed's deliveries
        look alike."""
        return EventSubscription(feed, self._events_key(task_id), after)
