"""Traces leave over OTLP: a real OTLP/gRPC receiver (the collector's TraceService, in
this test) gets one trace for one RunTask, across agent → registry → tool backend →
memory. First the in-process mesh exporting through OpenTelemetry's OTLP exporter, then
the mesh as processes (`agentplex up`) configured by nothing but the OTEL_* variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agentplex.runtime.telemetry import add_span_processor, otlp_exporter
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc

RUN_TASK = "/agentplex.v1.AgentService/RunTask"
# The server side of every hop one calculator task takes.
HOPS = (
    RUN_TASK,
    "/agentplex.v1.MemoryService/LoadContext",
    "/agentplex.v1.ToolRegistryService/InvokeTool",
    "/agentplex.v1.ToolExecutorService/ExecuteTool",
    "/agentplex.v1.MemoryService/AppendMessages",
)


class Received:
    """One exported span, as the receiver got it."""

    def __init__(self, service: str, name: str, trace_id: str, kind: int) -> None:
        self.service, self.name, self.trace_id, self.kind = service, name, trace_id, kind


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what a collector listens with on :4317."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # opentelemetry-proto's generated gRPC module has no types.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        Received(
                            attributes.get("service.name", ""),
                            span.name,
                            span.trace_id.hex(),
                            span.kind,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def server_spans(self) -> list[Received]:
        with self._lock:
            return [span for span in self.spans if span.kind == 2]  # SPAN_KIND_SERVER

    def close(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


class Switchable(SpanProcessor):
    """Forwards to `inner` until switched off: this process's tracer provider outlives
    the test, and must not go on exporting to a receiver that is gone."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner: SpanProcessor | None = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.inner is not None:
            self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.inner is not None:
            self.inner.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis) if self.inner is not None else True

    def shutdown(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.shutdown()


def one_trace_through_every_hop(spans: list[Received]) -> str:
    """The trace id of the RunTask, once every hop's server span carries it."""
    runs = [span for span in spans if span.name == RUN_TASK]
    assert len(runs) == 1, [span.name for span in spans]
    trace_id = runs[0].trace_id
    in_trace = {span.name for span in spans if span.trace_id == trace_id}
    missing = set(HOPS) - in_trace
    assert not missing, f"not in the RunTask's trace: {missing}; it has {in_trace}"
    return trace_id


async def test_the_in_process_mesh_exports_one_trace_over_otlp(
    mesh, channel_to, receiver: Receiver, eventually
) -> None:
    exporting = Switchable(BatchSpanProcessor(otlp_exporter(receiver.endpoint)))
    add_span_processor(exporting)
    try:
        agent = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
        done = await agent.RunTask(pb.RunTaskRequest(prompt="what is 17*23?"), timeout=10)
        assert done.result.output == "17*23 = 391."
        # The batch goes out from the processor's own thread, on its schedule or a flush.
        await asyncio.to_thread(exporting.force_flush)
        await eventually(lambda: any(span.name == RUN_TASK for span in receiver.server_spans()))
    finally:
        exporting.shutdown()
    one_trace_through_every_hop(receiver.server_spans())


# --- the mesh as processes, configured by the standard variables --------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_agentplex_up_exports_one_trace_by_the_otel_variables(
    tmp_path: Path, receiver: Receiver
) -> None:
    state_file = tmp_path / ".agentplex" / "mesh.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "REDIS_URL" and not k.upper().startswith(("AGENTPLEX_", "OTEL_"))
    }
    env |= {
        "AGENTPLEX_DOCS_DIR": str(REPO_ROOT),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Short batches, so the spans arrive while the mesh runs.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    process = subprocess.Popen(
        # Plaintext, no tokens: the traces are what this tests (its client calls the
        # gateway without a token).
        [
            sys.executable,
            "-m",
            "agentplex.mesh",
            "up",
            "--ephemeral-ports",
            "--no-auth",
            "--no-mtls",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_for(lambda: state_file.exists() or process.poll() is not None, 90, "the mesh came up")
        assert process.poll() is None, "agentplex up exited early"
        state = json.loads(state_file.read_text())
        # Through the gateway: Envoy opens the trace, every hop behind it joins.
        with grpc.insecure_channel(state["gateway"]) as channel:
            agent = agent_service_pb2_grpc.AgentServiceStub(channel)
            done = agent.RunTask(
                pb.RunTaskRequest(prompt="what is 17*23?"),
                timeout=30,
                metadata=(("x-agentplex-agent", "assistant"),),
            )
        assert done.result.output == "17*23 = 391."
        wait_for(
            lambda: (
                set(HOPS) <= {span.name for span in receiver.server_spans()}
                and any(span.service == "gateway" for span in receiver.server_spans())
            ),
            20,
            "every hop's span arrived, the gateway's too",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    spans = receiver.server_spans()
    trace_id = one_trace_through_every_hop(spans)
    # Each part exports under its own name (no OTEL_SERVICE_NAME given).
    services = {span.name: span.service for span in spans if span.trace_id == trace_id}
    assert services[RUN_TASK] == "assistant"
    assert services["/agentplex.v1.MemoryService/LoadContext"] == "memory"
    assert services["/agentplex.v1.ToolRegistryService/InvokeTool"] == "registry"
    assert services["/agentplex.v1.ToolExecutorService/ExecuteTool"] == "tools"
    # The gateway's own span (Envoy's OpenTelemetry tracer) is in the same trace.
    assert "gateway" in {span.service for span in spans if span.trace_id == trace_id}
