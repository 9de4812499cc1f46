"""The gateway when replicas go away: rolling restarts under load lose no call, a stream
that outlives its replica's grace period ends retryable, and a frozen agent (SIGSTOP)
is cut off by keepalive — real Envoy, real agent processes, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import pytest

from agentplex.gateway import resources
from agentplex.runtime import errors
from agentplex.runtime.clients import Keepalive, open_channel
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2

log = logging.getLogger(__name__)

AGENT = "agent.assistant"
# Keepalive small enough for a test, as small as the settings allow (1 s each).
FAST_KEEPALIVE = Keepalive(seconds=1.0, timeout_seconds=1.0)
# On top of a computed detection bound: the reset travelling through Envoy and the
# caller's event loop, on a shared machine. Not part of what is measured.
SLACK_SECONDS = 1.5
# A model call long enough that a frozen agent is still mid-task when it is found.
THINKING_SECONDS = "60"


def stub_for(channel: grpc.aio.Channel) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(channel)


async def host_counter(gateway, address: str, name: str) -> int:
    return int((await gateway.host_stats(AGENT)).get(address, {}).get(name, "0"))


async def routable(gateway, address: str) -> bool:
    """Envoy has the replica and its health checks pass."""
    stats = (await gateway.host_stats(AGENT)).get(address)
    return stats is not None and "failed_active_hc" not in stats.get("health_flags", "")


async def _landed_on(
    gateway, address: str, start: Callable[[int], Awaitable[bool]], attempts: int = 40
) -> None:
    """Call `start` until one of its calls is active on `address`.

    `start(before)` begins one call and returns once it is under way, or over (the
    other replica answered it at once); `before` is the replica's active-call count
    from just before. Envoy counts a call on its replica before the response starts.
    The balancer picks the less busy of two random replicas, so a call reaches a
    replica that already holds one a quarter of the time: hence the attempts."""
    for _ in range(attempts):
        before = await host_counter(gateway, address, "rq_active")
        if await start(before) and await host_counter(gateway, address, "rq_active") > before:
            return
    raise AssertionError(f"no call reached {address} in {attempts} attempts")


async def _active_above(gateway, address: str, before: int) -> bool:
    return await host_counter(gateway, address, "rq_active") > before


async def _drain(call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
    """Read a stream to its end (with `read`: a call started with it cannot be iterated)."""
    while await call.read() is not grpc.aio.EOF:
        pass


async def _ended_within(
    call: Awaitable[object], bound: float
) -> tuple[grpc.aio.AioRpcError, float]:
    """The error `call` ends with, and after how long; fails if it succeeds or outlasts
    the bound (plus slack)."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, timeout=bound + SLACK_SECONDS)
    return caught.value, time.monotonic() - started


# --- rolling restarts ---------------------------------------------------------------


@dataclass
class Load:
    """Clients calling through the gateway until told to stop (or a bound is reached)."""

    stub: agent_service_pb2_grpc.AgentServiceStub
    max_calls: int
    deadline: float  # monotonic
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    succeeded: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def running(self) -> bool:
        calls = sum(self.succeeded.values()) + len(self.errors)
        return (
            not self.stop.is_set() and calls < self.max_calls and time.monotonic() < self.deadline
        )

    async def unary(self, client: int) -> None:
        while self.running():
            try:
                reply = await self.stub.RunTask(
                    pb.RunTaskRequest(prompt="what is 17*23?"), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"RunTask[{client}]: {exc.code().name} {exc.details()}")
                continue
            if reply.result.status != task_pb2.TASK_STATUS_COMPLETED or "391" not in (
                reply.result.output
            ):
                self.errors.append(f"RunTask[{client}]: {reply.result}")
            else:
                self.succeeded["RunTask"] += 1

    async def streaming(self, client: int) -> None:
        while self.running():
            finals = []
            try:
                call = self.stub.StreamSteps(
                    pb.StreamStepsRequest(prompt="what is 6*7?"), timeout=30
                )
                async for reply in call:
                    if reply.event.WhichOneof("kind") == "final_result":
                        finals.append(reply.event.final_result.result)
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"StreamSteps[{client}]: {exc.code().name} {exc.details()}")
                continue
            if len(finals) != 1 or finals[0].status != task_pb2.TASK_STATUS_COMPLETED:
                self.errors.append(f"StreamSteps[{client}]: ended without its result: {finals}")
            else:
                self.succeeded["StreamSteps"] += 1


