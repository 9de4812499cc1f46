"""Durable tasks: the per-agent queue on Redis Streams, its workers, and the
task API (submit, get, cancel, watch) that agents serve.

A submitted task is recorded and queued in one atomic step; workers claim it
through a consumer group, renew a lease while they run it, and record the
result exactly once. Every state change is a Lua script on Redis, fenced by
the attempt number, so a worker that was presumed dead cannot overwrite the
work of the one that took over.
"""
