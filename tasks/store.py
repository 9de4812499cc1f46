"""`TaskStore`: task records, event streams and the queue, on Redis.

Per agent `a` and task `t` (all keys under the configured prefix):

- `task:a:t` — hash: the normalized spec, request fingerprint, status,
  attempt, lease, cancel flag, last event sequence, result, timestamps;
- `task:a:t:events` — stream of serialized StepEvents with ids `0-<sequence>`,
  so "everything after sequence N" is a plain XREAD from `0-N`;
- `queue:a` — stream with consumer group `workers`; one entry per unfinished
  task, deleted when the task ends, so its length is the backlog;
- `queue:a:depth` — count of unfinished tasks, for backpressure;
- `queue:a:dead` — dead-letter stream of tasks that kept killing workers.

Every transition is one Lua script, so it is atomic, and every write a worker
makes carries its attempt number: a stale attempt (a worker that stalled past
its lease while another took over) is refused.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from redis.exceptions import ResponseError

from agentplex.runtime.errors import FailedPrecondition, NotFound, ResourceExhausted
from agentplex.v1 import step_event_pb2, task_pb2

GROUP = "workers"

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
  'seq', 0, 'cancel', 0, 'created_ms', ARGV[3], 'entry', entry, 'delegation', ARGV[7])
redis.call('INCR', KEYS[3])
return {'created'}
"""

# Start (or restart, after a reclaim) an attempt. Returns the new attempt and
# the last event sequence, or why the entry should just be acknowledged.
_START = """
local status = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if status == 0 then return {'missing'} end
if status >= 3 then return {'ended'} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
-- Attempts a draining worker handed back do not count towards dead-lettering.
local used = attempt - tonumber(redis.call('HGET', KEYS[1], 'handed_back') or '0')
if used >= tonumber(ARGV[4]) then return {'exhausted', tostring(used)} end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'owner', ARGV[1],
  'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if redis.call('HEXISTS', KEYS[1], 'started_ms') == 0 then
  redis.call('HSET', KEYS[1], 'started_ms', ARGV[2])
end
return {'run', tostring(attempt), redis.call('HGET', KEYS[1], 'seq'),
  redis.call('HGET', KEYS[1], 'spec'), redis.call('HGET', KEYS[1], 'cancel')}
"""

# Append one event of the current attempt; 0 if the attempt is stale.
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
# looks at). Returns {alive, cancel_requested}.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1]
   or tonumber(redis.call('HGET', KEYS[1], 'status')) ~= tonumber(ARGV[5]) then
  return {0, 0}
end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', KEYS[2], ARGV[4], ARGV[3], 0, entry, 'JUSTID')
return {1, tonumber(redis.call('HGET', KEYS[1], 'cancel'))}
"""

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

_REQUEST_CANCEL = """
local status = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if status == 2 then redis.call('HSET', KEYS[1], 'cancel', 1) end
return status
"""


class StaleAttempt(Exception):
    """This worker's attempt was superseded (its lease expired and another took over)."""


@dataclass(frozen=True)
class Started:
    attempt: int
    last_sequence: int
    spec: task_pb2.TaskSpec
    cancel_requested: bool


def now_ms() -> int:
    return int(time.time() * 1000)


