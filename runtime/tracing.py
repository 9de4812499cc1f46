"""Trace context over gRPC: OpenTelemetry's interceptors while spans are recorded,
the W3C headers alone while they are not.

opentelemetry-instrumentation-grpc makes a span for every call on both sides,
recorded or not, and its client interceptor waits for each call's status to
close it. With no exporter (`runtime/telemetry.py` then records nothing) that
work buys only the `traceparent` header, and cost 9–31 % of a one-tool
task's CPU across the mesh in two A/B pairs (docs/BENCHMARKS.md, "Changes
measured"). So
each call asks `telemetry.recording()`: if spans are recorded it goes through
OpenTelemetry's interceptors, unchanged; if not, the client only injects the
current context into the call's metadata, and the server only attaches the
caller's context around the handler — trace ids still reach every log line
and every hop, including the queue (tasks carry `trace_context`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)

from agentplex.runtime import principal as principals
from agentplex.runtime.telemetry import recording

Continuation = Callable[..., Any]


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return _with_headers(details, tuple(carrier.items()))


def _with_principal(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The principal this call acts for goes wherever the work goes (runtime/principal.py):
    here, on the same interceptors that carry the trace, so it costs no extra layer."""
    return _with_headers(details, principals.outgoing_metadata())


def _with_headers(
    details: grpc.aio.ClientCallDetails, headers: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    if not headers:
        return details
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
    for key, value in headers:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, traced: grpc.aio.UnaryUnaryClientInterceptor) -> None:
        self._traced = traced

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        client_call_details = _with_principal(client_call_details)
        if recording():
            return await self._traced.intercept_unary_unary(
                continuation, client_call_details, request
            )
        return await continuation(_with_trace_context(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, traced: grpc.aio.UnaryStreamClientInterceptor) -> None:
        self._traced = traced

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        client_call_details = _with_principal(client_call_details)
        if recording():
            return await self._traced.intercept_unary_stream(
                continuation, client_call_details, request
            )
        return await continuation(_with_trace_context(client_call_details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For `grpc.aio.insecure_channel(..., interceptors=...)`."""
    traced: list[Any] = list(aio_client_interceptors())
    chosen: list[grpc.aio.ClientInterceptor] = []
    for interceptor in traced:
        if isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor):
            chosen.append(_UnaryUnary(interceptor))
        elif isinstance(interceptor, grpc.aio.UnaryStreamClientInterceptor):
            chosen.append(_UnaryStream(interceptor))
        else:  # client or bidi streams: not on any hot path, always traced
            chosen.append(interceptor)
    return chosen


class ServerTracing(grpc.aio.ServerInterceptor):
    """Server spans while recorded; otherwise the caller's context, attached."""

    def __init__(self) -> None:
        # Health checks and reflection make no spans: they are noise (and not
        # counted as traffic either, runtime/metrics.py), and the OpenTelemetry
        # interceptor cannot wrap Watch, which streams with context.write().
        self._traced: grpc.aio.ServerInterceptor = aio_server_interceptor(
            filter_=filters.negate(
                filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection."))
            )
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if recording():
            return await self._traced.intercept_service(continuation, handler_call_details)
        handler = await continuation(handler_call_details)
        carrier = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if key in ("traceparent", "tracestate") and isinstance(value, str)
        }
        if handler is None or not carrier:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_in(carrier, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _stream_in(carrier, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _unary_in(carrier: dict[str, str], inner: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = otel_context.attach(propagate.extract(carrier))
        try:
            return await inner(request, context)
        finally:
            otel_context.detach(token)

    return call


def _stream_in(
    carrier: dict[str, str], inner: Callable[..., AsyncIterator[Any]]
) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        token = otel_context.attach(propagate.extract(carrier))
        try:
            async for item in inner(request, context):
                yield item
        finally:
            otel_context.detach(token)

    return call
