"""Timing helpers: latency samples, percentiles, closed-loop throughput."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return cls(len(ordered), statistics.median(ordered) * 1000, p99 * 1000)


async def latency(call: Callable[[], Awaitable[object]], count: int, warmup: int = 5) -> Latency:
    """Sequential calls, one in flight."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return Latency.of(samples)


async def interleaved(
    calls: Mapping[str, Callable[[], Awaitable[object]]], count: int, warmup: int = 5
) -> dict[str, Latency]:
    """Sequential calls, one in flight, taking turns (one of each per round).

    Paths compared with each other see the same moments of a shared machine,
    so drift between them cancels instead of landing on whichever ran last.
    """
    for _ in range(warmup):
        for call in calls.values():
            await call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            started = time.perf_counter()
            await call()
            samples[name].append(time.perf_counter() - started)
    return {name: Latency.of(seconds) for name, seconds in samples.items()}


async def in_blocks(
    calls: Mapping[str, Callable[[], Awaitable[object]]],
    counts: Mapping[str, int],
    blocks: int = 6,
    warmup: int = 5,
) -> dict[str, Latency]:
    """Each path's calls back to back in blocks, the paths taking turns block by block.

    Call-by-call turns (`interleaved`) suit paths of similar cost; a cheap floor
    call right after an expensive task call instead pays for the task's wake-ups
    and after-work, which is not the floor. Warm blocks of each, alternated, keep
    every path warm and still spread the machine's drift over all of them.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for block in range(blocks):
        for name, call in order if block % 2 == 0 else order[::-1]:
            for _ in range(warmup):
                await call()
            for _ in range(max(1, counts[name] // blocks)):
                started = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - started)
    return {name: Latency.of(seconds) for name, seconds in samples.items()}


async def throughput(call: Callable[[], Awaitable[object]], count: int, in_flight: int) -> float:
    """Calls per second with `in_flight` concurrent callers, `count` calls in all."""
    remaining = count

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return count / (time.perf_counter() - started)
