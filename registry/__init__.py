"""The Tool Registry: the one authority on tool contracts and tool invocation.

Agents learn which tools exist from it and invoke every tool through it, so
arguments are checked against the published JSON Schema before any backend
runs, results are checked against the output schema before any model sees
them, and side effects are deduplicated by idempotency key.
"""
