"""The server edge: every RPC passes through here on its way in and out.

Exceptions escaping a servicer become precise statuses (through the table in
`runtime.errors`), and every call is counted and timed by method and final
status code, under the gRPC ecosystem's metric names (`runtime/metrics.py`;
health checks and reflection excepted). Doing both in one wrapper keeps the
two views consistent.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from google.rpc import code_pb2
from grpc_status import rpc_status

from agentplex.runtime import errors, metrics

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # generic in the stubs only
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = Callable[[Any, Context], Any]
    MethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses and records RPC metrics."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # grpc's stubs type a method handler's behaviors for the sync server; on this
        # grpc.aio server they are coroutine (or async generator) functions of an aio context.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(cast("Handler", handler.unary_unary), method, _rpc(method, "unary")),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(cast("Handler", handler.unary_stream), method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: Context, exc: BaseException, method: str) -> None:
    status = errors.to_status(exc)
    if status.code == code_pb2.INTERNAL:
        log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort_with_status(rpc_status.to_status(status))


class _Rpc:
    """The metrics of one method: started, handled by code, handling time."""

    __slots__ = ("_handled", "_labels", "_started", "_timing")

    def __init__(self, method: str, grpc_type: str) -> None:
        service, name = metrics.split_method(method)
        self._labels = (grpc_type, service, name)
        self._started = metrics.grpc_server_started.labels(*self._labels)
        self._timing = metrics.grpc_server_handling_seconds.labels(*self._labels)
        self._handled: dict[str, Any] = {}

    def start(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def end(self, context: Context, started: float) -> None:
        # None until the handler or an abort sets one (the stubs say a StatusCode always).
        code = cast("grpc.StatusCode | None", context.code())
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        handled = self._handled.get(name)
        if handled is None:
            handled = self._handled[name] = metrics.grpc_server_handled.labels(*self._labels, name)
        handled.inc()
        self._timing.observe(time.perf_counter() - started)


_rpcs: dict[tuple[str, str], _Rpc | None] = {}


def _rpc(method: str, grpc_type: str) -> _Rpc | None:
    """The method's metrics; None for the calls that are not traffic (health, reflection)."""
    key = (method, grpc_type)
    if key not in _rpcs:  # once per method: a server has a handful
        _rpcs[key] = _Rpc(method, grpc_type) if metrics.counted(method) else None
    return _rpcs[key]


def _wrap_unary(inner: Handler, method: str, rpc: _Rpc | None) -> Handler:
    async def call(request: Any, context: Context) -> Any:
        started = rpc.start() if rpc is not None else 0.0
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every escape gets a status; the table decides which
            await _abort(context, exc, method)
        finally:
            if rpc is not None:
                rpc.end(context, started)

    return call


def _wrap_stream(inner: Handler, method: str) -> Handler:
    rpc = _rpc(method, "server_stream")
    if not inspect.isasyncgenfunction(inner):
        # A coroutine handler that streams with `await context.write(...)`
        # (grpc_health's Watch does) is wrapped like a unary one.
        return _wrap_unary(inner, method, rpc)

    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        started = rpc.start() if rpc is not None else 0.0
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
        finally:
            if rpc is not None:
                rpc.end(context, started)

    return call
