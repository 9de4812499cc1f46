"""Structured JSON logs with trace ids, and the process tracer provider."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from types import TracebackType

import pytest
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentplex.runtime.telemetry import (
    JsonFormatter,
    RecordWhenExported,
    configure_logging,
    configure_tracing,
)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def record(
    message: str = "hello %s",
    args: tuple[object, ...] = ("world",),
    *,
    level: int = logging.INFO,
    exc_info: ExcInfo | None = None,
    **extra: object,
) -> logging.LogRecord:
    made = logging.getLogger("agentplex.test").makeRecord(
        "agentplex.test", level, __file__, 10, message, args, exc_info, extra=extra or None
    )
    return made


def test_json_line_has_the_basic_fields() -> None:
    line = JsonFormatter("memory").format(record(level=logging.WARNING))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["service"] == "memory"
    assert entry["logger"] == "agentplex.test"
    assert entry["message"] == "hello world"
    assert entry["time"].endswith("+00:00")
    assert "trace_id" not in entry
    assert "span_id" not in entry


def test_trace_and_span_ids_inside_a_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter("memory").format(record()))
        context = span.get_span_context()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")
    assert len(entry["trace_id"]) == 32
    assert len(entry["span_id"]) == 16
    # ...and not once the span has ended.
    assert "trace_id" not in json.loads(JsonFormatter("memory").format(record()))


def test_extras_are_included_and_made_json_safe() -> None:
    entry = json.loads(
        JsonFormatter("agent").format(
            record(
                address="127.0.0.1:5",
                port=5,
                ratio=0.5,
                ok=True,
                where={"nested": [1, 2]},
                _private="hidden",
            )
        )
    )
    assert entry["address"] == "127.0.0.1:5"
    assert entry["port"] == 5
    assert entry["ratio"] == 0.5
    assert entry["ok"] is True
    assert entry["where"] == "{'nested': [1, 2]}"
    assert "_private" not in entry
    # Standard LogRecord attributes are not repeated.
    for noise in ("args", "msg", "levelno", "pathname", "lineno", "process", "thread"):
        assert noise not in entry


def test_exception_is_rendered() -> None:
    try:
        raise ValueError("exploded")
    except ValueError:
        exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter("x").format(record("failed", (), exc_info=exc_info)))
    assert entry["message"] == "failed"
    assert "Traceback" in entry["exception"]
    assert "ValueError: exploded" in entry["exception"]


def test_non_ascii_message_is_valid_json() -> None:
    entry = json.loads(JsonFormatter("x").format(record("naïve ☃ %s", ("“quoted”",))))
    assert entry["message"] == "naïve ☃ “quoted”"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_configure_logging_writes_json_to_stderr(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("registry", "debug")
    assert len(root_logger.handlers) == 1
    assert isinstance(root_logger.handlers[0].formatter, JsonFormatter)
    assert root_logger.level == logging.DEBUG

    logging.getLogger("agentplex.some.module").debug("step %d", 3, extra={"task_id": "t-1"})

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["service"] == "registry"
    assert entry["message"] == "step 3"
    assert entry["level"] == "DEBUG"
    assert entry["task_id"] == "t-1"


def test_configure_logging_replaces_handlers(root_logger: logging.Logger) -> None:
    configure_logging("a")
    configure_logging("b", "WARNING")
    assert len(root_logger.handlers) == 1
    formatter = root_logger.handlers[0].formatter
    assert isinstance(formatter, JsonFormatter)
    assert formatter.service == "b"
    assert root_logger.level == logging.WARNING


def test_configure_tracing_installs_one_provider() -> None:
    first = configure_tracing("telemetry-test")
    second = configure_tracing("another-name", "console")
    assert isinstance(first, TracerProvider)
    assert second is first
    assert trace.get_tracer_provider() is first
    with trace.get_tracer("test").start_as_current_span("real") as span:
        assert span.get_span_context().is_valid
        entry = json.loads(JsonFormatter("x").format(record()))
        assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_without_an_exporter_spans_are_dropped_but_the_trace_id_still_travels() -> None:
    sampler = RecordWhenExported()
    tracer = TracerProvider(sampler=sampler).get_tracer("test")
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        trace_id = root.get_span_context().trace_id
        assert root.get_span_context().is_valid
        carrier: dict[str, str] = {}
        inject(carrier)  # what a gRPC hop or a queued task's trace_context carries
    assert carrier["traceparent"].split("-")[1] == format(trace_id, "032x")
    with tracer.start_as_current_span("downstream", context=extract(carrier)) as child:
        assert child.get_span_context().trace_id == trace_id


def test_once_a_processor_is_added_every_span_is_recorded_even_under_an_unsampled_parent() -> None:
    sampler = RecordWhenExported()
    provider = TracerProvider(sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("before"):
        carrier: dict[str, str] = {}
        inject(carrier)  # the upstream service had no exporter: unsampled
    assert int(carrier["traceparent"].split("-")[3], 16) & 0x01 == 0  # not sampled
    sampler.recording = True
    with tracer.start_as_current_span("after", context=extract(carrier)) as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["after"]
    assert exporter.get_finished_spans()[0].context.trace_id == int(
        carrier["traceparent"].split("-")[1], 16
    )


# --- the standard OTEL_* variables ---------------------------------------------------------


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AGENTPLEX_* or OTEL_* variables."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(("AGENTPLEX_", "OTEL_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_otel_variables_configure_tracing(otel_env: pytest.MonkeyPatch) -> None:
    from agentplex.runtime.settings import Settings

    otel_env.setenv("OTEL_TRACES_EXPORTER", "OTLP")
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    otel_env.setenv("OTEL_SERVICE_NAME", "checkout-agents")
    settings = Settings()
    assert settings.trace_exporter == "otlp"
    assert settings.otlp_traces_endpoint() == "http://collector:4317"
    assert settings.otel_service_name == "checkout-agents"
    # The traces-specific endpoint wins, as in the SDK.
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert Settings().otlp_traces_endpoint() == "http://traces:4317"


def test_agentplex_trace_exporter_wins_over_otel_traces_exporter(
    otel_env: pytest.MonkeyPatch,
) -> None:
    from agentplex.runtime.settings import Settings

    otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    otel_env.setenv("AGENTPLEX_TRACE_EXPORTER", "console")
    assert Settings().trace_exporter == "console"
    otel_env.delenv("AGENTPLEX_TRACE_EXPORTER")
    otel_env.setenv("OTEL_TRACES_EXPORTER", "")
    assert Settings().trace_exporter == "none"  # not the SDK's default: nothing is recorded


@pytest.mark.parametrize("value", ["jaeger", "otlp,console"])
def test_an_unsupported_otel_traces_exporter_is_refused(
    otel_env: pytest.MonkeyPatch, value: str
) -> None:
    from pydantic import ValidationError

    from agentplex.runtime.settings import Settings

    otel_env.setenv("OTEL_TRACES_EXPORTER", value)
    with pytest.raises(ValidationError, match="trace_exporter"):
        Settings()


def test_the_resource_names_the_part_unless_a_service_name_is_set(
    otel_env: pytest.MonkeyPatch,
) -> None:
    from agentplex.runtime.telemetry import tracing_resource

    plain = tracing_resource("assistant-worker", None).attributes
    assert (plain["service.name"], plain["agentplex.part"]) == (
        "assistant-worker",
        "assistant-worker",
    )
    named = tracing_resource("memory", "shop").attributes
    assert (named["service.name"], named["agentplex.part"]) == ("shop", "memory")
    # Without the setting passed, OTEL_SERVICE_NAME as the SDK reads it still wins.
    otel_env.setenv("OTEL_SERVICE_NAME", "from-sdk")
    assert tracing_resource("memory", None).attributes["service.name"] == "from-sdk"


def test_the_otlp_exporter_goes_where_it_is_told() -> None:
    from agentplex.runtime.telemetry import otlp_exporter

    exporter = otlp_exporter("http://127.0.0.1:4999")
    try:
        assert exporter._endpoint == "127.0.0.1:4999"
        assert exporter._insecure  # http:// is plaintext
    finally:
        exporter.shutdown()
