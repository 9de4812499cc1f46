"""Prometheus metrics shared by all services, and the endpoint that serves them.

RPCs are counted under the gRPC ecosystem's names (go-grpc-prometheus,
py-grpc-prometheus), so the usual dashboards and alerts work unchanged:

- `grpc_server_started_total{grpc_type,grpc_service,grpc_method}`
- `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`
- `grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}` (histogram)

`grpc_type` is `unary` or `server_stream` (the kinds this mesh serves). Health
checks and reflection are not traffic and are not counted.

`agentplex_rpc_handled_total{method,code}` and `agentplex_rpc_duration_seconds{method}`,
the names of before, are still served, derived at scrape time from the series above
(no extra work per call): deprecated, for the readers that still use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

RPC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Services whose calls are not traffic: probes and tooling.
UNCOUNTED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)

_RPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]

grpc_server_started = Counter(
    "grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS
)
grpc_server_handled = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by final status code.",
    [*_RPC_LABELS, "grpc_code"],
)
grpc_server_handling_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end (a stream's last message), on the server.",
    _RPC_LABELS,
    buckets=RPC_LATENCY_BUCKETS,
)


def split_method(method: str) -> tuple[str, str]:
    """`/package.Service/Method` as (service, method)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def counted(method: str) -> bool:
    """Whether calls of `method` (`/package.Service/Method`) are traffic."""
    return split_method(method)[0] not in UNCOUNTED_SERVICES


class _DeprecatedRpcNames(Collector):
    """`agentplex_rpc_*`, the names of before, read off the grpc_server_* series."""

    def collect(self) -> Iterator[Metric]:
        handled = Metric(
            "agentplex_rpc_handled",
            "Deprecated: grpc_server_handled_total. RPCs handled, by method and final code.",
            "counter",
        )
        for sample in _samples(grpc_server_handled.collect(), "grpc_server_handled_total"):
            labels = sample.labels
            method = f"/{labels['grpc_service']}/{labels['grpc_method']}"
            handled.add_sample(
                "agentplex_rpc_handled_total",
                {"method": method, "code": labels["grpc_code"]},
                sample.value,
            )
        yield handled
        duration = Metric(
            "agentplex_rpc_duration_seconds",
            "Deprecated: grpc_server_handling_seconds. Server-side RPC latency, by method.",
            "histogram",
        )
        prefix = "grpc_server_handling_seconds"
        for sample in _samples(grpc_server_handling_seconds.collect(), prefix):
            if sample.name == f"{prefix}_created":
                continue
            labels = {"method": f"/{sample.labels['grpc_service']}/{sample.labels['grpc_method']}"}
            if "le" in sample.labels:
                labels["le"] = sample.labels["le"]
            name = "agentplex_rpc_duration_seconds" + sample.name.removeprefix(prefix)
            duration.add_sample(name, labels, sample.value)
        yield duration

    def describe(self) -> Iterable[Metric]:
        return [
            Metric("agentplex_rpc_handled", "", "counter"),
            Metric("agentplex_rpc_duration_seconds", "", "histogram"),
        ]


def _samples(families: Iterable[Metric], only: str) -> Iterator[Sample]:
    for family in families:
        for sample in family.samples:
            if sample.name.startswith(only):
                yield sample


REGISTRY.register(_DeprecatedRpcNames())


class MetricsEndpoint:
    """The /metrics HTTP endpoint, on prometheus_client's own thread.

    Scraping never touches the event loop; `close()` frees the port.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        self._server, self._thread = start_http_server(
            port, addr=host, registry=REGISTRY if registry is None else registry
        )
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
