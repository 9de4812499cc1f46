"""Tracing and structured logs.

One tracer provider per process; gRPC interceptors (`runtime/tracing.py`:
OpenTelemetry's while spans are recorded, the bare W3C headers while not)
carry trace context across every hop, and every log line is one JSON object
carrying the current trace and span id, so a task can be followed through the
logs of every service it touched.

Spans are recorded only where something receives them. Without an exporter
every span is dropped at birth (a non-recording span that still carries a
fresh or inherited trace id, so logs and downstream hops keep the trace):
recording spans nobody reads is per-call work on every hop (together with
uvloop, dropping them took 17–26 % off a one-tool task's p50 on the benchmark
machine; docs/BENCHMARKS.md). Once a span processor is added (`add_span_processor`,
or `configure_tracing` with an exporter) every span is recorded, whatever the
caller's sampled flag says: a service without an exporter upstream marks its
traces unsampled, and that must not blank the services that do export.

Exporters (`trace_exporter`, or the standard `OTEL_TRACES_EXPORTER`): `otlp`
sends spans over OTLP/gRPC to a collector (OpenTelemetry's exporter, through a
`BatchSpanProcessor`: spans are queued and sent from its own thread, so the
event loop never waits for the receiver), `console` prints them to stderr,
`none` records none. Each process names itself by its part (`memory`,
`assistant-worker`, ...) unless `OTEL_SERVICE_NAME` says otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from agentplex.runtime.settings import Settings

if TYPE_CHECKING:  # imported where used: the exporter loads grpc and protobuf modules
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON logs to stderr (stdout stays free for command output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RecordWhenExported(Sampler):
    """Drops every span until a span processor is added, then records every span."""

    def __init__(self) -> None:
        self.recording = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        sampler = ALWAYS_ON if self.recording else ALWAYS_OFF
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RecordWhenExported(recording={self.recording})"


def configure_tracing(
    service: str,
    exporter: str = "none",
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
) -> TracerProvider:
    """Install the process's tracer provider (once; later calls reuse it).

    `service` is the part's own name; `service_name` (the `otel_service_name`
    setting, OTEL_SERVICE_NAME) replaces it as the resource's `service.name`,
    and `agentplex.part` always names the part. `endpoint` is where `otlp`
    sends spans (the `otel_exporter_otlp_*endpoint` settings); None leaves both
    to the OpenTelemetry SDK, which reads the same standard variables itself.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(
        resource=tracing_resource(service, service_name), sampler=RecordWhenExported()
    )
    trace.set_tracer_provider(provider)
    if exporter == "console":
        add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr, formatter=_one_line))
        )
    elif exporter == "otlp":
        add_span_processor(BatchSpanProcessor(otlp_exporter(endpoint)))
    elif exporter != "none":
        raise ValueError(f"unknown trace exporter {exporter!r}: otlp, console or none")
    return provider


def configure_tracing_from(service: str, settings: Settings) -> TracerProvider:
    """`configure_tracing` with the exporter, endpoint and service name of `settings`."""
    return configure_tracing(
        service,
        settings.trace_exporter,
        endpoint=settings.otlp_traces_endpoint(),
        service_name=settings.otel_service_name,
    )


def otlp_exporter(endpoint: str | None = None) -> OTLPSpanExporter:
    """OpenTelemetry's OTLP/gRPC span exporter; plaintext for an `http://` endpoint.

    Headers, TLS files, timeout and compression come from the SDK's own
    OTEL_EXPORTER_OTLP_* variables.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


def tracing_resource(part: str, service_name: str | None) -> Resource:
    """The resource every span of this process carries (see `configure_tracing`)."""
    resource = Resource.create({"service.name": service_name or part, "agentplex.part": part})
    if service_name is None:
        # No setting given: OTEL_SERVICE_NAME, as the SDK reads it, still wins.
        resource = resource.merge(OTELResourceDetector().detect())
    return resource


def recording() -> bool:
    """Whether this process records spans (a provider of someone else's always counts)."""
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    return not isinstance(sampler, RecordWhenExported) or sampler.recording


def add_span_processor(processor: SpanProcessor) -> TracerProvider:
    """Send this process's spans to `processor`, and start recording them."""
    provider = configure_tracing("agentplex")
    provider.add_span_processor(processor)
    if isinstance(provider.sampler, RecordWhenExported):
        provider.sampler.recording = True
    return provider


def _one_line(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json())) + "\n"