@pytest.mark.slow
async def test_restarting_a_replica_under_load_loses_no_call(
    start_gateway, mesh, agent_process, channel_to, eventually
) -> None:
    """Two replicas behind the gateway, one restarted three times (SIGTERM, exit, start,
    routed again) while unary and streaming clients call without pause: no client sees
    an error, and calls land on both replicas."""
    gateway = await start_gateway()
    options = gateway.control_plane.options
    # The drain the timeline asks for at this health check interval (0.5 s in tests).
    drain = resources.ejection_seconds(options) + 2 * options.health_check_interval_seconds
    assert resources.drain_fits(options, drain)
    replica_env = {
        "AGENTPLEX_DRAIN_SECONDS": str(drain),
        "AGENTPLEX_GRACE_SECONDS": "10",
        # Calls take a moment, so some are in flight whenever the replica is stopped.
        "AGENTPLEX_SCRIPTED_DELAY_SECONDS": "0.1",
    }
    steady = mesh.agents["assistant"]  # the in-process replica, never restarted
    replica = await agent_process("assistant", **replica_env)
    await eventually(lambda: routable(gateway, replica.address), timeout=30)

    load = Load(
        stub_for(channel_to(gateway.address)), max_calls=5000, deadline=time.monotonic() + 240
    )
    clients = [
        *(asyncio.create_task(load.unary(i)) for i in range(2)),
        *(asyncio.create_task(load.streaming(i)) for i in range(2)),
    ]
    restarts = 3
    served_by_restarted = []
    try:
        for restart in range(restarts):
            # stopped while it takes its share of the load, with calls in flight
            await eventually(
                partial(_busy, gateway, replica.address),
                timeout=30,
                message=f"replica {replica.address} never got busy",
            )
            served_by_restarted.append(await host_counter(gateway, replica.address, "rq_success"))
            stopped_at = time.monotonic()
            replica.process.send_signal(signal.SIGTERM)
            ejection = asyncio.create_task(_ejection(gateway, replica.address, stopped_at))
            code = await asyncio.wait_for(replica.process.wait(), timeout=drain + 30)
            exited = time.monotonic() - stopped_at
            assert code == 0, f"restart {restart}: the replica exited with {code}"
            ejected = ejection.result() if ejection.done() else None
            ejection.cancel()
            log.warning(
                "restart %d: SIGTERM -> ejected by the gateway after %s, exited after %.1fs",
                restart,
                f"{ejected:.2f}s" if ejected is not None else "(not seen)",
                exited,
            )
            replica = await agent_process("assistant", **replica_env)
            await eventually(
                partial(routable, gateway, replica.address),
                timeout=30,
                message=f"restart {restart}: the gateway never routed to the new replica",
            )
        await eventually(
            partial(_took_calls, gateway, replica.address),
            timeout=30,
            message="the last replica got no calls",
        )
        served_by_restarted.append(await host_counter(gateway, replica.address, "rq_success"))
    finally:
        load.stop.set()
        await asyncio.gather(*clients)

    steady_calls = await host_counter(gateway, steady, "rq_success")
    calls = sum(load.succeeded.values()) + len(load.errors)
    log.warning(
        "rolling restart: %d calls (%s), %d errors; per restarted replica %s, steady %d",
        calls,
        dict(load.succeeded),
        len(load.errors),
        served_by_restarted,
        steady_calls,
    )
    assert load.errors == []
    assert load.succeeded["RunTask"] > 0 and load.succeeded["StreamSteps"] > 0
    # every incarnation of the restarted replica served, and so did the other one
    assert len(served_by_restarted) == restarts + 1
    assert all(count > 0 for count in served_by_restarted), served_by_restarted
    assert steady_calls > 0


