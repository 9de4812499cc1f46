"""Trace context over gRPC when spans are not recorded: the headers alone still carry it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from agentplex.runtime import tracing
from agentplex.runtime.tracing import ServerTracing, client_interceptors

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def _identity(data: bytes) -> bytes:
    return data


def _current_trace_id() -> bytes:
    return format(trace.get_current_span().get_span_context().trace_id, "032x").encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return _current_trace_id()


async def _stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _current_trace_id()


@pytest.fixture
async def traced_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(tracing, "recording", lambda: False)  # as in a mesh with no exporter
    server = grpc.aio.server(interceptors=[ServerTracing()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


def _caller_span() -> NonRecordingSpan:
    return NonRecordingSpan(
        SpanContext(TRACE_ID, 0x00F067AA0BA902B7, is_remote=False, trace_flags=TraceFlags(0))
    )


async def test_unary_and_streaming_calls_carry_the_callers_trace(traced_server: str) -> None:
    async with grpc.aio.insecure_channel(traced_server, interceptors=client_interceptors()) as ch:
        unary = ch.unary_unary("/test.T/Unary", _identity, _identity)
        stream = ch.unary_stream("/test.T/Stream", _identity, _identity)
        with trace.use_span(_caller_span()):
            assert await unary(b"") == format(TRACE_ID, "032x").encode()
            assert [item async for item in stream(b"")] == [format(TRACE_ID, "032x").encode()] * 2


async def test_a_call_without_a_trace_gets_none_from_the_previous_call(traced_server: str) -> None:
    async with grpc.aio.insecure_channel(traced_server, interceptors=client_interceptors()) as ch:
        unary = ch.unary_unary("/test.T/Unary", _identity, _identity)
        with trace.use_span(_caller_span()):
            await unary(b"")
        assert await unary(b"") == b"0" * 32  # no caller trace: no leftover context
