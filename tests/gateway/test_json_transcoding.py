"""What Envoy's JSON transcoder is given: the error types it needs to answer errors
as JSON, and the request validation it applies. (tests/gateway/test_gateway.py
shows both through a real Envoy; test_json_bodies.py the body check in front of it.)"""

from __future__ import annotations

from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from google.protobuf import descriptor_pb2

from agentplex.gateway import descriptors, resources
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort


def transcoder() -> GrpcJsonTranscoder:
    built = resources.build(
        Directory(agents={"assistant": (HostPort("127.0.0.1", 7000),)}, registry=()),
        GatewayOptions(listen_port=0),
    )
    (listener,) = built.listeners
    packed = listener.filter_chains[0].filters[0].typed_config
    assert packed is not None
    manager = packed.unpack()
    assert isinstance(manager, HttpConnectionManager)
    (config,) = [
        f.typed_config
        for f in manager.http_filters
        if f.name == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert config is not None
    message = config.unpack()
    assert isinstance(message, GrpcJsonTranscoder)
    return message


def test_the_descriptor_set_holds_the_error_types() -> None:
    given_bytes = transcoder().proto_descriptor_bin
    assert given_bytes is not None
    given = descriptor_pb2.FileDescriptorSet.FromString(given_bytes)
    names = [file.name for file in given.file]
    for needed in (
        "agentplex/v1/agent_service.proto",
        "agentplex/v1/tool_registry_service.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ):
        assert needed in names
    # imports first, each once: Envoy builds its pool in this order
    assert len(names) == len(set(names))
    for position, file in enumerate(given.file):
        assert set(file.dependency) <= set(names[:position]), file.name
    messages = {f"{f.package}.{m.name}" for f in given.file for m in f.message_type}
    assert {"google.rpc.Status", "google.rpc.ErrorInfo"} <= messages


def test_errors_are_converted_and_unknown_query_parameters_refused() -> None:
    config = transcoder()
    assert config.convert_grpc_status
    validation = config.request_validation_options
    assert validation is not None
    assert validation.reject_unknown_query_parameters
    # The console and /v1/agents are answered by Envoy after the transcoder has run:
    # rejecting every path that names no method would refuse them too.
    assert not validation.reject_unknown_method


def test_the_console_schema_is_unchanged_by_the_error_types() -> None:
    assert "rpc" not in descriptors.protobufjs_json()["nested"].get("google", {}).get("nested", {})
