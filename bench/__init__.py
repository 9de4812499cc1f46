"""Benchmarks: the mesh's own cost, measured against its physical floor in the same run.

`python -m agentplex.bench` runs every scenario and writes docs/BENCHMARKS.md.
Absolute times on a shared 2-core machine drift, so every figure that matters
is a ratio to a baseline measured minutes apart on the same machine.
"""