def _timestamp(ms: bytes | None) -> timestamp_pb2.Timestamp | None:
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
        self.redis = redis
        self.agent = agent
        self._prefix = f"{key_prefix}"
        self.queue_key = f"{key_prefix}:queue:{agent}"
        self.depth_key = f"{self.queue_key}:depth"
        self.dead_key = f"{self.queue_key}:dead"
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

    def task_key(self, task_id: str) -> str:
        return f"{self._prefix}:task:{self.agent}:{task_id}"

    def events_key(self, task_id: str) -> str:
        return f"{self.task_key(task_id)}:events"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.queue_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, spec: task_pb2.TaskSpec, fp: str, delegation: str = "") -> bool:
        """Record and queue a task atomically; False if it was already there: the
        same request (`fp`), or the same delegation (`delegation`, if not empty)."""
        outcome = await self._submit(
            keys=[self.task_key(spec.task_id), self.queue_key, self.depth_key],
            args=[
                spec.SerializeToString(),
                fp,
                now_ms(),
                self._queue_limit,
                spec.task_id,
                PENDING,
                delegation,
            ],
        )
        verdict = outcome[0].decode()
        if verdict == "conflict":
            raise FailedPrecondition(
                f"task {spec.task_id!r} was already submitted with a different request; "
                "choose a new task_id",
                reason="TASK_ID_REUSED",
            )
        if verdict == "full":
            raise ResourceExhausted(
                f"the {self.agent} queue is full ({outcome[1].decode()} unfinished tasks); "
                "retry later",
                reason="QUEUE_FULL",
            )
        return verdict == "created"

    async def get(self, task_id: str) -> task_pb2.Task:
        fields = await self.redis.hgetall(self.task_key(task_id))
        if not fields:
            raise NotFound(
                f"task {task_id!r} is not known to agent {self.agent!r} "
                "(never submitted, or expired)",
                reason="TASK_NOT_FOUND",
            )
        spec = task_pb2.TaskSpec.FromString(fields[b"spec"])
        task = task_pb2.Task(
            task_id=task_id,
            agent=self.agent,
            status=int(fields[b"status"]),
            attempts=int(fields.get(b"attempt", 0)),
            last_sequence=int(fields.get(b"seq", 0)),
            cancel_requested=fields.get(b"cancel") == b"1",
            session_id=spec.session_id,
            lineage=spec.lineage,
        )
        if spec.HasField("deadline"):
            task.deadline.CopyFrom(spec.deadline)
        if b"result" in fields:
            task.result.ParseFromString(fields[b"result"])
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
        return int(await self._cancel(keys=[self.task_key(task_id)]))

    async def start(
        self, task_id: str, consumer: str, lease_ms: int, max_attempts: int
    ) -> Started | str:
        """Begin a new attempt, or say why not ('missing', 'ended', 'exhausted')."""
        outcome = await self._start(
            keys=[self.task_key(task_id)],
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
        )

    async def append_events(
        self, task_id: str, attempt: int, events: list[step_event_pb2.StepEvent]
    ) -> None:
        """Append consecutive events in one round trip; raises if the attempt is stale."""
        outcome = await self._append(
            keys=[self.task_key(task_id), self.events_key(task_id)],
            args=[
                attempt,
                RUNNING,
                events[0].sequence,
                *(event.SerializeToString() for event in events),
            ],
        )
        if outcome != 1:
            raise StaleAttempt(f"attempt {attempt} of {task_id} no longer owns the task")

    async def heartbeat(self, task_id: str, attempt: int, consumer: str, lease_ms: int) -> bool:
        """Renew the lease; returns whether a cancel was requested. Raises if stale."""
        alive, cancel = await self._heartbeat(
            keys=[self.task_key(task_id), self.queue_key],
            args=[attempt, now_ms() + lease_ms, consumer, GROUP, RUNNING],
        )
        if not alive:
            raise StaleAttempt(f"attempt {attempt} of {task_id} no longer owns the task")
        return bool(cancel)

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
        outcome = await self._finish(
            keys=[
                self.task_key(task_id),
                self.events_key(task_id),
                self.queue_key,
                self.depth_key,
                self.dead_key,
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
        return await self.redis.hget(self.task_key(task_id), "cancel") == b"1"

    async def last_sequence(self, task_id: str) -> int:
        return int(await self.redis.hget(self.task_key(task_id), "seq") or 0)

    async def hand_back(self, task_id: str, attempt: int, consumer: str, lease_ms: int) -> bool:
        return bool(
            await self._hand_back(
                keys=[self.task_key(task_id), self.queue_key],
                args=[attempt, consumer, GROUP, RUNNING, PENDING, lease_ms * 10],
            )
        )

    async def ack_orphan(self, entry_id: bytes | str) -> None:
        """Drop a queue entry whose task already ended or expired."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.queue_key, GROUP, entry_id)
            pipe.xdel(self.queue_key, entry_id)
            await pipe.execute()