async def _took_calls(gateway, address: str) -> bool:
    return await host_counter(gateway, address, "rq_success") > 0


async def _busy(gateway, address: str) -> bool:
    """Has served a few calls and is running one now."""
    stats = (await gateway.host_stats(AGENT)).get(address, {})
    return int(stats.get("rq_success", "0")) >= 5 and int(stats.get("rq_active", "0")) > 0


async def _ejection(gateway, address: str, since: float) -> float | None:
    """When Envoy's health checks took a draining replica out (a measurement for the
    log), or None if it left the cluster first."""
    while True:
        stats = (await gateway.host_stats(AGENT)).get(address)
        if stats is None:
            return None
        if "failed_active_hc" in stats.get("health_flags", ""):
            return time.monotonic() - since
        await asyncio.sleep(0.05)


async def test_a_stream_that_outlives_the_grace_period_ends_retryable(
    gateway, agent_process, channel_to, eventually
) -> None:
    """A stream still running when its replica's grace period ends is not cut off mid-air:
    it ends with UNAVAILABLE (the server's own trailers, passed on by the gateway), which
    a client may retry."""
    grace = 1.0
    replica = await agent_process(
        "assistant",
        AGENTPLEX_SCRIPTED_DELAY_SECONDS=THINKING_SECONDS,
        AGENTPLEX_GRACE_SECONDS=str(grace),
    )
    await eventually(partial(routable, gateway, replica.address), timeout=30)
    stub = stub_for(channel_to(gateway.address))
    streams: list[grpc.aio.UnaryStreamCall[Any, Any]] = []

    async def start_stream(before: int) -> bool:
        call = stub.StreamSteps(pb.StreamStepsRequest(prompt="what is 6*7?"), timeout=120)
        await call.read()
        streams.append(call)
        return True

    await _landed_on(gateway, replica.address, start_stream)
    stream = streams.pop()
    await asyncio.gather(*(_drain(call) for call in streams))  # the other replica's

    replica.process.send_signal(signal.SIGTERM)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(_drain(stream), timeout=grace + 30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert await asyncio.wait_for(replica.process.wait(), timeout=30) == 0


# --- frozen agents ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_frozen_replica_fails_calls_through_the_gateway_within_the_keepalive_bound(
    start_gateway, agent_process, eventually
) -> None:
    """SIGSTOP keeps the TCP connection up (the kernel still acknowledges), so only an
    unanswered HTTP/2 PING tells: Envoy closes the connection within
    `keepalive_detection_seconds` and the calls on it end.

    A unary call (no response yet) gets UNAVAILABLE. A stream whose response has
    started cannot be given a status by a proxy any more: Envoy resets it, which gRPC
    reports as INTERNAL ("RST_STREAM"); it ends within the same bound."""
    gateway = await start_gateway(keepalive=FAST_KEEPALIVE)
    bound = resources.keepalive_detection_seconds(gateway.control_plane.options)
    replica = await agent_process(
        "assistant",
        AGENTPLEX_SCRIPTED_DELAY_SECONDS=THINKING_SECONDS,
        AGENTPLEX_KEEPALIVE_SECONDS=str(FAST_KEEPALIVE.seconds),
        AGENTPLEX_KEEPALIVE_TIMEOUT_SECONDS=str(FAST_KEEPALIVE.timeout_seconds),
    )
    await eventually(lambda: routable(gateway, replica.address), timeout=30)
    channel = open_channel(gateway.address, FAST_KEEPALIVE)
    stub = stub_for(channel)
    others: list[asyncio.Future[Any]] = []  # calls the in-process replica answered
    try:
        # the unary call first: with neither replica busy it lands on either half the time
        unary: list[asyncio.Future[Any]] = []

        async def start_unary(before: int) -> bool:
            call = asyncio.ensure_future(
                stub.RunTask(pb.RunTaskRequest(prompt="what is 6*7?"), timeout=120)
            )
            unary.append(call)
            # under way on the frozen-to-be replica, or answered by the other one
            await eventually(
                lambda: call.done() or _active_above(gateway, replica.address, before),
                timeout=20,
            )
            return not call.done()

        await _landed_on(gateway, replica.address, start_unary)
        run = unary.pop()
        others.extend(unary)

        streams: list[grpc.aio.UnaryStreamCall[Any, Any]] = []

        async def start_stream(before: int) -> bool:
            call = stub.StreamSteps(pb.StreamStepsRequest(prompt="what is 6*7?"), timeout=120)
            first = await call.read()
            assert first.event.WhichOneof("kind") == "task_accepted"
            streams.append(call)
            return True

        await _landed_on(gateway, replica.address, start_stream)
        stream = streams.pop()
        others.extend(asyncio.ensure_future(_drain(call)) for call in streams)

        replica.process.send_signal(signal.SIGSTOP)
        (unary_error, unary_after), (stream_error, stream_after) = await asyncio.gather(
            _ended_within(run, bound), _ended_within(_drain(stream), bound)
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            replica.process.send_signal(signal.SIGCONT)
            replica.process.kill()
        for other in others:
            other.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await channel.close()

    log.warning(
        "frozen replica, through the gateway (bound %.2fs): RunTask %s after %.2fs, "
        "StreamSteps %s after %.2fs",
        bound,
        unary_error.code().name,
        unary_after,
        stream_error.code().name,
        stream_after,
    )
    assert unary_error.code() == grpc.StatusCode.UNAVAILABLE, unary_error.details()
    assert stream_error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    if stream_error.code() == grpc.StatusCode.INTERNAL:
        assert "RST_STREAM" in (stream_error.details() or ""), stream_error.details()
    # The mesh's own clients (the CLI, agents) read that reset as what it is: UNAVAILABLE.
    assert isinstance(errors.from_rpc_error(stream_error), errors.Unavailable)


@pytest.mark.slow
async def test_a_frozen_agent_fails_a_direct_stream_within_the_keepalive_bound(
    mesh, agent_process
) -> None:
    """The mesh's own channels (`open_channel` with a `Keepalive`) find a frozen peer
    within keepalive + timeout and fail its calls with UNAVAILABLE."""
    bound = FAST_KEEPALIVE.seconds + FAST_KEEPALIVE.timeout_seconds
    replica = await agent_process(
        "assistant",
        AGENTPLEX_SCRIPTED_DELAY_SECONDS=THINKING_SECONDS,
        AGENTPLEX_KEEPALIVE_SECONDS=str(FAST_KEEPALIVE.seconds),
        AGENTPLEX_KEEPALIVE_TIMEOUT_SECONDS=str(FAST_KEEPALIVE.timeout_seconds),
    )
    channel = open_channel(replica.address, FAST_KEEPALIVE)
    try:
        call = stub_for(channel).StreamSteps(
            pb.StreamStepsRequest(prompt="what is 6*7?"), timeout=120
        )
        first = await call.read()
        assert first.event.WhichOneof("kind") == "task_accepted"
        replica.process.send_signal(signal.SIGSTOP)
        error, after = await _ended_within(_drain(call), bound)
    finally:
        with contextlib.suppress(ProcessLookupError):
            replica.process.send_signal(signal.SIGCONT)
            replica.process.kill()
        await channel.close()
    log.warning("frozen agent, direct (bound %.2fs): %s after %.2fs", bound, error.code(), after)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
