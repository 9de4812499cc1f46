"""The JSON body check: which request message a body is for, what it refuses, and how
Envoy is told to call it (tests/gateway/test_gateway.py runs it behind a real Envoy)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator

from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcPerRoute,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    HttpBody,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy_data_plane.google.protobuf import Struct

from agentplex.gateway import bootstrap, json_bodies, resources
from agentplex.gateway.json_bodies import BodyChecker, unknown_field
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort

RUN = "/agentplex.v1.AgentService/RunTask"


def test_bindings_follow_the_http_rules() -> None:
    checker = BodyChecker()
    for path in ("/v1/agents/assistant/tasks:run", RUN):
        run = checker.find("POST", path)
        assert run is not None and run.request.full_name == "agentplex.v1.RunTaskRequest"
    submit = checker.find("POST", "/agentplex.v1.AgentService/SubmitTask")
    assert submit is not None and submit.body == "task"
    assert checker.find("POST", "/v1/agents/a/tasks/t-1:cancel") is not None
    assert checker.find("GET", RUN) is None
    assert checker.find("POST", "/v1/agents/a/no-such-method") is None


def test_unknown_fields_are_named_where_they_are() -> None:
    checker = BodyChecker()
    run = checker.find("POST", RUN)
    submit = checker.find("POST", "/agentplex.v1.AgentService/SubmitTask")
    assert run is not None and submit is not None
    assert unknown_field(run, b'{"promt": "x"}') == (
        'unknown field "promt" in agentplex.v1.RunTaskRequest'
    )
    nested = unknown_field(run, b'{"prompt": "x", "lineage": {"depth": 1, "parnet": "p"}}')
    assert nested == (
        'unknown field "parnet" in agentplex.v1.TaskLineage (at RunTaskRequest.lineage)'
    )
    # the body of SubmitTask is its `task` field
    assert unknown_field(submit, b'{"prompt": "x", "task": {}}') == (
        'unknown field "task" in agentplex.v1.TaskSpec'
    )
    # proto and JSON names both are fields; anything else wrong is the transcoder's call
    assert unknown_field(run, b'{"prompt": "x", "max_steps": 3, "tokenBudget": 600}') is None
    assert unknown_field(run, b'{"prompt": ') is None
    assert unknown_field(run, b'{"max_steps": "many"}') is None
    assert unknown_field(run, b"") is None


async def _answers(checker: BodyChecker, path: str, body: bytes) -> list[ProcessingResponse]:
    async def requests() -> AsyncIterator[ProcessingRequest]:
        attributes = Struct.from_dict({"request.path": path, "request.method": "POST"})
        yield ProcessingRequest(
            request_body=HttpBody(body=body, end_of_stream=True),
            attributes={"envoy.filters.http.ext_proc": attributes},
        )

    return [answer async for answer in checker.process(requests())]


async def test_the_processor_continues_or_answers_400() -> None:
    checker = BodyChecker()
    (go_on,) = await _answers(checker, RUN, b'{"prompt": "hi"}')
    assert go_on.request_body is not None and go_on.immediate_response is None
    (refused,) = await _answers(checker, RUN, b'{"prompt": "hi", "promt": "x"}')
    answer = refused.immediate_response
    assert answer is not None and answer.status is not None
    assert answer.status.code == 400
    assert answer.body == b'unknown field "promt" in agentplex.v1.RunTaskRequest'
    assert (checker.calls, checker.refused) == (2, 1)


def _manager() -> HttpConnectionManager:
    built = resources.build(
        Directory(agents={"assistant": (HostPort("127.0.0.1", 7000),)}, registry=()),
        GatewayOptions(listen_port=0),
    )
    packed = built.listeners[0].filter_chains[0].filters[0].typed_config
    assert packed is not None
    manager = packed.unpack()
    assert isinstance(manager, HttpConnectionManager)
    return manager


def test_envoy_sends_only_whole_bodies_and_fails_open() -> None:
    names = [f.name for f in _manager().http_filters]
    position = names.index(resources.EXT_PROC_FILTER)
    assert names.index("envoy.filters.http.buffer") < position
    assert position < names.index("envoy.filters.http.grpc_json_transcoder")
    (packed,) = [
        f.typed_config for f in _manager().http_filters if f.name == resources.EXT_PROC_FILTER
    ]
    assert packed is not None
    config = packed.unpack()
    assert isinstance(config, ExternalProcessor)
    mode = config.processing_mode
    assert mode is not None
    assert mode.request_header_mode == ProcessingModeHeaderSendMode.SKIP
    assert mode.response_header_mode == ProcessingModeHeaderSendMode.SKIP
    assert mode.request_body_mode == ProcessingModeBodySendMode.BUFFERED
    assert mode.response_body_mode == ProcessingModeBodySendMode.NONE
    assert set(config.request_attributes) == set(json_bodies.REQUEST_ATTRIBUTES)
    # the control plane, as the bootstrap names it; never a hanging JSON route
    assert config.grpc_service is not None and config.grpc_service.envoy_grpc is not None
    assert config.grpc_service.envoy_grpc.cluster_name == bootstrap.XDS_CLUSTER
    assert config.failure_mode_allow
    assert config.message_timeout == datetime.timedelta(
        seconds=resources.JSON_BODY_CHECK_TIMEOUT_SECONDS
    )


def test_only_json_routes_with_a_body_turn_the_check_on() -> None:
    routes = resources.build(
        Directory(agents={"assistant": (HostPort("127.0.0.1", 7000),)}, registry=()),
        GatewayOptions(listen_port=0),
    ).routes[0]
    (host,) = routes.virtual_hosts
    off = host.typed_per_filter_config[resources.EXT_PROC_FILTER].unpack()
    assert isinstance(off, ExtProcPerRoute) and off.disabled
    on = []
    for route in host.routes:
        packed = route.typed_per_filter_config.get(resources.EXT_PROC_FILTER)
        if packed is None:
            continue
        config = packed.unpack()
        assert isinstance(config, ExtProcPerRoute) and config.overrides is not None
        match = route.match
        assert match is not None and route.route is not None
        regex = match.safe_regex.regex if match.safe_regex is not None else ""
        on.append(match.path or regex)
        # never the GET routes
        assert all(h.string_match is None or h.string_match.exact != "GET" for h in match.headers)
    assert on == [
        "/v1/agents/assistant/tasks:stream",
        "/v1/agents/assistant/tasks:run",
        "/v1/agents/assistant/tasks",
        "/v1/agents/assistant/tasks/[^/:]+:cancel",
    ]


def test_envoy_s_own_errors_on_v1_get_the_services_json_shape() -> None:
    config = _manager().local_reply_config
    assert config is not None
    formats = {}
    for mapper in config.mappers:
        if mapper.body_format_override is None:
            continue
        assert mapper.body_format_override.content_type == "application/json"
        body = mapper.body_format_override.json_format
        assert body is not None
        formats[body.to_dict()["code"]] = body.to_dict()
    assert {3, 5, 8, 14} <= set(formats)
    assert formats[3] == resources.json_status(3, "%LOCAL_REPLY_BODY%")
    (detail,) = formats[3]["details"]
    assert detail["reason"] == "INVALID_ARGUMENT" and detail["domain"] == "agentplex.dev"
