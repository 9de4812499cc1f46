"""The gateway scenarios: RunTask through the agentplex gateway, and what Envoy adds to one hop.

Three ways to one server, in the same run:
- direct (grpc.aio to grpc.aio);
- through a *bare* Envoy: one listener, one static cluster, HTTP/2 upstream,
  the router filter and nothing else, from a static bootstrap (no xDS);
- through the agentplex gateway as deployed: the control plane in this
  process (as in tests/gateway/conftest.py), Envoy as a process, default
  policy (health checks, rate limit, buffer, CORS, gRPC-Web, transcoder,
  access log).

The bare echo (bench/echo.py) is published in the registry as the agent
`echo`, so the gateway routes the *same* echo (`x-agentplex-agent: echo`)
that the bare Envoy proxies: both Envoys are compared on the same call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from agentplex.bench.measure import Latency, interleaved, throughput
from agentplex.clients.registry import RegistryClient
from agentplex.contract.tool_definition import define
from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.envoy import EnvoyProcess
from agentplex.gateway.resources import AGENT_HEADER, HostPort
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, tool_pb2

ECHO_AGENT = "echo"
ECHO_METHOD = "/bench.Echo/Echo"
BARE_LISTENER = "bare"
BARE_CLUSTER = "upstream"
IN_FLIGHT = (1, 16, 64)
AgentStub = agent_service_pb2_grpc.AgentServiceStub


def _identity(data: bytes) -> bytes:
    return data


def bare_config(upstream: HostPort, admin_host: str) -> dict[str, Any]:
    """The smallest Envoy that proxies gRPC: one listener, one static HTTP/2 cluster."""

    def address(host: str, port: int) -> dict[str, Any]:
        return {"socket_address": {"address": host, "port_value": port}}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": BARE_LISTENER,
        "codec_type": "AUTO",  # as the gateway's listener
        "route_config": {
            "name": BARE_LISTENER,
            "virtual_hosts": [
                {
                    "name": BARE_LISTENER,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": BARE_CLUSTER, "timeout": "0s"},
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    http2 = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    return {
        "node": {"id": "bench-bare-envoy", "cluster": "bench"},
        "admin": {"address": address(admin_host, 0)},
        "static_resources": {
            "listeners": [
                {
                    "name": BARE_LISTENER,
                    "address": address("127.0.0.1", 0),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": BARE_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2
                    },
                    "load_assignment": {
                        "cluster_name": BARE_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": address(upstream.host, upstream.port)}}
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


class BareEnvoy(EnvoyProcess):
    """The same Envoy binary and process handling as the gateway's, with a static bootstrap."""

    def __init__(self, upstream: HostPort, work_dir: Path) -> None:
        # Only the admin fields of the options are read: there is no control plane.
        super().__init__(
            BootstrapOptions(control_plane=upstream, node_id="bench-bare-envoy", admin_port=0),
            work_dir,
            work_dir / "envoy.log",
        )
        self.upstream = upstream

    def write_config(self) -> Path:
        path = self.work_dir / "envoy.json"
        path.write_text(json.dumps(bare_config(self.upstream, self.options.admin_host), indent=2))
        return path


@dataclass
class Proxies:
    gateway: str  # host:port of the gateway listener
    bare: str  # host:port of the bare Envoy's listener


