"""MeshControlService: `agentplex ps` and `agentplex restart` reach the supervisor of a
running `agentplex up` over gRPC, on loopback only (never through the gateway).

A thin adapter: the supervisor's own errors become domain errors here and the
edge interceptor gives them their status (NOT_FOUND for an unknown part,
UNAVAILABLE while the mesh stops or when a part does not come back).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import timestamp_pb2

from agentplex.contract.scopes import SCOPES
from agentplex.mesh.supervisor import (
    LaunchError,
    State,
    Supervised,
    Supervisor,
    SupervisorStopping,
    UnknownPart,
)
from agentplex.runtime import errors
from agentplex.runtime.peer_auth import Access
from agentplex.runtime.server import ServiceHost
from agentplex.v1 import mesh_control_service_pb2 as pb
from agentplex.v1 import mesh_control_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MeshControlService"].full_name

_STATES = {
    State.STARTING: pb.PART_STATE_STARTING,
    State.RUNNING: pb.PART_STATE_RUNNING,
    State.BACKOFF: pb.PART_STATE_BACKOFF,
    State.STOPPING: pb.PART_STATE_STOPPING,
    State.STOPPED: pb.PART_STATE_STOPPED,
}


def describe(part: Supervised) -> pb.SupervisedPart:
    message = pb.SupervisedPart(
        name=part.name,
        group=part.group,
        state=_STATES[part.state],
        pid=part.pid,
        address=part.runner.address,
        restarts=part.restarts,
        crash_looping=part.crash_looping,
        log_path=str(part.runner.log_path or ""),
    )
    if part.last_exit_code is not None:
        message.last_exit_code = part.last_exit_code
    if part.started_at:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(part.started_at * 1e9))
        message.started_at.CopyFrom(stamp)
    return message


class MeshControlServicer(pb_grpc.MeshControlServiceServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    async def ListParts(
        self, request: pb.ListPartsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListPartsResponse:
        return pb.ListPartsResponse(parts=[describe(part) for part in self._supervisor.parts])

    async def RestartPart(
        self, request: pb.RestartPartRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RestartPartResponse:
        if not request.name:
            raise errors.InvalidArgument("name the part to restart (agentplex ps lists them)")
        try:
            parts = await self._supervisor.restart(request.name)
        except UnknownPart as exc:
            raise errors.NotFound(str(exc)) from None
        except SupervisorStopping as exc:
            raise errors.Unavailable(str(exc)) from None
        except LaunchError as exc:
            raise errors.Unavailable(
                f"{request.name} did not come back; the supervisor keeps trying: {exc}"
            ) from None
        return pb.RestartPartResponse(parts=[describe(part) for part in parts])


def control_host(supervisor: Supervisor, *, host: str = "127.0.0.1") -> ServiceHost:
    """The control server: loopback, any free port, no metrics endpoint of its own."""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_MeshControlServiceServicer_to_server(MeshControlServicer(supervisor), server)
        return [SERVICE_NAME]

    # Plaintext on loopback (no caller table to check), but its calls are administrative:
    # the scope table makes each one an audit line.
    return ServiceHost(
        name="mesh-control",
        register=register,
        host=host,
        port=0,
        metrics_port=None,
        access=Access(scopes=SCOPES),
    )
