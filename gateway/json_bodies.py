"""Unknown fields in JSON request bodies, refused before Envoy's transcoder drops them.

Envoy's `grpc_json_transcoder` ignores a body field that names nothing in the
request message, so `{"promt": "x"}` would reach the agent as an empty request.
The gateway's `envoy.filters.http.ext_proc` filter, enabled on the JSON routes
that take a body, sends each buffered request body here (with the request's
method and path as ext_proc attributes); this processor finds the request
message by the contracts' `google.api.http` rules (the transcoder has already
rewritten the path to the gRPC method's when the body arrives), parses the body with
protobuf's own JSON parser refusing unknown fields (recursively, naming the
field), and either lets the request continue or answers 400 with the message.
The gateway's local-reply mappers give that answer the same JSON
`google.rpc.Status` shape as every other error on `/v1/` (`resources.py`).

Only unknown fields are refused here: any other problem with the body (bad JSON,
a wrong value type) is left to the transcoder, which decides what it accepts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from envoy_data_plane.envoy.service.ext_proc.v3 import (
    BodyResponse,
    CommonResponse,
    ExternalProcessorBase,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FileDescriptor, ServiceDescriptor

from agentplex.gateway import descriptors

log = logging.getLogger(__name__)

# The attributes the ext_proc filter is asked to send with the body (`resources.py`).
PATH_ATTRIBUTE = "request.path"
METHOD_ATTRIBUTE = "request.method"
REQUEST_ATTRIBUTES = (PATH_ATTRIBUTE, METHOD_ATTRIBUTE)
# Bodies above this are parsed off the event loop, which also serves ADS.
_INLINE_BYTES = 64 * 1024
# What protobuf's JSON parser says about a field the message does not have.
_UNKNOWN_FIELD = re.compile(
    r'Message type "(?P<type>[^"]+)" has no field named "(?P<field>[^"]+)"'
    r'(?: at "(?P<at>[^"]*)")?'
)


@dataclass(frozen=True)
class Binding:
    """One `google.api.http` rule: a method and URL template, and what its body fills."""

    http_method: str
    pattern: re.Pattern[str]
    grpc_path: str  # /package.Service/Method
    request: Descriptor
    body: str  # "*" (the whole request), a field name, or "" (no body)

    def body_message(self) -> Descriptor | None:
        """The message type the JSON body is parsed as, or None when it has none to check."""
        if self.body == "*":
            return self.request
        if not self.body:
            return None
        field = self.request.fields_by_name.get(self.body)
        return field.message_type if field is not None else None


def _template(path: str) -> re.Pattern[str]:
    """A `google.api.http` path template as a regex over the URL path (no query)."""
    out = []
    position = 0
    for variable in re.finditer(r"\{[^}=]+(?:=(?P<pattern>[^}]*))?\}", path):
        out.append(_segments(path[position : variable.start()]))
        out.append(_segments(variable.group("pattern") or "*"))
        position = variable.end()
    out.append(_segments(path[position:]))
    return re.compile("".join(out))


def _segments(literal: str) -> str:
    parts = re.split(r"(\*\*|\*)", literal)
    table = {"**": ".+", "*": "[^/]+"}
    return "".join(table.get(part, re.escape(part)) for part in parts)


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def bindings(files: Iterable[FileDescriptor] = descriptors.SERVICE_FILES) -> list[Binding]:
    """Every JSON binding of the services in `files`, in declaration order."""
    found = []
    for file in files:
        service: ServiceDescriptor
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                for rule in _rules(options.Extensions[annotations_pb2.http]):
                    kind = rule.WhichOneof("pattern")
                    if kind is None:
                        continue
                    if kind == "custom":
                        verb, path = rule.custom.kind.upper(), rule.custom.path
                    else:
                        verb, path = kind.upper(), getattr(rule, kind)
                    found.append(
                        Binding(
                            verb,
                            _template(path),
                            f"/{service.full_name}/{method.name}",
                            method.input_type,
                            rule.body,
                        )
                    )
    return found


def unknown_field(binding: Binding, body: bytes) -> str | None:
    """What is wrong with `body` for `binding` when it names an unknown field, else None."""
    message_type = binding.body_message()
    if message_type is None or not body.strip():
        return None
    message = message_factory.GetMessageClass(message_type)()
    try:
        json_format.Parse(body, message, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        found = _UNKNOWN_FIELD.search(str(error))
        if found is None:
            return None  # another problem: the transcoder's to judge
        where = f" (at {found['at']})" if found["at"] and "." in found["at"] else ""
        return f'unknown field "{found["field"]}" in {found["type"]}{where}'
    return None


class BodyChecker(ExternalProcessorBase):
    """The ExternalProcessor service Envoy's ext_proc filter calls for JSON request bodies."""

    def __init__(self, table: list[Binding] | None = None) -> None:
        self._bindings = bindings() if table is None else table
        self.calls = 0  # streams Envoy opened (for tests and the curious)
        self.refused = 0

    def find(self, http_method: str, path: str) -> Binding | None:
        """The binding a request was transcoded by.

        The body reaches the processor after the transcoder has rewritten the path to
        the gRPC method's (`/agentplex.v1.AgentService/RunTask`), so that is what it
        is found by, with the HTTP method; a URL (`/v1/agents/a/tasks:run`), as it
        would arrive with the filters in another order, is matched against the
        templates. (A method with two bindings for one HTTP method but different
        `body` fields would be ambiguous; the contracts have none.)
        """
        path = path.split("?", 1)[0]
        for binding in self._bindings:
            if binding.http_method == http_method and (
                binding.grpc_path == path or binding.pattern.fullmatch(path)
            ):
                return binding
        return None

    async def process(
        self, messages: AsyncIterator[ProcessingRequest]
    ) -> AsyncIterator[ProcessingResponse]:
        self.calls += 1
        attributes: dict[str, str] = {}
        async for request in messages:
            for struct in request.attributes.values():
                for key, value in struct.to_dict().items():
                    if isinstance(value, str):
                        attributes[key] = value
            if request.request_body is None:
                # Not asked for (headers and trailers are skipped); answer so Envoy moves on.
                yield ProcessingResponse(request_body=BodyResponse(response=CommonResponse()))
                continue
            binding = self.find(
                attributes.get(METHOD_ATTRIBUTE, ""), attributes.get(PATH_ATTRIBUTE, "")
            )
            body = request.request_body.body
            problem = None
            if binding is not None:
                if len(body) > _INLINE_BYTES:
                    problem = await asyncio.to_thread(unknown_field, binding, body)
                else:
                    problem = unknown_field(binding, body)
            if problem is None:
                yield ProcessingResponse(request_body=BodyResponse(response=CommonResponse()))
                continue
            self.refused += 1
            yield ProcessingResponse(
                immediate_response=ImmediateResponse(
                    status=HttpStatus(code=StatusCode.BadRequest),
                    body=problem.encode(),
                    details="unknown_json_body_field",
                )
            )
            return
