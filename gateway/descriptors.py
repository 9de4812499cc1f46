"""The agentplex contracts as descriptors, for the gateway's two protobuf consumers.

Envoy's JSON transcoder needs a `FileDescriptorSet` with the `google.api.http`
annotations; the web console's protobuf.js needs the message shapes as JSON.
Both are derived from the generated modules already imported here, so the
gateway always speaks exactly the contract the agents were built from — no
`buf build` step at run time and no descriptor file to go stale.

The transcoder's set also carries `google/rpc/status.proto` and
`google/rpc/error_details.proto`: only with them can Envoy answer a JSON caller's
error as a JSON `google.rpc.Status` (`code`, `message`, and the `ErrorInfo` the
services attach in `details`) instead of an empty body with `grpc-status` headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from google.rpc import error_details_pb2, status_pb2

from agentplex.v1 import agent_service_pb2, tool_registry_service_pb2

# The services the gateway exposes over JSON.
SERVICE_FILES: tuple[FileDescriptor, ...] = (
    agent_service_pb2.DESCRIPTOR,
    tool_registry_service_pb2.DESCRIPTOR,
)
AGENT_SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
REGISTRY_SERVICE = tool_registry_service_pb2.DESCRIPTOR.services_by_name[
    "ToolRegistryService"
].full_name
# What an error's JSON body is made of: `google.rpc.Status` and the detail types a
# service may pack into it (runtime.errors attaches `google.rpc.ErrorInfo`).
ERROR_FILES: tuple[FileDescriptor, ...] = (status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR)
# Everything Envoy's JSON transcoder is given.
TRANSCODER_FILES: tuple[FileDescriptor, ...] = SERVICE_FILES + ERROR_FILES


def _closure(files: Iterable[FileDescriptor]) -> Iterator[FileDescriptor]:
    """Every file and its imports, each once, imports first (as protoc orders them)."""
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> Iterator[FileDescriptor]:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            yield from visit(dependency)
        yield file

    for file in files:
        yield from visit(file)


@cache
def descriptor_set(files: tuple[FileDescriptor, ...] = TRANSCODER_FILES) -> bytes:
    """A serialized FileDescriptorSet of `files` and everything they import.

    Cached: the contracts cannot change in a running process, and every snapshot
    the control plane builds embeds this set in the transcoder's config.
    """
    result = descriptor_pb2.FileDescriptorSet()
    for file in _closure(files):
        file.CopyToProto(result.file.add())
    return result.SerializeToString()


# --- protobuf.js JSON (the console's wire codec) -------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return "." + field.message_type.full_name
    if field.enum_type is not None:
        return "." + field.enum_type.full_name
    return _SCALARS[field.type]


def _message_json(message: Descriptor) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for field in message.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields
            fields[field.name] = {
                "keyType": _type_name(key),
                "type": _type_name(value[1]),
                "id": field.number,
            }
            continue
        entry: dict[str, Any] = {"type": _type_name(field), "id": field.number}
        if field.is_repeated:
            entry["rule"] = "repeated"
        # `optional` needs no marking: protobuf.js writes every field that is set.
        fields[field.name] = entry
    body: dict[str, Any] = {"fields": fields}
    oneofs = {
        oneof.name: {"oneof": [f.name for f in oneof.fields]}
        for oneof in message.oneofs
        if not oneof.name.startswith("_")  # synthetic oneofs of `optional` fields
    }
    if oneofs:
        body["oneofs"] = oneofs
    nested = {
        nested_type.name: _message_json(nested_type)
        for nested_type in message.nested_types
        if not nested_type.GetOptions().map_entry
    }
    nested.update({enum.name: _enum_json(enum) for enum in message.enum_types})
    if nested:
        body["nested"] = nested
    return body


def _enum_json(enum: EnumDescriptor) -> dict[str, Any]:
    return {"values": {value.name: value.number for value in enum.values}}


def protobufjs_json(files: Iterable[FileDescriptor] = SERVICE_FILES) -> dict[str, Any]:
    """The messages and enums of `files` (imports included) as protobuf.js `Root.fromJSON` input.

    Services and options are left out: the console only encodes requests and
    decodes responses, and calls methods by their gRPC path.
    """
    root: dict[str, Any] = {}
    for file in _closure(files):
        namespace = root
        for part in file.package.split(".") if file.package else []:
            namespace = namespace.setdefault(part, {}).setdefault("nested", {})
        for message in file.message_types_by_name.values():
            namespace[message.name] = _message_json(message)
        for enum in file.enum_types_by_name.values():
            namespace[enum.name] = _enum_json(enum)
    return {"nested": root}
