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


class MetricsEndpoint:
    """The /metrics HTTP endpoint, on prometheus_client's own thread.

    Scraping never touches the event loop; `close()` frees the port.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
