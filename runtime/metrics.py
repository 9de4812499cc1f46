"""Prometheus metrics shared by all services, and the endpoint that serves them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

RPC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

rpc_handled = Counter(
    "agentplex_rpc_handled_total",
    "RPCs handled, by method and final status code.",
    ["method", "code"],
)
rpc_duration = Histogram(
    "agentplex_rpc_duration_seconds",
    "Server-side RPC latency, by method.",
    ["method"],
    buckets=RPC_LATENCY_BUCKETS,
)


def serve_metrics(host: str, port: int, registry: CollectorRegistry | None = None) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port.

    prometheus_client's server runs on its own thread, so scraping never
    touches the event loop.
    """
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