@asynccontextmanager
async def proxies(state: dict[str, Any], echo: str, workdir: Path) -> AsyncIterator[Proxies]:
    """The gateway before the mesh (echo published as an agent); a bare Envoy before the echo."""
    registry = RegistryClient(state["registry"])
    echo_tool = define(
        name=f"agent.{ECHO_AGENT}",
        version="1.0.0",
        description="The bench's bare grpc.aio echo, routed by the gateway like an agent.",
        input_schema={"type": "object"},
        output_schema={"type": "object"},
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )
    control_plane = ControlPlaneServer(
        Settings(registry_address=state["registry"]),
        # As deployed, but on a free port; the directory is read once a second
        # (in this process: a few RPCs a second beside the measuring client).
        GatewaySettings(listen_port=0, directory_poll_seconds=1.0),
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        await registry.publish([echo_tool], echo, tool_pb2.BACKEND_KIND_AGENT, timeout=10)
        stack.push_async_callback(registry.withdraw, [echo_tool], echo, timeout=5)
        xds = HostPort.parse(await control_plane.start())
        stack.push_async_callback(control_plane.stop)
        gateway = EnvoyProcess(
            BootstrapOptions(xds, admin_port=0),
            workdir / "gateway",
            workdir / "gateway" / "envoy.log",
        )
        stack.push_async_callback(gateway.stop)
        await gateway.start()
        bare = BareEnvoy(HostPort.parse(echo), workdir / "bare-envoy")
        stack.push_async_callback(bare.stop)
        await bare.start()
        listener = await gateway.listener()
        bare_listener = await bare.listener(name=BARE_LISTENER)
        result = Proxies(
            gateway=f"{listener.host}:{listener.port}",
            bare=f"{bare_listener.host}:{bare_listener.port}",
        )
        await _routable(result.gateway)
        yield result


async def _routable(gateway: str, timeout: float = 30.0) -> None:
    """Until the gateway is ready (default agent healthy) and routes the echo."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    async with (
        httpx.AsyncClient(timeout=2.0) as client,
        grpc.aio.insecure_channel(gateway) as channel,
    ):
        echo = channel.unary_unary(
            ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        while True:
            try:
                ready = (await client.get(f"http://{gateway}/ready")).status_code == 200
                if ready:
                    await echo(b"x", metadata=((AGENT_HEADER, ECHO_AGENT),), timeout=2)
                    return
            except (httpx.HTTPError, grpc.aio.AioRpcError) as exc:
                if loop.time() > give_up:
                    raise RuntimeError(f"the gateway never routed the echo: {exc}") from exc
            if loop.time() > give_up:
                raise RuntimeError("the gateway never became ready")
            await asyncio.sleep(0.2)


def _run_task(stub: AgentStub, prompt: str, timeout: float) -> Callable[[], Awaitable[object]]:
    return lambda: stub.RunTask(pb.RunTaskRequest(prompt=prompt), timeout=timeout)


async def task_throughput(
    direct: AgentStub, via: Proxies, prompt: str, count: int, report: Any
) -> dict[int, float]:
    """(b): RunTask tasks/s at each concurrency, direct then through the gateway, level by level."""
    rows = []
    rates: dict[int, float] = {}
    half = max(1, count // 2)
    async with grpc.aio.insecure_channel(via.gateway) as channel:
        gateway = agent_service_pb2_grpc.AgentServiceStub(channel)
        await _run_task(gateway, prompt, 30)()
        paths = {"direct": _run_task(direct, prompt, 60), "gateway": _run_task(gateway, prompt, 60)}
        for n in IN_FLIGHT:
            # Two halves each, in the order direct, gateway, gateway, direct: a machine
            # that slows down (or speeds up) steadily over the level favours neither path.
            seconds = dict.fromkeys(paths, 0.0)
            for name in ("direct", "gateway", "gateway", "direct"):
                seconds[name] += half / await throughput(paths[name], half, n)
            rates[n] = 2 * half / seconds["direct"]
            through = 2 * half / seconds["gateway"]
            rows.append((n, f"{rates[n]:.0f}", f"{through:.0f}", f"{through / rates[n]:.2f}×"))
    report.table(
        "b. Throughput",
        "RunTask tasks/s with 1, 16 and 64 calls in flight (one channel, closed loop), straight "
        "to the agent and through the agentplex gateway (Envoy with its default policy, no "
        "agent header: the default agent). Each level makes the count of calls on each path "
        "in two halves, in the order direct, gateway, gateway, direct, so steady drift "
        "favours neither path.",
        ("in flight", "direct tasks/s", "through the gateway tasks/s", "gateway ÷ direct"),
        rows,
    )
    return rates


async def overhead(
    direct: AgentStub, via: Proxies, echo: str, prompt: str, counts: Any, report: Any
) -> None:
    """(f): the latency each Envoy adds, the gateway's against a bare proxy's, on the same echo."""
    async with (
        grpc.aio.insecure_channel(echo) as echo_channel,
        grpc.aio.insecure_channel(via.bare) as bare_channel,
        grpc.aio.insecure_channel(via.gateway) as gateway_channel,
    ):

        def echo_on(channel: grpc.aio.Channel, **kwargs: Any) -> Callable[[], Awaitable[bytes]]:
            unary = channel.unary_unary(
                ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity
            )
            return lambda: unary(b"x" * 64, **kwargs)

        # The identical request on every path, the header the gateway routes by included:
        # the bare Envoy and the direct call carry (and ignore) it too.
        routed = ((AGENT_HEADER, ECHO_AGENT),)
        echoes = await interleaved(
            {
                "direct": echo_on(echo_channel, metadata=routed),
                "bare": echo_on(bare_channel, metadata=routed),
                "gateway": echo_on(gateway_channel, metadata=routed),
            },
            counts.latency * 3,
        )
        gateway = agent_service_pb2_grpc.AgentServiceStub(gateway_channel)
        tasks = await interleaved(
            {
                "direct": _run_task(direct, prompt, 30),
                "gateway": _run_task(gateway, prompt, 30),
            },
            counts.latency * 2,
        )
    bare_added = echoes["bare"].p50_ms - echoes["direct"].p50_ms
    echo_added = echoes["gateway"].p50_ms - echoes["direct"].p50_ms
    task_added = tasks["gateway"].p50_ms - tasks["direct"].p50_ms

    def row(name: str, lat: Latency, added: float | None = None) -> tuple[object, ...]:
        if added is None:
            return (name, f"{lat.p50_ms:.3f}", f"{lat.p99_ms:.3f}", "–", "–")
        ratio = _ratio(added, bare_added)
        return (name, f"{lat.p50_ms:.3f}", f"{lat.p99_ms:.3f}", f"{added:+.3f}", ratio)

    report.table(
        "g. Gateway overhead (goal f)",
        "The p50 each proxy adds to one call, against what a bare Envoy adds, in one run. "
        "Bare Envoy: a static bootstrap with one listener, one static HTTP/2 cluster and "
        "the router filter. Gateway: the agentplex gateway as deployed (xDS from the control "
        "plane; health checks, rate limit, buffer, CORS, gRPC-Web, JSON transcoder, access "
        "log). The echo is the bare grpc.aio echo of the floor, published in the registry as "
        f"the agent `{ECHO_AGENT}` so the gateway routes the same call (`{AGENT_HEADER}: "
        f"{ECHO_AGENT}`) that the bare Envoy proxies; all three paths send that identical "
        "request, header included, and the goal compares the two proxies on it. The "
        "RunTask rows put the gateway in front of a whole one-tool task (no header: the "
        "default agent). Calls take turns, one in flight, so drift hits every path alike. "
        "Both Envoys run with the same binary and worker threads (one per core).",
        ("path", "p50 ms", "p99 ms", "added p50 ms", "added ÷ bare Envoy's"),
        [
            row("echo, direct", echoes["direct"]),
            row("echo, through a bare Envoy", echoes["bare"], bare_added),
            row("echo, through the gateway", echoes["gateway"], echo_added),
            row("RunTask, direct", tasks["direct"]),
            row("RunTask, through the gateway", tasks["gateway"], task_added),
        ],
    )
    report.goal(
        "(f) gateway's added latency (same echo)",
        "≤ 1.2× a bare Envoy proxy's",
        _ratio(echo_added, bare_added),
    )


def _ratio(added: float, base: float) -> str:
    return f"{added / base:.2f}×" if base > 0 else "– (bare Envoy added nothing measurable)"
